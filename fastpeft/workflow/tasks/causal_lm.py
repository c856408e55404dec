"""Causal language modelling: next-token prediction on text."""
from __future__ import annotations

import torch

from .. import metrics as M
from ..data import EncodedDataset
from .base import Task, device_of, read_rows, register_task, source_name


@register_task
class CausalLM(Task):
    """Next-token prediction on text. Metrics: loss (mean token cross-entropy), perplexity.
    ``predict`` greedily continues each text (``max_new_tokens``) for a quick look."""

    name = "causal_lm"
    aliases = ("lm", "clm")
    default_metric = "loss"
    metric_names = ("loss", "perplexity")
    default_mode = "min"
    head_modules: list[str] = []
    peft_task_type = "CAUSAL_LM"
    default_target_modules = "all-linear"
    max_new_tokens = 20

    def read(self, path: str, cfg: dict, limit: int | None = None, with_labels: bool = True) -> list[dict]:
        col = cfg.get("text_column", "text")
        recs = read_rows(path, [col], cfg, limit)
        return [{"text": str(r[col]), "_line": r["_line"], "_source": source_name(path)} for r in recs]

    def encode(self, records, tokenizer, max_length: int, with_labels: bool = True) -> EncodedDataset:
        enc = tokenizer([r["text"] for r in records], truncation=True, max_length=max_length)
        feats = []
        for i in range(len(records)):
            f = {k: enc[k][i] for k in ("input_ids", "attention_mask")}
            if with_labels:
                f["labels"] = list(enc["input_ids"][i])
            feats.append(f)
        ds = EncodedDataset(feats, records)
        ds.tokenizer = tokenizer
        return ds

    def build_model(self, model_path: str):
        from transformers import AutoModelForCausalLM
        from ..models import load_base_model
        return load_base_model(model_path, AutoModelForCausalLM)

    def fuse_base(self, model, loss: bool = True):
        """``fastpeft.patch_model(model)`` (fused RMSNorm / rope / gated MLP, and the loss without logits
        unless ``loss`` is False: a custom loss_fn or an adversarial method reads the logits); the trainer
        calls it unless ``trainer.fuse_base: false`` / ``--no-fuse-base``.  An architecture patch_model does
        not know trains unfused, with a warning.  Returns the summary (None when nothing was patched)."""
        import sys
        import warnings

        from ... import patch_model
        try:
            summary = patch_model(model, cross_entropy=loss)
        except (TypeError, ValueError) as e:
            warnings.warn(f"trainer.fuse_base: {e}; training with the model's own forwards")
            return None
        if not loss:
            summary.skipped["cross_entropy"] = "a custom loss_fn or adversarial method reads the logits"
        print(summary, file=sys.stderr)
        return summary

    @torch.no_grad()
    def evaluate(self, model, loader, dataset) -> dict:
        loss_sum, n = 0.0, 0
        for batch, out in self.outputs(model, loader):
            k = int((batch["labels"][:, 1:] != -100).sum())
            loss_sum += float(out.loss) * k
            n += k
        loss = loss_sum / max(n, 1)
        return {"loss": loss, "perplexity": M.perplexity(loss)}

    @torch.no_grad()
    def predict(self, model, loader, dataset) -> list[dict]:
        tok = getattr(dataset, "tokenizer", None)
        out = []
        dev = device_of(model)
        for f, r in zip(dataset.features, dataset.records):
            ids = torch.tensor([f["input_ids"]], device=dev)
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=self.max_new_tokens, do_sample=False,
                                 pad_token_id=getattr(tok, "pad_token_id", None))
            new = gen[0, ids.shape[1]:].tolist()
            out.append({"text": r["text"], "continuation": tok.decode(new) if tok is not None else new})
        return out
