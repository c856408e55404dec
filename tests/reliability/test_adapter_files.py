"""Adapter files under faults and bad input (issue 16 items 5, 6, 7, 9; issue 21's dangerous fall-through):
atomic saves, adapter names that would escape the directory, adapters fastpeft wrote but could not read,
tensors that are not floating point or not finite, writes from non-main processes, and push_to_hub, which
must upload the adapter and never the base model."""
import copy
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import fastpeft  # noqa: E402
from fastpeft.checkpoint import load_safetensors, save_safetensors  # noqa: E402

from ..peft.lora_models import bert_cls, hf_and_fast, inputs_for, run  # noqa: E402

ST = "adapter_model.safetensors"
CFG = dict(r=2, target_modules=["query"])


def _model(**kw):
    return fastpeft.get_peft_model(bert_cls(), fastpeft.LoraConfig(**{**CFG, "init_lora_weights": False, **kw}))


# -- 5: atomic save ------------------------------------------------------------------------------------
def test_a_failed_save_leaves_the_previous_adapter_whole(tmp_path, monkeypatch):
    """Weights and config used to be renamed one by one: a failure between them left new weights beside the
    old config, which then loaded without error as neither adapter."""
    d = tmp_path / "adapter"
    old = _model()
    old.save_pretrained(d)
    (d / "tokenizer.json").write_text("{}")  # a file of someone else: kept by every save
    before = {n: (d / n).read_bytes() for n in os.listdir(d)}
    new = _model(r=4)
    real = fastpeft.PeftConfig.save_pretrained

    def config_write_fails(self, *a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(fastpeft.PeftConfig, "save_pretrained", config_write_fails)
    with pytest.raises(OSError, match="disk full"):
        new.save_pretrained(d)
    assert {n: (d / n).read_bytes() for n in os.listdir(d)} == before
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no temporary directory left behind
    monkeypatch.setattr(fastpeft.PeftConfig, "save_pretrained", real)
    new.save_pretrained(d)
    assert json.loads((d / "adapter_config.json").read_text())["r"] == 4
    assert (d / "tokenizer.json").read_text() == "{}"
    loaded = fastpeft.PeftModel.from_pretrained(bert_cls(), str(d))
    x = inputs_for("bert")
    with torch.no_grad():
        torch.testing.assert_close(run(loaded, x), run(new.eval(), x))


_KILLED_BETWEEN_RENAMES = """
import os, sys
sys.path.insert(0, {root!r})
from tests.reliability.test_adapter_files import _model
real = os.replace
def replace(src, dst):
    if os.path.abspath(dst) == {path!r} and os.path.isdir(src) and str(src).endswith(".tmp"):
        # the new directory's rename: the old one is parked by now
        os._exit(9)
    real(src, dst)
os.replace = replace
_model(r=4).save_pretrained({path!r})
"""


def _save_killed_between_the_renames(d):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", _KILLED_BETWEEN_RENAMES.format(root=root, path=str(d))],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 9, r.stderr
    assert not d.exists()   # what the kill leaves: the old adapter parked under a hidden name only
    assert any(e.endswith(".old") for e in os.listdir(d.parent))


def test_a_kill_between_the_two_renames_loses_nothing(tmp_path):
    """save_pretrained parks the old directory, then renames the new one in; a kill between the two
    used to leave no adapter directory, and the next training start deleted the parked copy."""
    from fastpeft.workflow.checkpointing import remove_stale_temporaries

    d = tmp_path / "adapter"
    _model().save_pretrained(d)
    (d / "tokenizer.json").write_text("{}")
    before = {n: (d / n).read_bytes() for n in os.listdir(d)}
    _save_killed_between_the_renames(d)
    remove_stale_temporaries(str(tmp_path))   # what the trainer runs at its start
    assert sorted(os.listdir(tmp_path)) == ["adapter"]
    assert {n: (d / n).read_bytes() for n in os.listdir(d)} == before
    _save_killed_between_the_renames(d)
    _model(r=4).save_pretrained(d)            # the next save puts the parked one back first
    assert json.loads((d / "adapter_config.json").read_text())["r"] == 4
    assert (d / "tokenizer.json").read_text() == "{}"   # someone else's file survives
    assert not [e for e in os.listdir(tmp_path) if e.endswith(".old")]


def test_save_keeps_other_adapters_and_drops_a_stale_pickle(tmp_path):
    m = _model()
    m.add_adapter("second", fastpeft.LoraConfig(r=3, target_modules=["value"]))
    m.save_pretrained(tmp_path)
    (tmp_path / "adapter_model.bin").write_bytes(b"old pickle")
    m.save_pretrained(tmp_path, selected_adapters=["default"])
    assert (tmp_path / "second" / ST).exists() and not (tmp_path / "adapter_model.bin").exists()


def test_save_into_the_working_directory_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="current working directory"):
        _model().save_pretrained(".")


# -- 6: adapter names ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["/abs/path", "a/b", "..", "a\\b", "x.y", ""])
def test_adapter_names_cannot_escape_the_directory(name, tmp_path):
    m = _model()
    with pytest.raises(ValueError, match="adapter_name"):
        m.add_adapter(name, fastpeft.LoraConfig(**CFG))
    with pytest.raises(ValueError, match="adapter_name"):
        fastpeft.get_peft_model(bert_cls(), fastpeft.LoraConfig(**CFG), adapter_name=name)
    with pytest.raises(ValueError, match="adapter_name"):
        m.load_adapter(str(tmp_path), name)
    with pytest.raises(ValueError, match="adapter_name"):
        fastpeft.inject_adapter_in_model(fastpeft.LoraConfig(**CFG), bert_cls(), adapter_name=name)
    assert os.listdir(tmp_path) == []


# -- 7: fastpeft reads what it writes ----------------------------------------------------------------------
def test_classification_head_named_in_target_modules_round_trips(tmp_path):
    """target_modules naming the head with task_type=SEQ_CLS: fastpeft could not load its own adapter.  The
    head is trained in full (modules_to_save wins, as in HF PEFT), and both libraries load the file."""
    base, hf, fp = hf_and_fast("bert", dict(r=2, target_modules=["query", "classifier"], task_type="SEQ_CLS"))
    assert not any(".classifier.lora_" in k or ".classifier.original_module.lora_" in k for k in fp.state_dict())
    fp.save_pretrained(tmp_path)
    _both_load_like(fp, base, tmp_path)


def _both_load_like(fp, base, path):
    """fastpeft and HF PEFT load ``path`` onto ``base`` with ``fp``'s logits; returns them."""
    x = inputs_for("bert")
    with torch.no_grad():
        ref = run(fp.eval(), x)
        for m in (fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(path)),
                  peft.PeftModel.from_pretrained(copy.deepcopy(base), str(path))):
            torch.testing.assert_close(run(m.eval(), x), ref)
    return ref


def test_prompt_learning_head_uses_hf_keys(tmp_path):
    """Prompt tuning + a trained head: HF PEFT writes the head under base_model.<head>; fastpeft wrote
    base_model.model.<head>, which HF then silently did not load."""
    base = bert_cls()
    cfg = dict(num_virtual_tokens=3, task_type="SEQ_CLS")
    torch.manual_seed(0)
    fp = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.PromptTuningConfig(**cfg))
    with torch.no_grad():
        for p in fp.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    fp.save_pretrained(tmp_path)
    keys = sorted(load_safetensors(str(tmp_path / ST)))
    assert keys == ["base_model.classifier.bias", "base_model.classifier.weight", "prompt_embeddings"]
    ref = _both_load_like(fp, base, tmp_path)
    x = inputs_for("bert")
    legacy = {("base_model.model." + k[len("base_model."):] if k.startswith("base_model.") else k): v
              for k, v in load_safetensors(str(tmp_path / ST)).items()}
    save_safetensors(legacy, str(tmp_path / ST))  # what earlier fastpeft versions wrote: still read
    with torch.no_grad():
        torch.testing.assert_close(run(fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)), x), ref)


# -- 9: tensors are checked on load ------------------------------------------------------------------------
def _poison(d, fn):
    sd = load_safetensors(str(d / ST))
    k = sorted(x for x in sd if "lora_A" in x)[0]
    sd[k] = fn(sd[k])
    save_safetensors(sd, str(d / ST))
    return k


def test_integer_tensor_is_refused(tmp_path):
    _model().save_pretrained(tmp_path)
    k = _poison(tmp_path, lambda t: (t * 1e9).to(torch.int32))
    with pytest.raises(ValueError, match="floating point") as e:
        fastpeft.PeftModel.from_pretrained(bert_cls(), str(tmp_path))
    assert k in str(e.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_an_error_or_an_explicit_warning(tmp_path, value):
    _model().save_pretrained(tmp_path)

    def put(t):
        t = t.clone()
        t[0, 0] = value
        return t
    k = _poison(tmp_path, put)
    base = bert_cls()
    with pytest.raises(ValueError, match="NaN or inf") as e:
        fastpeft.PeftModel.from_pretrained(base, str(tmp_path))
    assert k in str(e.value) and "allow_nonfinite" in str(e.value)
    assert not any("lora" in n for n in base.state_dict())  # model unchanged
    with pytest.warns(UserWarning, match="allow_nonfinite=True"):
        m = fastpeft.PeftModel.from_pretrained(base, str(tmp_path), allow_nonfinite=True)
    assert not torch.isfinite(dict(m.named_parameters())[k.replace("lora_A.", "lora_A.default.")]).all()


def test_shape_against_the_config_is_checked(tmp_path):
    _model().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["r"] = 5
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape"):
        fastpeft.PeftModel.from_pretrained(bert_cls(), str(tmp_path))


# -- is_main_process, model card, push_to_hub ------------------------------------------------------------
def test_non_main_process_writes_nothing(tmp_path):
    _model().save_pretrained(tmp_path / "x", is_main_process=False)
    assert not (tmp_path / "x").exists()


def test_model_card_is_written_and_a_users_card_kept(tmp_path):
    m = fastpeft.get_peft_model(bert_cls(), fastpeft.LoraConfig(**CFG, base_model_name_or_path="org/base"))
    m.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\nbase_model: org/base\n") and "base_model:adapter:org/base" in card
    (tmp_path / "README.md").write_text("my card\n")
    m.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "my card\n"


class _FakeHfApi:
    """huggingface_hub.HfApi stand-in: records what would be uploaded."""
    calls: list = []
    fail = None

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kw):
        if self.fail:
            raise self.fail
        _FakeHfApi.calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, repo_id, folder_path, **kw):
        files = {}
        for d, _, names in os.walk(folder_path):
            for n in names:
                p = os.path.join(d, n)
                files[os.path.relpath(p, folder_path)] = os.path.getsize(p)
        tensors = load_safetensors(os.path.join(folder_path, ST))
        _FakeHfApi.calls.append(("upload_folder", repo_id, files, sorted(tensors), kw))
        return "commit-info"


def test_push_to_hub_uploads_the_adapter_only(monkeypatch):
    """It resolved to the base transformers model's push_to_hub, which uploads the full base weights."""
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub, "HfApi", _FakeHfApi)
    _FakeHfApi.calls, _FakeHfApi.fail = [], None
    m = _model()
    base_keys = set(m.get_base_model().state_dict())
    assert m.push_to_hub("me/my-adapter", private=True, commit_message="hi") == "commit-info"
    (_, repo, kw), (_, repo2, files, keys, up) = _FakeHfApi.calls
    assert repo == repo2 == "me/my-adapter" and kw["private"] is True and up["commit_message"] == "hi"
    assert set(files) == {"adapter_config.json", ST, "README.md"}
    assert keys and all(".lora_" in k for k in keys) and not (set(keys) & base_keys)
    base_bytes = sum(p.numel() * p.element_size() for p in m.get_base_model().parameters())
    assert files[ST] < base_bytes / 10


def test_push_to_hub_without_network_is_a_clear_error(monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub, "HfApi", _FakeHfApi)
    _FakeHfApi.calls, _FakeHfApi.fail = [], ConnectionError("no network")
    try:
        with pytest.raises(OSError, match="nothing was uploaded"):
            _model().push_to_hub("me/my-adapter")
    finally:
        _FakeHfApi.fail = None
    assert not [c for c in _FakeHfApi.calls if c[0] == "upload_folder"]


def test_push_to_hub_offline_for_real(monkeypatch):
    """With the real huggingface_hub in offline mode: an error, nothing uploaded."""
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(OSError, match="push_to_hub"):
            _model().push_to_hub("me/my-adapter")
