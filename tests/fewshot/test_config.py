"""The fewshot: config section and run_from_config on a tiny TSV."""
import json
import os

import pytest

from fastpeft.fewshot.config import run_from_config, validate_section
from fastpeft.workflow.config import build_config

from . import synthetic, tiny_bert  # noqa: F401  (fixture)


def test_defaults():
    s = validate_section({})
    assert s["shots"] == 8 and s["seeds"] == [0, 1, 2, 3, 4] and s["method"] == "setfit"
    assert s["baselines"] == [] and s["min_words"] == 0 and s["lr"] is None
    s = validate_section({"shots": "4", "seeds": 3, "lr": "1e-3", "method": "prompt_tuning",
                          "baselines": ["head_only", "prompt_tuning"], "prompt_tuning_init": "random"})
    assert s["shots"] == 4 and s["seeds"] == [3] and s["lr"] == 1e-3
    assert s["baselines"] == ["head_only"] and s["prompt_tuning_init"] == "RANDOM"
    assert validate_section(None)["shots"] == 8


@pytest.mark.parametrize("section, key", [
    ({"shots": 0}, "fewshot.shots"),
    ({"shots": 2.5}, "fewshot.shots"),
    ({"seeds": []}, "fewshot.seeds"),
    ({"seeds": [1, 1]}, "fewshot.seeds"),
    ({"method": "knn"}, "fewshot.method"),
    ({"baselines": ["knn"]}, "fewshot.baselines"),
    ({"lr": -1}, "fewshot.lr"),
    ({"lr": "fast"}, "fewshot.lr"),
    ({"lora_dropout": 1.5}, "fewshot.lora_dropout"),
    ({"loss": "triplet"}, "fewshot.loss"),
    ({"shot": 8}, "unknown key"),
    ({"method": "prototype", "lr": 1e-3}, "do not apply to method 'prototype'"),
])
def test_bad_sections(section, key):
    with pytest.raises(ValueError, match=key):
        validate_section(section)


def test_not_a_mapping():
    with pytest.raises(ValueError, match="fewshot"):
        validate_section([1])


def _tsv(path, texts, labels, col="sentence"):
    with open(path, "w") as f:
        f.write(f"label\t{col}\n")
        for t, l in zip(texts, labels):
            f.write(f"{l}\t{t}\n")
    return str(path)


def _cfg(tmp_path, model, fewshot, **data_extra):
    tr_t, tr_l = synthetic(6, seed=0)
    ev_t, ev_l = synthetic(4, seed=1)
    data = {"train": _tsv(tmp_path / "train.tsv", tr_t, tr_l),
            "validation": {"path": _tsv(tmp_path / "dev.tsv", ev_t, ev_l, "content"), "text_column": "content"},
            "max_length": 16}
    data.update(data_extra)
    cfg = build_config({"model": model, "task": "sequence_classification", "data": data,
                        "output_dir": str(tmp_path / "out"), "method": {"name": "lora", "r": 4}})
    cfg["fewshot"] = fewshot
    return cfg


def test_run_from_config_writes_result(tmp_path, tiny_bert):
    cfg = _cfg(tmp_path, tiny_bert, {"shots": 2, "seeds": [0, 1], "method": "setfit", "iterations": 1,
                                     "baselines": ["prototype", "head_only"]})
    logs = []
    res = run_from_config(cfg, log=logs.append)
    path = tmp_path / "out" / "result.json"
    assert path.is_file() and not [p for p in os.listdir(tmp_path / "out") if p.startswith(".tmp")]
    on_disk = json.loads(path.read_text())
    assert on_disk["mean"] == pytest.approx(res["mean"])
    assert res["method"] == "setfit" and res["k"] == 2 and res["eval_examples"] == 8
    assert [r["seed"] for r in res["per_seed"]] == [0, 1]
    assert set(res["baselines"]) == {"prototype", "head_only"}
    # every method saw the same shots per seed
    for b in res["baselines"].values():
        assert [r["shots"] for r in b["per_seed"]] == [r["shots"] for r in res["per_seed"]]
    assert res["fewshot"]["max_length"] == 16
    assert any("setfit seed=1" in line for line in logs)


def test_run_from_config_errors(tmp_path, tiny_bert):
    with pytest.raises(ValueError, match="k=7"):
        run_from_config(_cfg(tmp_path, tiny_bert, {"shots": 7, "seeds": [0], "method": "prototype"}))
    with pytest.raises(ValueError, match="fewshot.method"):
        run_from_config(_cfg(tmp_path, tiny_bert, {"method": "knn"}))
    cfg = _cfg(tmp_path, tiny_bert, {"shots": 1, "method": "prototype"})
    del cfg["data"]["validation"]
    with pytest.raises(ValueError, match="data.validation"):
        run_from_config(cfg)
    cfg = _cfg(tmp_path, tiny_bert, {"shots": 1, "method": "prototype"})
    cfg["task"] = "token_classification"
    with pytest.raises(ValueError, match="task"):
        run_from_config(cfg)
    assert not (tmp_path / "out" / "result.json").exists()
