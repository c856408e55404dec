"""The ``continual:`` config section: validation errors name ``continual.<key>``, defaults are filled,
and ``run_from_config`` runs a stream of TSV tasks end to end."""
import copy
import json
import os
import random

import pytest

from fastpeft.continual import run_from_config, validate_section
from fastpeft.continual.config import DEFAULTS, strategy_params

from ..helpers import save_tiny_bert

TASKS = [{"name": "a", "data": {"train": "a_train.tsv", "validation": "a_dev.tsv"}},
         {"name": "b", "data": {"train": {"path": "b_train.tsv"}, "validation": {"path": "b_dev.tsv",
                                                                                "text_column": "content"}}}]


def test_defaults_are_filled_and_numbers_coerced():
    out = validate_section({"strategy": "ewc", "tasks": TASKS, "ewc_lambda": "1e3", "replay_size": "50"})
    assert set(out) == set(DEFAULTS)
    assert out["ewc_lambda"] == 1000.0 and out["replay_size"] == 50 and out["lwf_temperature"] == 2.0
    assert out["tasks"][1]["data"]["validation"]["text_column"] == "content"
    assert strategy_params(out, seed=7) == {"ewc_lambda": 1000.0, "ewc_gamma": 1.0, "fisher_samples": 200,
                                            "fisher_mode": "empirical", "seed": 7}
    assert validate_section({"tasks": TASKS})["strategy"] == "naive"


@pytest.mark.parametrize("patch,key", [
    ({"strategy": "magic"}, "continual.strategy"),
    ({"tasks": []}, "continual.tasks"),
    ({"tasks": None, "strategy": "naive"}, "continual.tasks"),
    ({"tasks": "a.tsv"}, "continual.tasks"),
    ({"replay_size": 0}, "continual.replay_size"),
    ({"replay_size": -5}, "continual.replay_size"),
    ({"replay_size": 2.5}, "continual.replay_size"),
    ({"ewc_lambda": -1}, "continual.ewc_lambda"),
    ({"ewc_lambda": "lots"}, "continual.ewc_lambda"),
    ({"ewc_gamma": 1.5}, "continual.ewc_gamma"),
    ({"fisher_samples": 0}, "continual.fisher_samples"),
    ({"fisher_mode": "true"}, "continual.fisher_mode"),
    ({"l2_lambda": -0.5}, "continual.l2_lambda"),
    ({"l2_anchor": "zero"}, "continual.l2_anchor"),
    ({"lwf_temperature": 0}, "continual.lwf_temperature"),
    ({"lwf_alpha": -1}, "continual.lwf_alpha"),
    ({"seed": -1}, "continual.seed"),
    ({"buffer": 10}, "continual: unknown key"),
    ({"tasks": [{"name": "a"}]}, r"continual.tasks\[0\].data"),
    ({"tasks": [{"name": "a.b", "data": {"train": "x", "validation": "y"}}]}, r"continual.tasks\[0\].name"),
    ({"tasks": [{"name": "a", "data": {"train": "x"}}]}, r"continual.tasks\[0\].data.validation"),
    ({"tasks": [{"name": "a", "data": {"train": "x", "validation": "y", "colour": 1}}]},
     r"continual.tasks\[0\].data: unknown key"),
    ({"tasks": [{"name": "a", "data": {"train": {"file": "x"}, "validation": "y"}}]},
     r"continual.tasks\[0\].data.train"),
    ({"tasks": [{"name": "a", "data": {"train": "x", "validation": "y", "train_limit": 0}}]},
     r"continual.tasks\[0\].data.train_limit"),
    ({"tasks": [TASKS[0], TASKS[0]]}, "unique"),
    ({"tasks": [{"name": "a", "data": {"train": "x", "validation": "y"}, "extra": 1}]}, r"continual.tasks\[0\]"),
])
def test_bad_sections_name_the_key(patch, key):
    sec = {"strategy": "replay", "tasks": copy.deepcopy(TASKS)}
    sec.update(patch)
    with pytest.raises(ValueError, match=key):
        validate_section(sec)


def test_missing_or_wrong_section():
    with pytest.raises(ValueError, match="continual"):
        validate_section(None)
    with pytest.raises(ValueError, match="continual"):
        validate_section(["ewc"])
    with pytest.raises(ValueError, match="continual"):
        run_from_config({"model": "x", "task": "sequence_classification"})


# --------------------------------------------------------------------------- end to end on TSV files

POS = ["good", "great", "lovely", "superb"]
NEG = ["bad", "awful", "boring", "dull"]
FILL = ["the", "movie", "was", "a", "plot", "film", "story", "and"]


def _rows(n, seed, flip):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        y = rng.randint(0, 1)
        words = [rng.choice(FILL) for _ in range(rng.randint(2, 6))]
        words.insert(rng.randint(0, len(words)), rng.choice(POS if y else NEG))
        rows.append((1 - y if flip else y, " ".join(words)))
    return rows


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert_cl"), max_position_embeddings=64)


@pytest.mark.parametrize("strategy", ["replay", "per_task_adapters"])
def test_run_from_config_on_tsv_files(tmp_path, tiny_model_dir, strategy):
    # task a: sentiment; task b: the same sentences with flipped labels (conflicting tasks)
    for name, flip in (("a", False), ("b", True)):
        (tmp_path / f"{name}_train.tsv").write_text(
            "label\tsentence\n" + "".join(f"{y}\t{s}\n" for y, s in _rows(48, 1 + flip, flip)))
        col = "content" if name == "b" else "sentence"
        (tmp_path / f"{name}_dev.tsv").write_text(
            f"label\t{col}\n" + "".join(f"{y}\t{s}\n" for y, s in _rows(16, 3 + flip, flip)))
    tasks = copy.deepcopy(TASKS)
    for t in tasks:
        for split, v in t["data"].items():
            if isinstance(v, str):
                t["data"][split] = str(tmp_path / v)
            else:
                v["path"] = str(tmp_path / v["path"])
    out = tmp_path / "run"
    cfg = {"model": tiny_model_dir, "task": "sequence_classification", "output_dir": str(out),
           "data": {"max_length": 32, "train": "ignored.tsv"},
           "method": {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]},
           "trainer": {"lr": 1e-2, "epochs": 1, "batch_size": 16, "progress": False, "seed": 0},
           "continual": {"strategy": strategy, "tasks": tasks, "replay_size": 8}}
    lines = []
    result = run_from_config(cfg, log=lines.append)
    assert len(lines) == 2 and lines[0].startswith(f"[continual/{strategy}] task 0 a:")
    assert result["tasks"] == ["a", "b"] and len(result["matrix"]) == 2
    assert result["labels"] == ["0", "1"] and result["config"]["continual"]["strategy"] == strategy
    with open(out / "result.json") as f:
        saved = json.load(f)
    assert saved["matrix"] == result["matrix"] and saved["forgetting"] == result["forgetting"]
    assert os.path.isfile(out / "adapter" / "adapter_model.safetensors")
    if strategy == "replay":
        assert result["per_task"][1]["train_examples"] == 48 + 8
    else:
        assert result["forgetting"] == 0.0
        assert os.path.isfile(out / "adapter" / "task1_b" / "adapter_config.json")
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_run_from_config_token_classification(tmp_path, tiny_model_dir):
    """A stream of NER tasks (metric: entity F1): the same runner, replay and EWC's Fisher over tokens."""
    sents = {"a": [[("John", "B-PER"), ("visited", "O"), ("Paris", "B-LOC"), (".", "O")],
                   [("Mary", "B-PER"), ("left", "O"), ("Rome", "B-LOC")]],
             "b": [[("Acme", "B-ORG"), ("hired", "O"), ("Peter", "B-PER")],
                   [("Google", "B-ORG"), ("bought", "O"), ("IBM", "B-ORG")]]}
    tasks = []
    for name, ss in sents.items():
        text = "\n".join("\n".join(f"{w} {t} 0" for w, t in s) + "\n" for s in ss * 4)
        (tmp_path / f"{name}.txt").write_text(text)
        tasks.append({"name": name, "data": {"train": str(tmp_path / f"{name}.txt"),
                                             "validation": str(tmp_path / f"{name}.txt")}})
    for strategy in ("ewc", "replay"):
        cfg = {"model": tiny_model_dir, "task": "token_classification", "output_dir": None,
               "data": {"max_length": 16, "format": "conll"},
               "method": {"name": "lora", "r": 2, "lora_alpha": 4, "target_modules": ["query", "value"]},
               "trainer": {"lr": 1e-2, "epochs": 1, "batch_size": 4, "progress": False},
               "continual": {"strategy": strategy, "tasks": tasks, "replay_size": 2, "fisher_samples": 3}}
        result = run_from_config(cfg)
        assert result["metric"] == "f1" and len(result["matrix"]) == 2
        assert result["labels"] == ["O", "B-LOC", "B-ORG", "B-PER"]
