"""Few-shot text classification with fastpeft adapters (``import fastpeft.fewshot``).

* :mod:`~fastpeft.fewshot.sampling` -- stratified, seeded k-shot sampling (:func:`sample_k_shot`).
* :mod:`~fastpeft.fewshot.setfit` -- SetFit-style method: contrastive LoRA fine-tuning of a sentence
  encoder on pairs built from the shots, then a logistic head (:class:`SetFitClassifier`); optionally with
  SetFit's templated examples (``label_names=...``, :func:`templated_examples`), SetFit >= 1.0's
  oversampling pairs (:func:`oversampled_pairs`), a label-name prior head (:func:`label_name_prior`) and
  SetFit's end-to-end phase (``end_to_end_epochs``).
* :mod:`~fastpeft.fewshot.baselines` -- head-only on frozen features, nearest class prototype, soft-prompt
  tuning (:class:`HeadOnlyClassifier`, :class:`PrototypeClassifier`, :class:`PromptTuningClassifier`).
* :mod:`~fastpeft.fewshot.evaluate` -- multi-seed evaluation, mean +- std (:func:`evaluate_seeds`).
* :mod:`~fastpeft.fewshot.config` -- the ``fewshot:`` config section (:class:`FewshotConfig`,
  :func:`validate_section`, :func:`run_from_config`).

Quick use::

    from fastpeft.fewshot import sample_k_shot, SetFitClassifier
    idx = sample_k_shot(labels, k=8, seed=0)
    clf = SetFitClassifier().fit([texts[i] for i in idx], [labels[i] for i in idx], seed=0)
    clf.predict(["a gorgeous , witty film"])
"""
from .baselines import FrozenEncoder, HeadOnlyClassifier, PromptTuningClassifier, PrototypeClassifier, \
    class_prototypes, prototype_predict
from .config import FewshotConfig, run_from_config, validate_section
from .encoder import mean_pool
from .evaluate import METHODS, evaluate_seeds, make_classifier, mean_std
from .head import LogisticHead, fit_logistic_head
from .sampling import k_shot_records, sample_k_shot
from .setfit import SetFitClassifier, SetFitConfig, generate_pairs, label_name_prior, oversampled_pairs, pair_loss, \
    templated_examples

__all__ = ["sample_k_shot", "k_shot_records", "SetFitClassifier", "SetFitConfig", "generate_pairs", "pair_loss",
           "templated_examples", "oversampled_pairs", "label_name_prior",
           "HeadOnlyClassifier", "PrototypeClassifier", "PromptTuningClassifier", "FrozenEncoder",
           "class_prototypes", "prototype_predict", "LogisticHead", "fit_logistic_head", "mean_pool",
           "METHODS", "evaluate_seeds", "make_classifier", "mean_std", "FewshotConfig", "run_from_config",
           "validate_section"]
