"""``fastpeft.accelerate`` on HF PEFT mixed-adapter batches (issue 19): ``model(..., adapter_names=[...])`` and
``generate(..., adapter_names=...)`` of an HF PEFT model run the switched Linear / Conv1D / Embedding LoRA
layers through ``lora_linear_multi`` / ``lora_embedding_multi`` (PEFT's per-adapter loop never runs for
them) with HF PEFT's outputs; DoRA rows keep PEFT's loop; ``restore`` undoes it all."""
from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch

from .lora_models import VOCAB, bert_cls, gpt2_lm, llama_lm, peft

import fastpeft

TARGETS = {
    "llama": [("a", 4, ["q_proj", "v_proj", "embed_tokens"]), ("b", 8, ["q_proj", "o_proj", "down_proj"])],
    "gpt2": [("a", 4, ["c_attn", "wte"]), ("b", 2, ["c_attn", "c_fc"])],
}
BUILD = {"llama": llama_lm, "gpt2": gpt2_lm}


def _hf(kind, dtype=torch.float64, extra=None):
    base = BUILD[kind]().to(dtype)
    (n0, r0, t0), *rest = TARGETS[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = peft.get_peft_model(base, peft.LoraConfig(r=r0, lora_alpha=2 * r0, target_modules=t0,
                                                      init_lora_weights=False), adapter_name=n0)
        for name, r, t in rest + (extra or []):
            m.add_adapter(name, peft.LoraConfig(r=r, lora_alpha=r + 3, target_modules=t, init_lora_weights=False))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for k, v in m.named_parameters():
            if "lora_" in k:
                v.copy_(torch.randn(v.shape, generator=g, dtype=torch.float64).to(v.dtype) * 0.3)
    return m.eval()


@contextlib.contextmanager
def no_peft_loop():
    """Fail if PEFT's own mixed-batch loop runs in a Linear or Embedding LoRA layer."""
    from peft.tuners.lora import Embedding, Linear

    def boom(self, *a, **k):
        raise AssertionError(f"PEFT's per-adapter loop ran in {type(self).__name__}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Linear, "_mixed_batch_forward", boom)
        mp.setattr(Embedding, "_mixed_batch_forward", boom)
        yield


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_accelerated_mixed_batch_equals_hf_peft(kind):
    hf = _hf(kind)
    fast = copy.deepcopy(hf)
    summary = fastpeft.accelerate(fast)
    assert summary.embeddings == 1 and "lora_embedding_multi" in str(summary)
    ids = torch.randint(0, VOCAB, (5, 7), generator=torch.Generator().manual_seed(1))
    names = ["b", "__base__", "a", "a", "b"]
    with torch.no_grad():
        want = hf(input_ids=ids, adapter_names=names).logits
        with no_peft_loop():
            got = fast(input_ids=ids, adapter_names=names).logits
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    assert (want[0] - want[1]).abs().max() > 1e-3  # the adapters matter on these rows
    # single-adapter calls are unchanged, Embedding layers keep PEFT's forward there
    with torch.no_grad():
        torch.testing.assert_close(fast(input_ids=ids).logits, hf(input_ids=ids).logits, atol=1e-10, rtol=1e-10)
    fastpeft.restore(fast)
    assert all(type(m).__module__.startswith(("peft", "transformers", "torch")) for m in fast.modules())


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_accelerated_generate_with_mixed_adapters_equals_hf_peft(kind):
    hf = _hf(kind)
    fast = copy.deepcopy(hf)
    fastpeft.accelerate(fast)
    ids = torch.randint(1, VOCAB, (3, 5), generator=torch.Generator().manual_seed(2))
    names = ["a", "b", "__base__"]
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, pad_token_id=0,
              do_sample=False, num_beams=2, adapter_names=names)
    want = hf.generate(**kw)
    with no_peft_loop():
        got = fast.generate(**kw)
    assert torch.equal(got, want)


def test_dora_rows_raise_as_in_peft_and_other_rows_use_the_op():
    hf = _hf("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.add_adapter("d", peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True, init_lora_weights=False))
    hf.eval()
    fast = copy.deepcopy(hf)
    fastpeft.accelerate(fast)
    ids = torch.randint(0, VOCAB, (3, 4), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for m in (hf, fast):  # PEFT refuses DoRA in mixed batches; the switched layers hand those rows back to it
            with pytest.raises(ValueError, match="DoRA"):
                m(input_ids=ids, adapter_names=["d", "a", "b"])
        names = ["b", "a", "__base__"]  # a DoRA adapter loaded but unused: the op takes the batch
        want = hf(input_ids=ids, adapter_names=names).logits
        with no_peft_loop():
            got = fast(input_ids=ids, adapter_names=names).logits
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_sequence_classification_heads_stay_peft():
    base = bert_cls().double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["query", "value", "word_embeddings"],
                                                       task_type="SEQ_CLS", init_lora_weights=False),
                                 adapter_name="x")
        hf.add_adapter("y", peft.LoraConfig(r=2, target_modules=["query", "key"], task_type="SEQ_CLS",
                                            init_lora_weights=False))
    hf.eval()
    fast = copy.deepcopy(hf)
    fastpeft.accelerate(fast)
    ids = torch.randint(0, VOCAB, (4, 6), generator=torch.Generator().manual_seed(4))
    names = ["y", "x", "x", "y"]
    with torch.no_grad():
        want = hf(input_ids=ids, adapter_names=names).logits
        with no_peft_loop():
            got = fast(input_ids=ids, adapter_names=names).logits
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_bench_case_variants_agree():
    """The mixed-batch bench case (smoke size) times variants that compute the same logits."""
    from fastpeft.bench import mixed
    from fastpeft.bench.cases import all_cases

    case, = [c for c in all_cases("smoke", "cpu") if c.group == "mixed"]
    built = case.build(torch.device("cpu"))
    out = {k: fn() for k, fn in built.variants.items()}
    assert set(out) == set(mixed.VARIANTS)
    for k in ("hf_peft_mixed", "fastpeft_accelerate_mixed"):
        torch.testing.assert_close(out[k], out["fastpeft_mixed"], atol=1e-5, rtol=1e-4)
    names = built.extra["adapter_names"]
    assert len(set(names)) == 4 and (out["fastpeft_mixed"] - out["fastpeft_one_adapter"]).abs().max() > 1e-4
