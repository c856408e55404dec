"""fastpeft: kernel-backed parameter-efficient fine-tuning for PyTorch.

Importing fastpeft never fails for a missing extension, Triton or GPU and never
initialises CUDA; ``fastpeft info`` tells which backends are active and why.
"""
from ._version import __version__
from .backends import BackendError, use_backend
from . import ops
from . import amp  # noqa: E402  (GradScaler / MasterWeights over the fused grad tail)
from . import adversarial  # noqa: E402  (FGM / PGD / FreeLB / FGSM-RS / SMART on embedding outputs)
from .tuners import PeftConfig
from .tuners.lora import LoraConfig
from .peft_model import PeftModel
from .mapping import get_peft_model
from .accelerate import accelerate, restore  # noqa: E402  (the functions shadow the submodule name)

__all__ = ["get_peft_model", "accelerate", "restore", "PeftModel", "LoraConfig", "PeftConfig", "__version__", "BackendError", "use_backend", "ops", "amp", "adversarial"]
