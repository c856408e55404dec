"""``fastpeft finetune / evaluate / predict`` end to end on tiny data, and config errors."""
import json
import os

import pytest
import yaml

from fastpeft.cli import main
from fastpeft.workflow.config import ConfigError, build_config


def test_cli_finetune_evaluate_predict_cls(tmp_path, tiny_model_dir, tiny_cls_files, capsys):
    train, dev = tiny_cls_files
    cfg = {"model": tiny_model_dir, "task": "sequence_classification", "output_dir": str(tmp_path / "run"),
           "data": {"train": train, "validation": {"path": dev, "text_column": "content"}, "max_length": 32},
           "method": {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]},
           "trainer": {"lr": 5e-3, "epochs": 1, "batch_size": 16, "eval_every": 3}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    rc = main(["finetune", "--config", str(tmp_path / "c.yaml"), "--max-steps", "4", "--no-progress",
               "--set", "trainer.patience=5"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 4 and "accuracy" in summary["final_metrics"]
    run = tmp_path / "run"
    assert {"adapter", "metrics.jsonl", "curves.png", "config.yaml", "result.json"} <= set(os.listdir(run))
    adapter = run / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "fastpeft_task.json"} <= set(os.listdir(adapter))
    acfg = json.load(open(adapter / "adapter_config.json"))
    assert acfg["r"] == 4 and "classifier" in (acfg.get("modules_to_save") or [])
    assert yaml.safe_load(open(run / "config.yaml"))["trainer"]["max_steps"] == 4

    rc = main(["evaluate", "--adapter", str(adapter), "--data", dev, "--text-column", "content",
               "--output", str(tmp_path / "m.json")])
    assert rc == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["accuracy"] == pytest.approx(summary["final_metrics"]["accuracy"])
    assert json.load(open(tmp_path / "m.json")) == metrics

    rc = main(["predict", "--adapter", str(adapter), "--data", dev, "--text-column", "content", "--limit", "5"])
    assert rc == 0
    preds = [json.loads(l) for l in capsys.readouterr().out.strip().splitlines()]
    assert len(preds) == 5 and all(p["prediction"] in ("0", "1") for p in preds)

    # errors are reported with file and line, exit code 2
    bad = tmp_path / "bad.tsv"
    bad.write_text("label\tcontent\n0\tfine\n7\tnope\n")
    assert main(["evaluate", "--adapter", str(adapter), "--data", str(bad), "--text-column", "content"]) == 2
    assert "bad.tsv:3: unknown label '7'" in capsys.readouterr().err


def test_cli_ner_flags_only(tmp_path, tiny_model_dir, tiny_conll_files, capsys):
    train, valid = tiny_conll_files
    rc = main(["finetune", "--model", tiny_model_dir, "--task", "token_classification", "--train", train,
               "--validation", valid, "--output-dir", str(tmp_path / "ner"), "--max-steps", "3", "--batch-size", "8",
               "--r", "4", "--lr", "1e-2", "--no-progress", "--max-length", "32"])
    assert rc == 0
    assert "f1" in json.loads(capsys.readouterr().out)["final_metrics"]
    acfg = json.load(open(tmp_path / "ner" / "adapter" / "adapter_config.json"))
    tm = acfg["target_modules"]
    assert tm == "all-linear" or (isinstance(tm, list) and len(tm) >= 4)
    assert main(["predict", "--adapter", str(tmp_path / "ner" / "adapter"), "--data", valid, "--limit", "2"]) == 0
    preds = [json.loads(l) for l in capsys.readouterr().out.strip().splitlines()]
    assert preds[0]["tokens"][0] == "John" and len(preds[0]["tags"]) == len(preds[0]["tokens"])


def test_config_validation_and_help(tmp_path, capsys):
    base = {"model": "m", "task": "sequence_classification", "data": {"train": "x.tsv"}}
    cfg = build_config(base, {"trainer.lr": "2e-4", "data.validation": "d.tsv", "data.validation.text_column": "content"})
    assert cfg["trainer"].lr == pytest.approx(2e-4)
    assert cfg["data"]["validation"] == {"path": "d.tsv", "text_column": "content"}
    with pytest.raises(ConfigError, match="data.validation: expected a path or a mapping with 'path'"):
        build_config(base, {"data.validation.text_column": "content"})
    with pytest.raises(ConfigError, match="unknown top-level"):
        build_config(dict(base, optimiser="adam"))
    with pytest.raises(ConfigError, match=r"trainer: unknown key\(s\) \['lrate'\]"):
        build_config(dict(base, trainer={"lrate": 1}))
    with pytest.raises(ConfigError, match="data.train: required"):
        build_config({"model": "m", "task": "sequence_classification"})
    with pytest.raises(ConfigError, match="task: unknown task"):
        build_config(dict(base, task="no_such_task"))
    with pytest.raises(ConfigError, match="trainer.scheduler"):
        build_config(dict(base, trainer={"scheduler": "step"}))
    assert main(["finetune", "--model", "m", "--task", "nope", "--train", "x"]) == 2
    assert "unknown task" in capsys.readouterr().err
    for cmd in ("finetune", "evaluate", "predict"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        out = capsys.readouterr().out
        assert "examples:" in out and "--" in out


def test_example_configs_parse():
    root = os.path.join(os.path.dirname(__file__), "..", "..", "examples")
    names = [n for n in os.listdir(root) if n.endswith(".yaml")]
    assert {"sst2_lora.yaml", "conll_ner_lora.yaml", "tiny_quick.yaml"} <= set(names)
    for n in names:
        build_config(yaml.safe_load(open(os.path.join(root, n))))
