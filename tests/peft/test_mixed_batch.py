"""Mixed-adapter batches of fastpeft's PeftModel (issue 19, model side): ``model(..., adapter_names=[...])``
and ``generate(..., adapter_names=[...])`` run each sequence on its own adapter through
``lora_linear_multi`` / ``lora_embedding_multi`` (no loop over the adapters), with outputs equal to each
sequence run alone on its adapter: LoRA on Linear (Llama), GPT-2 Conv1D and Embedding layers, adapters of
different ranks and target sets, base rows, per-adapter classifier heads (modules_to_save), beam search,
adapters loaded and deleted while serving."""
from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch

from .lora_models import VOCAB, bert_cls, gpt2_lm, llama_lm

import fastpeft
from fastpeft.mixed_batch import BASE_ADAPTER, check_adapter_names
from fastpeft.ops.lora_linear_multi.layer import adapter_stack
from fastpeft.tuners import lora as fp_lora

# three adapters of different ranks and target sets (embedding included), per model
TARGETS = {
    "llama": [("a", 4, ["q_proj", "v_proj"]), ("b", 8, ["q_proj", "o_proj", "embed_tokens", "down_proj"]),
              ("c", 2, ["k_proj", "gate_proj", "up_proj"])],
    "gpt2": [("a", 4, ["c_attn"]), ("b", 8, ["c_attn", "c_proj", "wte"]), ("c", 2, ["c_fc"])],
}
BUILD = {"llama": llama_lm, "gpt2": gpt2_lm}


def _randomise(model, seed=0):
    """Non-zero LoRA weights of a moderate size (B is zero at init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in model.named_parameters():
            if "lora_" in k or "modules_to_save" in k:
                v.copy_(torch.randn(v.shape, generator=g, dtype=torch.float64).to(v.dtype) * 0.3)


def _model(kind, dtype=torch.float64):
    base = BUILD[kind]().to(dtype)
    (n0, r0, t0), *rest = TARGETS[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=r0, lora_alpha=2 * r0, target_modules=t0),
                                    adapter_name=n0)
        for name, r, t in rest:
            m.add_adapter(name, fastpeft.LoraConfig(r=r, lora_alpha=r + 3, target_modules=t))
    _randomise(m)
    return m.eval()


def _each_alone(model, names, **inputs):
    """Row i of the inputs run alone with adapter names[i] active (the base alone for "__base__")."""
    outs = []
    keep = model.active_adapters
    for i, a in enumerate(names):
        row = {k: v[i:i + 1] for k, v in inputs.items()}
        if a == BASE_ADAPTER:
            with model.disable_adapter():
                outs.append(model(**row).logits)
        else:
            model.set_adapter(a)
            outs.append(model(**row).logits)
    model.set_adapter(keep)
    return torch.cat(outs)


@contextlib.contextmanager
def no_adapter_loop():
    """Fail if a layer runs its per-adapter code (the kernel path must take every LoRA layer)."""
    def boom(self, *a, **k):
        raise AssertionError(f"per-adapter loop ran in {type(self).__name__}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fp_lora.Linear, "_adapter_rows", boom)
        mp.setattr(fp_lora.Embedding, "_adapter_rows", boom)
        yield


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_mixed_batch_equals_each_row_alone(kind):
    model = _model(kind)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, VOCAB, (6, 9), generator=g)
    names = ["b", "a", BASE_ADAPTER, "c", "b", "a"]
    with torch.no_grad():
        want = _each_alone(model, names, input_ids=ids)
    with no_adapter_loop():
        got = model(input_ids=ids, adapter_names=names).logits
    assert not got.requires_grad  # inference: no graph recorded
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    # the adapters differ from each other and from the base on these rows (the test can fail)
    assert (got[0] - got[1]).abs().max() > 1e-3 and (got[1] - got[2]).abs().max() > 1e-3
    # all rows on one adapter, all rows on the base
    for same in ("c", BASE_ADAPTER):
        with torch.no_grad():
            want = _each_alone(model, [same] * 3, input_ids=ids[:3])
        with no_adapter_loop():
            got = model(input_ids=ids[:3], adapter_names=[same] * 3).logits
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_float32_and_bfloat16_models_match_within_tolerance():
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        model = _model("llama", dtype)
        ids = torch.randint(0, VOCAB, (4, 5), generator=torch.Generator().manual_seed(5))
        names = ["a", "c", "b", BASE_ADAPTER]
        ref = copy.deepcopy(model).double()
        ref.base_model.model.to(torch.float64)
        with no_adapter_loop():
            got = model(input_ids=ids, adapter_names=names).logits
        want = ref(input_ids=ids, adapter_names=names).logits
        scale = want.abs().max()
        assert got.dtype == dtype
        assert ((got.double() - want).abs().max() / scale) < tol, dtype


def test_sequence_classification_heads_per_adapter():
    """SEQ_CLS: each adapter has its own classifier copy (modules_to_save); rows go through their own."""
    base = bert_cls().double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=4, target_modules=["query", "value"],
                                                              task_type="SEQ_CLS"), adapter_name="pos")
        m.add_adapter("topic", fastpeft.LoraConfig(r=2, target_modules=["query", "key", "dense"],
                                                   task_type="SEQ_CLS"))
    _randomise(m, seed=1)
    m.eval()
    ids = torch.randint(0, VOCAB, (5, 6), generator=torch.Generator().manual_seed(2))
    names = ["topic", "pos", BASE_ADAPTER, "pos", "topic"]
    with torch.no_grad():
        want = _each_alone(m, names, input_ids=ids)
    got = m(input_ids=ids, adapter_names=names, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["greedy", "beams", "return_sequences"])
def test_generate_with_mixed_adapters_equals_each_prompt_alone(kind, mode):
    model = _model(kind)
    ids = torch.randint(1, VOCAB, (4, 5), generator=torch.Generator().manual_seed(6))
    names = ["c", BASE_ADAPTER, "a", "b"]
    kw = dict(max_new_tokens=6, pad_token_id=0, do_sample=False)
    if mode == "beams":
        kw.update(num_beams=3)
    if mode == "return_sequences":
        kw.update(num_beams=2, num_return_sequences=2)
    with no_adapter_loop():
        got = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names, **kw)
    k = 2 if mode == "return_sequences" else 1
    for i, a in enumerate(names):
        row = {"input_ids": ids[i:i + 1], "attention_mask": torch.ones_like(ids[i:i + 1])}
        if a == BASE_ADAPTER:
            with model.disable_adapter():
                want = model.generate(**row, **kw)
        else:
            model.set_adapter(a)
            want = model.generate(**row, **kw)
        assert torch.equal(got[i * k:(i + 1) * k], want), (i, a)


def test_bad_adapter_names_say_what_is_loaded():
    model = _model("llama")
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['zz'\]; loaded adapters: \['a', 'b', 'c'\]"):
        model(input_ids=ids, adapter_names=["a", "zz"])
    with pytest.raises(ValueError, match="unknown adapter"):
        model.generate(input_ids=ids, adapter_names=["zz", "a"], max_new_tokens=2)
    with pytest.raises(ValueError, match="got 3 names for a batch of 2"):
        model(input_ids=ids, adapter_names=["a", "b", "c"])
    with pytest.raises(TypeError, match="adapter_names: expected a list"):
        model(input_ids=ids, adapter_names="a")
    with pytest.raises(TypeError, match="expected str names"):
        model(input_ids=ids, adapter_names=["a", 1])
    with pytest.raises(ValueError, match="empty"):
        check_adapter_names([], ["a"])
    model.train()
    with pytest.raises(ValueError, match="inference"):
        model(input_ids=ids, adapter_names=["a", "b"])
    with pytest.raises(ValueError, match="reserved"):
        model.add_adapter(BASE_ADAPTER, fastpeft.LoraConfig(r=2, target_modules=["q_proj"]))


def test_dora_rows_are_refused_clearly():
    model = _model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter("dora", fastpeft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    model.eval()
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="DoRA"):
        model(input_ids=ids, adapter_names=["a", "dora"])
    model(input_ids=ids, adapter_names=["a", "b"])  # other rows still fine with a DoRA adapter loaded


def test_load_and_delete_adapters_while_serving(tmp_path):
    """Adapters saved to disk, loaded into one base while serving, deleted again: the base weights are
    never copied, each layer's stack follows the loaded set, outputs stay equal to each row alone."""
    src = _model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "save_embedding_layers set to True": b targets embed_tokens
        for a in ("a", "b", "c"):
            src.save_pretrained(str(tmp_path), selected_adapters=[a])
    base = llama_lm().double()
    ptrs = {k: v.data_ptr() for k, v in base.named_parameters()}
    model = fastpeft.PeftModel.from_pretrained(base, str(tmp_path / "a"), adapter_name="a").eval()
    ids = torch.randint(0, VOCAB, (4, 5), generator=torch.Generator().manual_seed(8))
    names = ["a", BASE_ADAPTER, "a", "a"]
    torch.testing.assert_close(model(input_ids=ids, adapter_names=names).logits,
                               src(input_ids=ids, adapter_names=names).logits, atol=1e-10, rtol=1e-10)
    model.load_adapter(str(tmp_path / "b"), adapter_name="b")
    model.load_adapter(str(tmp_path / "c"), adapter_name="c")
    assert model.list_adapters() == ["a", "b", "c"]
    names = ["c", "b", "a", BASE_ADAPTER]
    torch.testing.assert_close(model(input_ids=ids, adapter_names=names).logits,
                               src(input_ids=ids, adapter_names=names).logits, atol=1e-10, rtol=1e-10)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert adapter_stack(q, torch.float64, torch.device("cpu")).names == ("a", "b")  # c does not target q_proj
    model.delete_adapter("b")
    assert model.list_adapters() == ["a", "c"]
    assert adapter_stack(q, torch.float64, torch.device("cpu")).names == ("a",)
    with pytest.raises(ValueError, match=r"loaded adapters: \['a', 'c'\]"):
        model(input_ids=ids, adapter_names=["b"] * 4)
    names = ["c", "a", "c", BASE_ADAPTER]
    torch.testing.assert_close(model(input_ids=ids, adapter_names=names).logits,
                               src(input_ids=ids, adapter_names=names).logits, atol=1e-10, rtol=1e-10)
    # the base model's parameters were never copied or moved
    inner = {k.replace("base_layer.", ""): v for k, v in model.base_model.model.named_parameters()
             if "lora_" not in k}
    assert all(inner[k].data_ptr() == p for k, p in ptrs.items())


def test_stacks_follow_weight_updates():
    model = _model("gpt2")
    ids = torch.randint(0, VOCAB, (3, 4), generator=torch.Generator().manual_seed(9))
    names = ["b", "a", "c"]
    before = model(input_ids=ids, adapter_names=names).logits
    with torch.no_grad():
        for k, v in model.named_parameters():
            if "lora_B.b" in k or "lora_embedding_B.b" in k:
                v.mul_(2.0)
    after = model(input_ids=ids, adapter_names=names).logits
    assert (after[0] - before[0]).abs().max() > 1e-3
    torch.testing.assert_close(after[1:], before[1:], atol=1e-12, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(after, _each_alone(model, names, input_ids=ids), atol=1e-10, rtol=1e-10)


def test_layer_called_with_adapter_names_directly():
    """HF PEFT's layer-level API: ``layer(x, adapter_names=[...])``, one name per row."""
    model = _model("llama")
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    with no_adapter_loop():
        got = q(x, adapter_names=["b", BASE_ADAPTER, "a"])
    base = q.base_layer(x)
    for i, a in enumerate(["b", BASE_ADAPTER, "a"]):
        want = base[i] if a == BASE_ADAPTER else \
            base[i] + q.lora_B[a](q.lora_A[a](x[i])) * q.scaling[a]
        torch.testing.assert_close(got[i], want, atol=1e-12, rtol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_mixed_batch_on_gpu_matches_float64_cpu(kind):
    """On a GPU (Triton SGMV / BGMV under the model): a bf16 / fp32 model's mixed batch and greedy generate
    against the float64 CPU model's."""
    ref = _model(kind)
    ids = torch.randint(1, VOCAB, (6, 9), generator=torch.Generator().manual_seed(10))
    names = ["b", "a", BASE_ADAPTER, "c", "b", "a"]
    want = ref(input_ids=ids, adapter_names=names).logits
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 4e-2)):
        model = copy.deepcopy(ref).to("cuda", dtype)
        got = model(input_ids=ids.cuda(), adapter_names=names).logits
        assert ((got.double().cpu() - want).abs().max() / want.abs().max()) < tol, dtype
    model = copy.deepcopy(ref).to("cuda", torch.float32)
    kw = dict(max_new_tokens=4, pad_token_id=0, do_sample=False)
    got = model.generate(input_ids=ids.cuda(), attention_mask=torch.ones_like(ids).cuda(), adapter_names=names, **kw)
    assert got.shape == (6, 13)


def test_encoder_decoder_beam_generate():
    """T5: the encoder sees B rows, the decoder B·num_beams; each name covers its sequence's rows in both."""
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=24, num_layers=2, num_decoder_layers=2, num_heads=2,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    base = T5ForConditionalGeneration(cfg).double().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=4, target_modules=["q", "v"]), adapter_name="x")
        m.add_adapter("y", fastpeft.LoraConfig(r=2, target_modules=["k", "o", "wi"]))
    _randomise(m, seed=3)
    m.eval()
    ids = torch.randint(2, VOCAB, (3, 6), generator=torch.Generator().manual_seed(11))
    names = ["y", BASE_ADAPTER, "x"]
    kw = dict(max_new_tokens=5, num_beams=2, do_sample=False)
    with no_adapter_loop():
        got = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names, **kw)
    for i, a in enumerate(names):
        row = dict(input_ids=ids[i:i + 1], attention_mask=torch.ones_like(ids[i:i + 1]))
        if a == BASE_ADAPTER:
            with m.disable_adapter():
                want = m.generate(**row, **kw)
        else:
            m.set_adapter(a)
            want = m.generate(**row, **kw)
        assert torch.equal(got[i, :want.shape[1]], want[0]), (i, a)


def test_stacks_are_built_once_and_index_rows_per_layer():
    model = _model("llama")
    ids = torch.randint(0, VOCAB, (3, 4), generator=torch.Generator().manual_seed(12))
    model(input_ids=ids, adapter_names=["a", "b", "c"])
    q = model.base_model.model.model.layers[1].self_attn.q_proj
    up = model.base_model.model.model.layers[1].mlp.up_proj
    s_q = adapter_stack(q, torch.float64, torch.device("cpu"))
    model(input_ids=ids, adapter_names=["c", "c", "a"])
    assert adapter_stack(q, torch.float64, torch.device("cpu")) is s_q  # not rebuilt
    assert s_q.names == ("a", "b") and s_q.ranks == [4, 8] and s_q.lora_A.shape == (2, 8, 16)
    assert s_q.lora_A[0, 4:].abs().sum() == 0  # the padding of the smaller rank is zero
    from fastpeft.ops.lora_linear_multi.layer import adapter_index
    assert adapter_index(["a", "c", BASE_ADAPTER, "b"], s_q, 8, torch.device("cpu")).tolist() == \
        [0, 0, -1, -1, -1, -1, 1, 1]  # c does not target q_proj: its rows are base-only there
    assert adapter_stack(up, torch.float64, torch.device("cpu")).names == ("c",)


def test_mixed_batch_under_bf16_autocast():
    """fp32 weights under CPU bf16 autocast (what HF Trainer bf16=True evaluation does): the op runs in bf16,
    as each row alone does under the same autocast, within bf16 rounding of the fp32 result."""
    model = _model("llama", torch.float32)
    ids = torch.randint(0, VOCAB, (4, 5), generator=torch.Generator().manual_seed(13))
    names = ["a", "b", BASE_ADAPTER, "c"]
    with torch.no_grad():
        fp32 = _each_alone(model, names, input_ids=ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            alone = _each_alone(model, names, input_ids=ids)
            with no_adapter_loop():
                got = model(input_ids=ids, adapter_names=names).logits
    assert got.dtype == torch.bfloat16
    scale = fp32.abs().max()
    assert (got.float() - fp32).abs().max() / scale < 4e-2
    assert (got.float() - alone.float()).abs().max() / scale < 6e-2
