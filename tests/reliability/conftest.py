"""The workflow's tiny-model fixtures (a 2-layer random BERT, tiny sentiment / CoNLL files) for the fault
and bad-input suite."""
from ..workflow.conftest import tiny_cls_files, tiny_conll_files, tiny_model_dir  # noqa: F401  (fixtures)
