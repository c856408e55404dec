"""The augment: / fewshot: / continual: sections of a `fastpeft finetune` config: validation, dispatch from
the pipeline and the CLI, and the printed summaries (the packages themselves are tested in tests/augment,
tests/fewshot, tests/continual)."""
import json
import os

import pytest
import yaml

from fastpeft.cli import main
from fastpeft.workflow import build_config, finetune
from fastpeft.workflow.config import ConfigError


def _base(tiny_model_dir, tiny_cls_files, out, **extra):
    train, dev = tiny_cls_files
    cfg = {"model": tiny_model_dir, "task": "sequence_classification", "output_dir": str(out),
           "data": {"train": train, "validation": {"path": dev, "text_column": "content"}, "max_length": 32},
           "method": {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]},
           "trainer": {"lr": 5e-3, "max_steps": 3, "batch_size": 16, "progress": False, "plot": False}}
    cfg.update(extra)
    return cfg


def test_section_validation_errors(tiny_model_dir, tiny_cls_files, tmp_path):
    base = _base(tiny_model_dir, tiny_cls_files, tmp_path)
    with pytest.raises(ConfigError, match=r"augment: expected a list"):
        build_config(dict(base, augment={"name": "mixup"}))
    with pytest.raises(ConfigError, match=r"augment\[1\]: expected a mapping with 'name'"):
        build_config(dict(base, augment=[{"name": "mixup"}, {"alpha": 1}]))
    with pytest.raises(ConfigError, match=r"trainer\.lr: expected a number, got True"):
        build_config(dict(base, trainer={"lr": True}))  # one number parser for every section
    with pytest.raises(ConfigError, match=r"continual\.ewc_lambda: expected a number, got \[1\]"):
        build_config(dict(base, continual={"ewc_lambda": [1], "tasks": [{"name": "a", "data": {
            "train": "x.tsv", "validation": "y.tsv"}}]}))
    with pytest.raises(ConfigError, match="fewshot and continual: choose one"):
        build_config(dict(base, fewshot={"shots": 2}, continual={"tasks": []}))
    with pytest.raises(ConfigError, match=r"fewshot\.shots"):
        build_config(dict(base, fewshot={"shots": 0}))
    with pytest.raises(ConfigError, match=r"continual\.replay_size"):
        build_config(dict(base, continual={"strategy": "replay", "replay_size": 0,
                                           "tasks": [{"name": "a", "data": {"train": "x.tsv",
                                                                            "validation": "y.tsv"}}]}))
    # a continual stream names each task's files: the top-level data.train is not required
    no_train = dict(base, data={"max_length": 32},
                    continual={"tasks": [{"name": "a", "data": {"train": "x.tsv", "validation": "y.tsv"}}]})
    cfg = build_config(no_train)
    assert cfg["continual"]["strategy"] == "naive" and cfg["continual"]["replay_size"] > 0


def test_augment_section_reaches_the_trainer(tiny_model_dir, tiny_cls_files, tmp_path):
    plain = finetune(build_config(_base(tiny_model_dir, tiny_cls_files, tmp_path / "a")))
    aug = finetune(build_config(_base(tiny_model_dir, tiny_cls_files, tmp_path / "b",
                                      augment=[{"name": "token_masking", "p": 0.5},
                                               {"name": "mixup", "alpha": 0.4}])))
    names = [type(c).__name__ for c in aug["trainer"].callbacks]
    assert len(names) == 2 and aug["trainer"].loss_fn is not None  # mixup replaces the loss
    assert plain["losses"][0] != pytest.approx(aug["losses"][0], rel=1e-6)
    assert yaml.safe_load(open(tmp_path / "b" / "config.yaml"))["augment"][1]["name"] == "mixup"
    with pytest.raises(ValueError, match=r"augment\[0\]\.name: unknown augmentation 'shuffle'"):
        finetune(build_config(_base(tiny_model_dir, tiny_cls_files, tmp_path / "c", augment=[{"name": "shuffle"}])))


def test_cli_fewshot_section(tiny_model_dir, tiny_cls_files, tmp_path, capsys):
    cfg = _base(tiny_model_dir, tiny_cls_files, tmp_path / "fs",
                fewshot={"shots": 2, "seeds": [0, 1], "method": "prototype", "baselines": ["head_only"]})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["finetune", "--config", str(tmp_path / "c.yaml")]) == 0
    out = capsys.readouterr()
    summary = json.loads(out.out)  # progress went to stderr
    assert summary["method"] == "prototype" and summary["k"] == 2 and len(summary["per_seed"]) == 2
    assert 0.0 <= summary["mean"] <= 1.0 and set(summary["baselines"]) == {"head_only"}
    saved = json.load(open(tmp_path / "fs" / "result.json"))
    assert saved["mean"] == pytest.approx(summary["mean"])
    cfg["fewshot"]["shots"] = 1000  # more than a class has
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["finetune", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "k" in capsys.readouterr().err


def test_cli_continual_section(tiny_model_dir, tiny_cls_files, tmp_path, capsys):
    train, dev = tiny_cls_files
    task = {"train": train, "validation": {"path": dev, "text_column": "content"}, "train_limit": 32}
    cfg = _base(tiny_model_dir, tiny_cls_files, tmp_path / "cl",
                continual={"strategy": "replay", "replay_size": 16,
                           "tasks": [{"name": "first", "data": dict(task)}, {"name": "second", "data": dict(task)}]})
    del cfg["data"]["train"], cfg["data"]["validation"]
    cfg["trainer"]["max_steps"] = 2
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["finetune", "--config", str(tmp_path / "c.yaml")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["strategy"] == "replay" and summary["tasks"] == ["first", "second"]
    assert len(summary["matrix"]) == 2 and all(len(row) == 2 for row in summary["matrix"])
    assert {"result.json", "matrix.png"} <= set(os.listdir(tmp_path / "cl"))
