"""Trainer features on a tiny random BERT: resume exactness, accumulation, early stopping, schedules,
checkpoints, logs, callbacks, determinism."""
import json
import os

import pytest
import torch

from fastpeft.workflow import Trainer, TrainerConfig
from fastpeft.workflow import checkpointing as ckpt
from fastpeft.workflow.trainer import Schedule, TrainState, build_optimizer

from .conftest import Kill, KillAt, make_cls_setup


def _cfg(**kw):
    base = dict(lr=5e-3, batch_size=16, max_steps=8, progress=False, seed=0, plot=False, max_grad_norm=1.0)
    base.update(kw)
    return TrainerConfig(**base)


def _run(tiny_model_dir, tiny_cls_files, cfg, callbacks=None, dropout=0.1, backend="auto", **kw):
    model, task, tr, dev, tok = make_cls_setup(tiny_model_dir, tiny_cls_files, lora_dropout=dropout,
                                               backend=backend)
    t = Trainer(model, task, tr, dev, cfg, tokenizer=tok, callbacks=callbacks, **kw)
    return t, t.train()


def test_resume_continues_exactly(tmp_path, tiny_model_dir, tiny_cls_files):
    # 96 examples / batch 16 = 6 batches per epoch: 8 steps cross an epoch boundary; LoRA dropout on,
    # so the RNG state must be restored too
    N, k = 8, 3
    ref, r_ref = _run(tiny_model_dir, tiny_cls_files, _cfg(max_steps=N, output_dir=str(tmp_path / "a")))
    with pytest.raises(Kill):
        _run(tiny_model_dir, tiny_cls_files, _cfg(max_steps=N, save_every=k, output_dir=str(tmp_path / "b")),
             callbacks=[KillAt(k + 1)])
    assert ckpt.latest_checkpoint(str(tmp_path / "b")).endswith(f"checkpoint-{k}")
    res, r_res = _run(tiny_model_dir, tiny_cls_files,
                      _cfg(max_steps=N, output_dir=str(tmp_path / "b"), resume_from="latest"))
    assert r_res["resumed_from"].endswith(f"checkpoint-{k}")
    assert len(r_res["losses"]) == N
    torch.testing.assert_close(torch.tensor(r_res["losses"]), torch.tensor(r_ref["losses"]), rtol=1e-5, atol=1e-6)
    a, b = ref.trainable_state(), res.trainable_state()
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6)
    # the metrics log was rewritten from the checkpoint: one train record per step, no duplicates
    steps = [json.loads(l)["step"] for l in open(tmp_path / "b" / "metrics.jsonl") if '"train"' in l]
    assert steps == list(range(1, N + 1))


def test_checkpoint_written_before_trainstate_and_one_scaler_still_resumes(tmp_path, tiny_model_dir, tiny_cls_files):
    """state.json as the trainer wrote it before the TrainState dataclass (no ``skipped_steps`` key) and with
    the scaler state FSDP runs wrote before ``fastpeft.amp.GradScaler(grad_tail="torch")``
    (``{scale, good, precision}``): resuming from it continues exactly."""
    N, k = 5, 2
    _, r_ref = _run(tiny_model_dir, tiny_cls_files, _cfg(max_steps=N, output_dir=str(tmp_path / "a")))
    with pytest.raises(Kill):
        _run(tiny_model_dir, tiny_cls_files, _cfg(max_steps=N, save_every=k, output_dir=str(tmp_path / "b")),
             callbacks=[KillAt(k + 1)])
    state_json = tmp_path / "b" / f"checkpoint-{k}" / "state.json"
    meta = json.loads(state_json.read_text())
    assert meta["skipped_steps"] == 0 and meta["scaler"]["precision"] == "fp32"
    del meta["skipped_steps"]
    meta["scaler"] = {"scale": 1.0, "good": 2, "precision": "fp32"}
    state_json.write_text(json.dumps(meta))
    t, r_res = _run(tiny_model_dir, tiny_cls_files,
                    _cfg(max_steps=N, output_dir=str(tmp_path / "b"), resume_from="latest"))
    assert r_res["resumed_from"].endswith(f"checkpoint-{k}") and r_res["skipped_steps"] == 0
    assert t.scaler._get_growth_tracker() == 2  # read from 'good' (fp32 does not scale, so it stays)
    torch.testing.assert_close(torch.tensor(r_res["losses"]), torch.tensor(r_ref["losses"]), rtol=1e-5, atol=1e-6)


def test_train_state_round_trips_through_checkpoint_meta():
    st = TrainState(step=7, epoch=1, batch_in_epoch=2, best_metric=0.5, best_step=4, bad_evals=1, examples=99,
                    skipped_steps=3, best_state={"w": torch.ones(2)})
    meta = st.to_meta()
    assert set(meta) == {"step", "epoch", "batch_in_epoch", "best_metric", "best_step", "bad_evals", "examples",
                         "skipped_steps", "nonfinite_steps", "first_nonfinite_step"}
    back = TrainState.from_checkpoint({**meta, "optimizer": {}, "history": []}, st.best_state)
    assert back == st
    assert TrainState.from_checkpoint({"step": 3}, {}) == TrainState(step=3)


def test_grad_accumulation_matches_bigger_batch(tiny_model_dir, tiny_cls_files):
    a, ra = _run(tiny_model_dir, tiny_cls_files, _cfg(batch_size=16, max_steps=3), dropout=0.0)
    b, rb = _run(tiny_model_dir, tiny_cls_files, _cfg(batch_size=8, grad_accum=2, max_steps=3), dropout=0.0)
    torch.testing.assert_close(torch.tensor(ra["losses"]), torch.tensor(rb["losses"]), rtol=1e-5, atol=1e-6)
    sa, sb = a.trainable_state(), b.trainable_state()
    for n in sa:
        torch.testing.assert_close(sa[n], sb[n], rtol=1e-4, atol=1e-6)


def test_deterministic_with_seed_and_seed_matters(tiny_model_dir, tiny_cls_files):
    _, r1 = _run(tiny_model_dir, tiny_cls_files, _cfg(max_steps=3))
    _, r2 = _run(tiny_model_dir, tiny_cls_files, _cfg(max_steps=3))
    _, r3 = _run(tiny_model_dir, tiny_cls_files, _cfg(max_steps=3, seed=1))
    assert r1["losses"] == r2["losses"]
    assert r1["losses"] != r3["losses"]


def test_early_stopping_restores_best(tmp_path, tiny_model_dir, tiny_cls_files):
    seen = {}

    class Record:
        def on_evaluate(self, trainer, step, metrics):
            seen[step] = trainer.trainable_state()

    # min_delta larger than any possible accuracy gain: the first evaluation stays best
    t, r = _run(tiny_model_dir, tiny_cls_files,
                _cfg(max_steps=20, eval_every=2, patience=2, min_delta=2.0, output_dir=str(tmp_path)),
                callbacks=[Record()])
    assert r["early_stopped"] and r["steps"] == 6 and r["best_step"] == 2
    final = t.trainable_state()
    for n, v in seen[2].items():
        torch.testing.assert_close(final[n], v, rtol=0, atol=0)
    assert any(not torch.equal(seen[2][n], seen[6][n]) for n in final)  # training did move on after step 2
    log = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [l["step"] for l in log if l["type"] == "eval"] == [2, 4, 6]
    assert log[-1]["type"] == "early_stop" and log[-1]["best_step"] == 2
    # the saved adapter is the best one
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert any("lora_A" in k for k in saved) and any("classifier" in k for k in saved)


def test_outputs_written_jsonl_png_checkpoint_layout(tmp_path, tiny_model_dir, tiny_cls_files):
    t, r = _run(tiny_model_dir, tiny_cls_files, _cfg(max_steps=7, eval_every=3, save_every=3, keep_checkpoints=2,
                                                     plot=True, output_dir=str(tmp_path), progress=True))
    names = set(os.listdir(tmp_path))
    assert {"metrics.jsonl", "curves.png", "adapter", "result.json"} <= names
    assert {n for n in names if n.startswith("checkpoint-")} == {"checkpoint-6", "checkpoint-7"}
    assert not [n for n in names if n.startswith(".")]  # no temp leftovers
    assert open(tmp_path / "curves.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    recs = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    train = [x for x in recs if x["type"] == "train"]
    assert [x["step"] for x in train] == list(range(1, 8))
    assert all({"loss", "lr", "examples_per_s"} <= set(x) for x in train)
    assert [x["step"] for x in recs if x["type"] == "eval"] == [3, 6, 7]
    c = tmp_path / "checkpoint-6"
    assert {"state.json", "state.safetensors", "adapter"} <= set(os.listdir(c))
    tensors, meta = ckpt.load_checkpoint(str(c))
    assert meta["step"] == 6 and meta["epoch"] == 1 and meta["batch_in_epoch"] == 0
    assert any(k.startswith("optim.") for k in tensors) and "rng.torch" in tensors
    assert meta["scheduler"]["last_epoch"] == 6


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    import safetensors.torch as st
    path = str(tmp_path / "checkpoint-1")
    ckpt.save_checkpoint(path, tensors={"a": torch.ones(2)}, meta={"step": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(path, tensors={"a": torch.zeros(2)}, meta={"step": 2})
    tensors, meta = ckpt.load_checkpoint(path)  # the old checkpoint is intact
    assert meta["step"] == 1 and tensors["a"].tolist() == [1.0, 1.0]
    assert os.listdir(tmp_path) == ["checkpoint-1"]
    with pytest.raises(RuntimeError):
        with ckpt.atomic_write(str(tmp_path / "f.json")) as f:
            f.write("partial")
            raise RuntimeError()
    assert not (tmp_path / "f.json").exists() and os.listdir(tmp_path) == ["checkpoint-1"]
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        ckpt.load_checkpoint(str(tmp_path))


def test_schedules():
    lin = Schedule("linear", warmup=2, total=10)
    assert [round(lin(s), 4) for s in (0, 1, 2, 6, 10)] == [round(1 / 3, 4), round(2 / 3, 4), 1.0, 0.5, 0.0]
    cos = Schedule("cosine", warmup=0, total=10)
    assert cos(0) == pytest.approx(1.0) and cos(5) == pytest.approx(0.5) and cos(10) == pytest.approx(0.0)
    const = Schedule("constant", warmup=4, total=10)
    assert const(1) == pytest.approx(0.4) and const(9) == 1.0


def test_optimizers_and_weight_decay_groups(tiny_model_dir, tiny_cls_files):
    model, *_ = make_cls_setup(tiny_model_dir, tiny_cls_files)
    opt = build_optimizer(model, _cfg(weight_decay=0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    decay = [names[id(p)] for p in opt.param_groups[0]["params"]]
    no_decay = [names[id(p)] for p in opt.param_groups[1]["params"]]
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert all("bias" not in n for n in decay) and any("lora_A" in n for n in decay)
    assert all(n.endswith("bias") or "norm" in n.lower() for n in no_decay)
    assert isinstance(opt, torch.optim.AdamW)
    sgd = build_optimizer(model, _cfg(optimizer="sgd", momentum=0.8))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.8


def test_sgd_cosine_trains_and_config_errors(tiny_model_dir, tiny_cls_files):
    _, r = _run(tiny_model_dir, tiny_cls_files, _cfg(optimizer="sgd", scheduler="cosine", lr=0.05, max_steps=3))
    assert len(r["losses"]) == 3 and all(l == l for l in r["losses"])
    with pytest.raises(ValueError, match="trainer.optimizer"):
        TrainerConfig(optimizer="adam")
    with pytest.raises(ValueError, match="trainer.batch_size"):
        TrainerConfig(batch_size=0)


def test_callbacks_augmentation_custom_loss_and_adversarial_hook(tiny_model_dir, tiny_cls_files):
    calls = {"batch": 0, "loss": 0, "adv": 0}

    class Augment:
        def on_batch(self, trainer, batch):
            calls["batch"] += 1
            batch = dict(batch)
            batch["attention_mask"] = batch["attention_mask"].clone()
            return batch

    def loss_fn(outputs, batch):
        calls["loss"] += 1
        return torch.nn.functional.cross_entropy(outputs.logits, batch["labels"], label_smoothing=0.1)

    _, r = _run(tiny_model_dir, tiny_cls_files, _cfg(max_steps=2), callbacks=[Augment()], loss_fn=loss_fn)
    assert calls["batch"] == 2 and calls["loss"] == 2

    class FakeAdversarial:  # the fastpeft.adversarial interface: does its own forward/backward
        def step(self, model, batch, forward_fn):
            calls["adv"] += 1
            loss, logits = forward_fn(model, batch)
            loss.backward()
            return loss.detach()

    _, r2 = _run(tiny_model_dir, tiny_cls_files, _cfg(max_steps=2), adversarial=FakeAdversarial())
    _, r3 = _run(tiny_model_dir, tiny_cls_files, _cfg(max_steps=2))
    assert calls["adv"] == 2
    torch.testing.assert_close(torch.tensor(r2["losses"]), torch.tensor(r3["losses"]))


def test_fastpeft_adversarial_method_plugs_in(tiny_model_dir, tiny_cls_files):
    adv = pytest.importorskip("fastpeft.adversarial")
    _, r = _run(tiny_model_dir, tiny_cls_files, _cfg(max_steps=2), adversarial=adv.build("fgm", epsilon=1.0))
    _, plain = _run(tiny_model_dir, tiny_cls_files, _cfg(max_steps=2))
    assert r["losses"][0] == pytest.approx(plain["losses"][0], rel=1e-5)  # FGM reports the clean loss
    assert r["losses"][1] != pytest.approx(plain["losses"][1], rel=1e-7)  # ... but trained on more


def test_adversarial_step_gets_the_fp16_loss_scale(tiny_model_dir, tiny_cls_files):
    """Methods whose step takes ``loss_scale`` (SMART) get the scaler's current scale: 2**16 at the
    start of an fp16 run, 1.0 in fp32."""
    seen = []

    class ScaleAware:
        def step(self, model, batch, forward_fn, backward, loss_scale=1.0):
            seen.append(loss_scale)
            loss, _ = forward_fn(model, batch)
            backward(loss)
            return loss.detach()

    _run(tiny_model_dir, tiny_cls_files, _cfg(max_steps=1, precision="fp16"), adversarial=ScaleAware(),
         backend="peft")
    _run(tiny_model_dir, tiny_cls_files, _cfg(max_steps=1), adversarial=ScaleAware())
    assert seen == [2.0 ** 16, 1.0]


@pytest.mark.parametrize("backend", ["peft", "fastpeft"])
def test_bf16_autocast_runs(tiny_model_dir, tiny_cls_files, backend):
    _, r = _run(tiny_model_dir, tiny_cls_files, _cfg(max_steps=2, precision="bf16"), backend=backend)
    assert len(r["losses"]) == 2 and all(l == l for l in r["losses"])


def test_adversarial_config_maps_by_name():
    adv = pytest.importorskip("fastpeft.adversarial")
    from fastpeft.workflow.config import build_config
    from fastpeft.workflow.pipeline import build_adversarial
    cfg = build_config({"model": "m", "task": "sequence_classification", "data": {"train": "x.tsv"},
                        "adversarial": {"method": "freelb", "steps": 2}})
    m = build_adversarial(cfg["adversarial"])
    assert isinstance(m, adv.FreeLB) and m.steps == 2
    assert cfg["adversarial"] == {"method": "freelb", "steps": 2}  # the config is not consumed
