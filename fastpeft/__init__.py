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
from .tuners.base import TaskType
from .peft_model import (PeftModel, PeftModelForCausalLM, PeftModelForFeatureExtraction, PeftModelForQuestionAnswering,
                         PeftModelForSeq2SeqLM, PeftModelForSequenceClassification, PeftModelForTokenClassification)
from .mapping import get_peft_model
from .state_dict import get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from .status import get_layer_status, get_model_status
from .auto import (AutoPeftModel, AutoPeftModelForCausalLM, AutoPeftModelForFeatureExtraction,
                   AutoPeftModelForQuestionAnswering, AutoPeftModelForSeq2SeqLM,
                   AutoPeftModelForSequenceClassification, AutoPeftModelForTokenClassification)
from .accelerate import accelerate, restore  # the functions shadow the submodule name
from .accelerate import fusion_report, reset_fusion_report  # what the fusable LoRA layers ran
from .patching import patch_model, unpatch_model  # fused rms_norm / rope / mlp / loss in transformers decoders
from .tuners.lora_quant import prepare_model_for_kbit_training  # QLoRA (bitsandbytes bases)

# names of the fine-tuning workflow (an application), imported when first used
_WORKFLOW_NAMES = ("Trainer", "TrainerConfig", "train", "finetune", "workflow")

__all__ = ["get_peft_model", "patch_model", "unpatch_model", "prepare_model_for_kbit_training", "accelerate", "restore", "fusion_report", "reset_fusion_report", "PeftModel", "LoraConfig", "PeftConfig", "__version__",
           "BackendError", "use_backend", "ops", "amp", "adversarial", "BottleneckAdapterConfig", "BitFitConfig",
           "IA3Config", "PrefixTuningConfig", "PromptTuningConfig", "heads", "FreezeConfig", "apply_freezing",
           "TaskType", "PeftModelForCausalLM", "PeftModelForFeatureExtraction", "PeftModelForQuestionAnswering",
           "PeftModelForSeq2SeqLM", "PeftModelForSequenceClassification", "PeftModelForTokenClassification",
           "get_peft_model_state_dict", "set_peft_model_state_dict", "inject_adapter_in_model", "get_layer_status",
           "get_model_status", "AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForFeatureExtraction",
           "AutoPeftModelForQuestionAnswering", "AutoPeftModelForSeq2SeqLM", "AutoPeftModelForSequenceClassification",
           "AutoPeftModelForTokenClassification", *_WORKFLOW_NAMES]


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
