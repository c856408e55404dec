"""Adapters written by the CLI carry the task's PEFT task type (issue 21): they had ``task_type: null``, so
HF PEFT's ``AutoPeftModelFor*`` could not load them."""
import json

import pytest
import torch
import yaml

import fastpeft
from fastpeft.cli import main


def test_cli_adapter_loads_with_hf_auto_class(tmp_path, tiny_model_dir, tiny_cls_files, capsys):
    peft = pytest.importorskip("peft")
    train, dev = tiny_cls_files
    cfg = {"model": tiny_model_dir, "task": "sequence_classification", "output_dir": str(tmp_path / "run"),
           "data": {"train": train, "validation": {"path": dev, "text_column": "content"}, "max_length": 16},
           "method": {"name": "lora", "r": 2, "target_modules": ["query", "value"]},
           "trainer": {"epochs": 1, "batch_size": 8}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    rc = main(["finetune", "--config", str(tmp_path / "c.yaml"), "--max-steps", "2", "--no-progress"])
    capsys.readouterr()
    assert rc == 0
    adapter = tmp_path / "run" / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["base_model_name_or_path"]
    assert (adapter / "README.md").exists()  # the model card
    hf = peft.AutoPeftModelForSequenceClassification.from_pretrained(str(adapter)).eval()
    fp = fastpeft.AutoPeftModelForSequenceClassification.from_pretrained(str(adapter)).eval()
    assert type(fp).__name__ == "PeftModelForSequenceClassification"
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fp(input_ids=ids).logits, hf(input_ids=ids).logits)
    with pytest.raises(ValueError, match="Expected target PEFT class"):
        fastpeft.AutoPeftModelForCausalLM.from_pretrained(str(adapter))


@pytest.mark.parametrize("task,expected", [("sequence_classification", "SEQ_CLS"),
                                           ("token_classification", "TOKEN_CLS"), ("causal_lm", "CAUSAL_LM")])
def test_every_task_names_its_peft_task_type(task, expected):
    from fastpeft.workflow import get_task
    assert get_task(task).peft_task_type == expected
