"""Data augmentation for fine-tuning with fastpeft's trainer.

* :mod:`.text` -- token-level ops on tokenised batches (random swap / deletion / insertion, token masking,
  embedding-neighbour substitution), label-preserving, special tokens never touched;
* :mod:`.embedding` -- NEFTune noise on input-embedding outputs (training only) and embedding mixup with
  soft-label cross-entropy;
* :mod:`.image` -- random crop with padding, horizontal flip, Gaussian noise, cutout on NCHW batches
  (no torchvision);
* :mod:`.gan` -- a conditional GAN on pooled features that synthesises extra feature vectors for rare
  classes / few-shot tasks, and a head trained on real + synthetic features;
* :mod:`.config` -- :func:`callbacks_from_config` for the ``augment:`` section of a finetune config.

All per-batch ops are Trainer callbacks (``on_batch(trainer, batch) -> batch``), apply to each example
with probability ``p``, own a seeded ``torch.Generator`` and can be called on a batch directly::

    from fastpeft.augment import EmbeddingSubstitution, NEFTune, EmbeddingMixup
    mix = EmbeddingMixup(alpha=0.4)
    callbacks = [EmbeddingSubstitution(model, tok, p=0.5, rate=0.15), NEFTune(alpha=5), mix]
    Trainer(model, task, train_ds, dev_ds, cfg, tokenizer=tok, callbacks=callbacks, loss_fn=mix.loss_fn)

Measured effects: README ("Data augmentation") and ``benchmarks/results/augment_effect.json``.
"""
from .config import AUGMENTATIONS, callbacks_from_config
from .embedding import EmbeddingMixup, NEFTune, soft_cross_entropy
from .gan import FeatureGAN, LinearHead, extract_features, train_head_with_synthetic, train_linear_head
from .image import Cutout, GaussianNoise, HorizontalFlip, ImageAugment, RandomCrop
from .text import (EmbeddingSubstitution, RandomDeletion, RandomInsertion, RandomSwap, TokenAugmentation,
                   TokenMasking, embedding_neighbours, special_token_ids)

__all__ = ["callbacks_from_config", "AUGMENTATIONS", "RandomSwap", "RandomDeletion", "RandomInsertion",
           "TokenMasking", "EmbeddingSubstitution", "TokenAugmentation", "embedding_neighbours", "special_token_ids",
           "NEFTune", "EmbeddingMixup", "soft_cross_entropy", "RandomCrop", "HorizontalFlip", "GaussianNoise",
           "Cutout", "ImageAugment", "FeatureGAN", "LinearHead", "train_linear_head", "train_head_with_synthetic",
           "extract_features"]
