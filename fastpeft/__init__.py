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
try:  # the other PEFT methods; a broken one is reported in fastpeft.tuners.TUNER_IMPORT_ERRORS, not raised here
    from .tuners.adapter import BottleneckAdapterConfig
    from .tuners.bitfit import BitFitConfig
    from .tuners.ia3 import IA3Config
    from .tuners.prefix import PrefixTuningConfig
    from .tuners.prompt import PromptTuningConfig
    _METHOD_EXPORTS = ["BottleneckAdapterConfig", "BitFitConfig", "IA3Config", "PrefixTuningConfig",
                       "PromptTuningConfig"]
except Exception:  # pragma: no cover
    _METHOD_EXPORTS = []
from . import heads  # noqa: E402  (task heads marked trainable through modules_to_save)
from .freezing import FreezeConfig, apply_freezing  # noqa: E402  (train only the top k blocks)
from .peft_model import PeftModel
from .mapping import get_peft_model
from .accelerate import accelerate, restore  # noqa: E402  (the functions shadow the submodule name)

__all__ = ["get_peft_model", "accelerate", "restore", "PeftModel", "LoraConfig", "PeftConfig", "__version__", "BackendError", "use_backend", "ops", "amp", "adversarial"]
__all__ += _METHOD_EXPORTS + ["heads", "FreezeConfig", "apply_freezing"]
from .workflow import Trainer, TrainerConfig, train, finetune  # noqa: E402  (fine-tuning workflow)
__all__ += ["Trainer", "TrainerConfig", "train", "finetune", "workflow"]
