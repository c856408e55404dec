"""fastpeft: kernel-backed parameter-efficient fine-tuning for PyTorch.

Importing fastpeft never fails for a missing extension, Triton or GPU and never
initialises CUDA; ``fastpeft info`` tells which backends are active and why.

``import fastpeft`` imports the core only (ops, backends, PEFT methods, patching,
heads, freezing, amp, adversarial). The applications' names (``fastpeft.Trainer``,
``TrainerConfig``, ``train``, ``finetune``, ``workflow``) are imported on first use
by the module ``__getattr__`` below; see CONTRIBUTING.md, "Package map".
"""
import sys

from ._version import __version__
from .backends import BackendError, use_backend
from . import ops
from . import amp  # GradScaler / MasterWeights over the fused grad tail
from . import adversarial  # FGM / PGD / FreeLB / FGSM-RS / SMART on embedding outputs
from .tuners import PeftConfig
from .tuners.lora import LoraConfig
from .tuners.adapter import BottleneckAdapterConfig
from .tuners.bitfit import BitFitConfig
from .tuners.ia3 import IA3Config
from .tuners.prefix import PrefixTuningConfig
from .tuners.prompt import PromptTuningConfig
from . import heads  # task heads marked trainable through modules_to_save
from .freezing import FreezeConfig, apply_freezing  # train only the top k blocks
from .peft_model import PeftModel
from .mapping import get_peft_model
from .accelerate import accelerate, restore  # the functions shadow the submodule name

# names of the fine-tuning workflow (an application), imported when first used
_WORKFLOW_NAMES = ("Trainer", "TrainerConfig", "train", "finetune", "workflow")

__all__ = ["get_peft_model", "accelerate", "restore", "PeftModel", "LoraConfig", "PeftConfig", "__version__",
           "BackendError", "use_backend", "ops", "amp", "adversarial", "BottleneckAdapterConfig", "BitFitConfig",
           "IA3Config", "PrefixTuningConfig", "PromptTuningConfig", "heads", "FreezeConfig", "apply_freezing",
           *_WORKFLOW_NAMES]


def __getattr__(name: str):
    """``fastpeft.Trainer`` etc.: the workflow is imported on first access, never by ``import fastpeft``.
    This function is the only place in the core that may import an application module."""
    if name not in _WORKFLOW_NAMES:
        raise AttributeError(f"module 'fastpeft' has no attribute {name!r}")
    from .workflow import Trainer, TrainerConfig, finetune, train  # (`from . import workflow` would recurse here)
    globals().update(Trainer=Trainer, TrainerConfig=TrainerConfig, train=train, finetune=finetune,
                     workflow=sys.modules[__name__ + ".workflow"])
    return globals()[name]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WORKFLOW_NAMES))
