"""CLI friction (issue 21): per-split columns, adapters that remember their columns, adapters of the Python
Trainer usable by evaluate / predict, evaluation lines without a progress bar, predict --scores, YAML data
paths relative to the config file, no traceback on a closed pipe, task_type in every adapter, a bad
--metric caught at config time."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from fastpeft.cli import main
from fastpeft.workflow.config import ConfigError, build_config, load_yaml

from .conftest import make_cls_setup

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, tiny_model_dir, tiny_cls_files):
    """A tiny fastpeft finetune run whose validation file names its text column 'content' (the training file's
    is 'sentence'), given with --validation-text-column; returns (output dir, stderr)."""
    out = tmp_path_factory.mktemp("friction") / "run"
    train, dev = tiny_cls_files
    argv = ["finetune", "--model", tiny_model_dir, "--task", "sequence_classification", "--train", train,
            "--validation", dev, "--validation-text-column", "content", "--max-length", "32", "--r", "2",
            "--batch-size", "16", "--max-steps", "4", "--eval-every", "2", "--no-progress", "--output-dir", str(out)]
    r = subprocess.run([sys.executable, "-m", "fastpeft", *argv], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr
    return out, r.stderr


def test_validation_columns_per_split_and_eval_lines_without_progress_bar(cli_run):
    out, err = cli_run
    cfg = yaml.safe_load(open(out / "config.yaml"))
    assert cfg["data"]["validation"]["text_column"] == "content"
    # --no-progress: no bar, but each evaluation is still reported
    assert "step 2: accuracy=" in err and "step 4: accuracy=" in err


def test_adapter_remembers_its_columns(cli_run, tiny_cls_files, capsys):
    out, _ = cli_run
    dev = tiny_cls_files[1]  # column 'content', as in validation: no --text-column needed
    assert main(["evaluate", "--adapter", str(out / "adapter"), "--data", dev]) == 0
    m = json.loads(capsys.readouterr().out)
    assert {"accuracy", "macro_f1", "loss"} <= set(m)  # (before: "missing column(s) ['sentence']")
    assert main(["predict", "--adapter", str(out / "adapter"), "--data", dev, "--limit", "2"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    info = json.load(open(out / "adapter" / "fastpeft_task.json"))
    assert info["split_data"]["validation"]["text_column"] == "content"


def test_predict_scores(cli_run, tiny_cls_files, capsys):
    out, _ = cli_run
    assert main(["predict", "--adapter", str(out / "adapter"), "--data", tiny_cls_files[1], "--limit", "3",
                 "--scores"]) == 0
    rows = [json.loads(l) for l in capsys.readouterr().out.strip().splitlines()]
    for r in rows:
        assert set(r["scores"]) == {"0", "1"} and sum(r["scores"].values()) == pytest.approx(1, abs=1e-5)
        assert r["prediction"] == max(r["scores"], key=r["scores"].get)


def test_no_traceback_on_a_closed_pipe(cli_run, tiny_cls_files, tmp_path):
    out, _ = cli_run
    big = tmp_path / "big.tsv"
    rows = open(tiny_cls_files[1]).read().splitlines()
    big.write_text("\n".join([rows[0]] + rows[1:] * 40) + "\n")  # enough output to fill the pipe
    cmd = (f"{sys.executable} -m fastpeft predict --adapter {out / 'adapter'} --data {big} | head -n 1")
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert len(r.stdout.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


def test_adapter_of_the_python_trainer_loads_in_evaluate_and_predict(tmp_path, tiny_model_dir, tiny_cls_files,
                                                                     capsys):
    from fastpeft.workflow import Trainer, TrainerConfig
    model, task, tr, dev, tok = make_cls_setup(tiny_model_dir, tiny_cls_files, r=2)
    Trainer(model, task, tr, dev, TrainerConfig(max_steps=2, batch_size=16, output_dir=str(tmp_path / "py"),
                                                progress=False, plot=False), tokenizer=tok).train()
    adapter = tmp_path / "py" / "adapter"
    info = json.load(open(adapter / "fastpeft_task.json"))
    assert info["task"] == "sequence_classification" and info["labels"] == ["0", "1"]
    assert info["model"] == tiny_model_dir
    assert json.load(open(adapter / "adapter_config.json"))["task_type"] == "SEQ_CLS"
    assert main(["evaluate", "--adapter", str(adapter), "--data", tiny_cls_files[1], "--text-column",
                 "content"]) == 0
    assert "accuracy" in json.loads(capsys.readouterr().out)
    assert main(["predict", "--adapter", str(adapter), "--data", tiny_cls_files[0], "--limit", "1"]) == 0


@pytest.mark.parametrize("method", ["lora", "ia3", "adapter", "bitfit", "prefix", "prompt"])
def test_task_type_is_always_written(method, tmp_path, tiny_model_dir):
    from fastpeft.workflow import get_task
    from fastpeft.workflow.pipeline import apply_method
    task = get_task("sequence_classification", labels=["a", "b"])
    spec = {"name": method}
    if method in ("prefix", "prompt"):
        spec["num_virtual_tokens"] = 2
    model = apply_method(task.build_model(tiny_model_dir), spec, task)
    model.save_pretrained(str(tmp_path))
    assert json.load(open(tmp_path / "adapter_config.json"))["task_type"] == "SEQ_CLS"


def test_yaml_data_paths_are_relative_to_the_config_file(tmp_path, monkeypatch):
    d = tmp_path / "configs"
    d.mkdir()
    (d / "c.yaml").write_text(yaml.safe_dump({
        "model": "m", "task": "sequence_classification",
        "data": {"train": "../data/train.tsv", "validation": {"path": "dev.tsv", "text_column": "content"},
                 "test": "/abs/test.tsv"}}))
    monkeypatch.chdir("/")
    cfg = build_config(load_yaml(str(d / "c.yaml")), {})
    assert cfg["data"]["train"] == str(tmp_path / "data" / "train.tsv")
    assert cfg["data"]["validation"]["path"] == str(d / "dev.tsv")
    assert cfg["data"]["test"] == "/abs/test.tsv"
    # a flag stays relative to the working directory
    cfg = build_config(load_yaml(str(d / "c.yaml")), {"data.train": "here.tsv"})
    assert cfg["data"]["train"] == "here.tsv"


def test_example_configs_point_at_the_shared_data():
    for name in ("sst2_lora.yaml", "tiny_quick.yaml", "conll_ner_lora.yaml", "sst2_fewshot.yaml",
                 "sst2_augment.yaml"):
        cfg = load_yaml(os.path.join(ROOT, "examples", name))
        train = cfg["data"]["train"]
        assert os.path.isabs(train) and train.replace(os.sep, "/").split("/")[-3] == "data"
        assert os.path.normpath(train).startswith(os.path.normpath(os.path.join(ROOT, "..", "shared", "data")))


def test_a_bad_metric_is_a_config_error():
    base = {"model": "m", "task": "sequence_classification", "data": {"train": "x.tsv"}}
    with pytest.raises(ConfigError, match=r"trainer.metric: .* no metric 'f1'; expected one of \['accuracy'"):
        build_config(base, {"trainer.metric": "f1"})
    assert build_config(base, {"trainer.metric": "macro_f1"})["trainer"].metric == "macro_f1"
    with pytest.raises(ConfigError, match="no metric 'accuracy'"):
        build_config(dict(base, task="token_classification"), {"trainer.metric": "accuracy"})
