"""Every endpoint through an in-process client (FastAPI's TestClient: the app, its lifespan and the
scheduler run in this process), answers checked against the adapters run alone offline."""
from __future__ import annotations

import argparse
import json
import os
import re
import threading

import pytest

from .conftest import NER_LABELS, PROMPTS, TEXTS, minilm

from fastapi.testclient import TestClient  # noqa: E402

from fastpeft.serve.app import create_app  # noqa: E402
from fastpeft.serve.cli import add_arguments, build_registry  # noqa: E402

KEY = "s3cret"


def _args(*argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


@pytest.fixture(scope="module")
def cls_registry(serve_files):
    f = serve_files
    return build_registry(_args("--model", str(minilm.MODEL_DIR), "--adapter-dir", f["root"],
                               "--adapter", f"sst_a={f['sst_a']}", "--adapter", f"sst_b={f['sst_b']}",
                               "--adapter", f"ner={f['ner']}", "--adapter", f"bad={f['root']}/broken"))


@pytest.fixture(scope="module")
def cls_app(cls_registry):
    return create_app(cls_registry, api_key=KEY, window_ms=20)


@pytest.fixture(scope="module")
def cls_client(cls_app):
    with TestClient(cls_app, headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


@pytest.fixture(scope="module")
def lm_client(serve_files):
    f = serve_files
    reg = build_registry(_args("--model", f["llama"], "--adapter", f"gen_a={f['gen_a']}",
                               "--adapter", f"gen_b={f['gen_b']}"))
    with TestClient(create_app(reg, window_ms=20)) as c:
        yield c


def _concurrently(fn, args):
    out = [None] * len(args)

    def run(i):
        out[i] = fn(*args[i])

    ts = [threading.Thread(target=run, args=(i,)) for i in range(len(args))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return out


# --------------------------------------------------------------------------- classification

def test_classify_equals_offline_each_adapter(cls_client, offline):
    for name in ("sst_a", "sst_b"):
        r = cls_client.post("/v1/classify", json={"model": name, "input": TEXTS})
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        for d, ref in zip(data, offline[name]):
            assert d["label"] == ref["label"]
            assert [d["scores"][l] for l in ("negative", "positive")] == pytest.approx(ref["probs"], abs=1e-4)
    r = cls_client.post("/v1/classify", json={"model": "ner", "input": TEXTS})
    assert r.status_code == 200, r.text
    assert [d["tags"] for d in r.json()["data"]] == offline["ner"]
    assert all(set(d["tags"]) <= set(NER_LABELS) for d in r.json()["data"])
    r = cls_client.post("/v1/classify", json={"model": "ner", "tokens": [TEXTS[2].split()]})
    assert r.json()["data"][0]["tags"] == offline["ner"][2]


def test_concurrent_mixed_adapters_are_batched_and_exact(cls_client, cls_app, offline):
    jobs = [(n, i) for i in range(len(TEXTS)) for n in ("sst_a", "sst_b")] * 2
    res = _concurrently(lambda n, i: cls_client.post("/v1/classify", json={"model": n, "input": TEXTS[i]}), jobs)
    for (n, i), r in zip(jobs, res):
        assert r.status_code == 200, r.text
        d = r.json()["data"][0]
        assert d["label"] == offline[n][i]["label"]
        assert [d["scores"]["negative"], d["scores"]["positive"]] == pytest.approx(offline[n][i]["probs"], abs=1e-4)
    text = cls_client.get("/metrics").text
    # some batch held more than one request (16 requests from 16 threads within a 20 ms window)
    counts = {re.search(r'le="([^"]+)"', l).group(1): float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
              if l.startswith("fastpeft_batch_size_bucket") and "sequence_classification" in l}
    assert counts["1.0"] < counts["+Inf"], text


def test_bad_input(cls_client):
    r = cls_client.post("/v1/classify", json={"model": "nope", "input": "x"})
    assert r.status_code == 404 and "sst_a" in r.json()["error"]["message"] and "ner" in r.json()["error"]["message"]
    r = cls_client.post("/v1/classify", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = cls_client.post("/v1/classify", json={"input": "x"})
    assert r.status_code == 400 and "model" in r.json()["error"]["message"], r.text
    assert r.json()["error"]["param"] == "model"
    r = cls_client.post("/v1/classify", json={"model": "sst_a"})
    assert r.status_code == 400 and "input" in r.json()["error"]["message"]
    r = cls_client.post("/v1/classify", json={"model": "sst_a", "input": "word " * 600})
    assert r.status_code == 400 and "maximum length of 512" in r.json()["error"]["message"]
    r = cls_client.post("/v1/completions", json={"model": "sst_a", "prompt": "x"})
    assert r.status_code in (400, 404) and "sst_a" in r.json()["error"]["message"]


def test_api_key(cls_registry):
    with TestClient(create_app(cls_registry, api_key=KEY)) as c:
        assert c.post("/v1/classify", json={"model": "sst_a", "input": "x"}).status_code == 401
        assert c.get("/v1/adapters", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/metrics").status_code == 401
        assert c.get("/health").status_code == 200      # liveness and the page need no key
        assert c.get("/").status_code == 200
        assert c.get("/v1/adapters", headers={"X-API-Key": KEY}).status_code == 200


def test_adapters_list_load_unload(cls_client, serve_files, offline):
    listed = cls_client.get("/v1/adapters").json()
    assert {a["id"] for a in listed["data"]} == {"sst_a", "sst_b", "ner"}
    assert listed["load_errors"] and listed["load_errors"][0]["name"] == "bad"   # reported; the others serve
    assert {a["id"]: a["labels"] for a in listed["data"]}["ner"] == NER_LABELS
    # load a copy of sst_a under a new name (relative to --adapter-dir), use it, unload it
    r = cls_client.post("/v1/adapters", json={"name": "sst_c", "path": "sst_a"})
    assert r.status_code == 201, r.text
    d = cls_client.post("/v1/classify", json={"model": "sst_c", "input": TEXTS[0]}).json()["data"][0]
    assert d["label"] == offline["sst_a"][0]["label"]
    assert cls_client.post("/v1/adapters", json={"name": "sst_c", "path": "sst_b"}).status_code == 409
    assert cls_client.delete("/v1/adapters/sst_c").status_code == 200
    assert cls_client.post("/v1/classify", json={"model": "sst_c", "input": "x"}).status_code == 404
    assert cls_client.delete("/v1/adapters/sst_c").status_code == 404
    # the others are untouched
    d = cls_client.post("/v1/classify", json={"model": "sst_b", "input": TEXTS[1]}).json()["data"][0]
    assert d["label"] == offline["sst_b"][1]["label"]
    # the last adapter of a base: unloaded (LoRA layers removed), loaded again from its start path
    assert cls_client.delete("/v1/adapters/ner").status_code == 200
    assert cls_client.post("/v1/classify", json={"model": "ner", "input": "x"}).status_code == 404
    r = cls_client.post("/v1/adapters", json={"name": "ner", "path": serve_files["ner"]})
    assert r.status_code == 201, r.text
    r = cls_client.post("/v1/classify", json={"model": "ner", "input": TEXTS})
    assert [d["tags"] for d in r.json()["data"]] == offline["ner"]


def test_cli_errors(capsys, serve_files):
    from fastpeft.cli import main
    assert main(["serve", "--model", "/no/such/model"]) == 2
    assert "neither a bundled name" in capsys.readouterr().err
    assert main(["serve", "--model", str(minilm.MODEL_DIR), "--adapter", "no-equals-sign"]) == 2
    assert "NAME=PATH" in capsys.readouterr().err
    assert main(["serve", "--model", str(minilm.MODEL_DIR), "--adapter-dir", "/no/such/dir"]) == 2
    assert "--adapter-dir" in capsys.readouterr().err


def test_adapter_paths_stay_under_start_dirs(cls_client, serve_files):
    outside = os.path.join(os.path.dirname(serve_files["root"]), "outside")
    for path in ("../outside", outside, "/etc", "sst_a/../../outside"):
        r = cls_client.post("/v1/adapters", json={"name": "x", "path": path})
        assert r.status_code == 403, (path, r.text)
    os.symlink(outside, os.path.join(serve_files["root"], "link_out"))
    try:
        assert cls_client.post("/v1/adapters", json={"name": "x", "path": "link_out"}).status_code == 403
    finally:
        os.unlink(os.path.join(serve_files["root"], "link_out"))
    r = cls_client.post("/v1/adapters", json={"name": "x", "path": "broken"})
    assert r.status_code == 400 and "broken" in r.json()["error"]["message"]
    r = cls_client.post("/v1/adapters", json={"name": "../x", "path": "sst_a"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "name"
    r = cls_client.post("/v1/adapters", json={"name": "x"})
    assert r.status_code == 400 and "path" in r.json()["error"]["message"]
    assert {a["id"] for a in cls_client.get("/v1/adapters").json()["data"]} == {"sst_a", "sst_b", "ner"}


def test_health_metrics_page(cls_client):
    h = cls_client.get("/health").json()
    assert h["status"] == "ok" and h["adapters"] == ["ner", "sst_a", "sst_b"]
    cls_client.post("/v1/classify", json={"model": "sst_a", "input": "x"})
    m = cls_client.get("/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    for name in ("fastpeft_requests_total", "fastpeft_request_latency_seconds_bucket", "fastpeft_batch_size_bucket",
                 "fastpeft_loaded_adapters 3.0", 'adapter="sst_a"'):
        assert name in m.text, name
    cls_client.post("/v1/classify", json={"model": "made-up-name", "input": "x"})
    cls_client.get("/v1/no/such/path")
    m = cls_client.get("/metrics").text
    assert "made-up-name" not in m and "/v1/no/such/path" not in m   # labels: loaded adapters and routes only
    assert 'endpoint="other"' in m and 'adapter="",endpoint="/v1/classify",status="404"' in m
    page = cls_client.get("/")
    assert page.status_code == 200 and "<textarea" in page.text and "/v1/classify" in page.text


def test_queue_full_and_timeout(cls_registry):
    reg = cls_registry
    gate = threading.Event()
    with TestClient(create_app(reg, max_queue=1, timeout_s=1.0)) as c:
        group = reg.groups[("sequence_classification", 2)]
        group.lock.acquire()  # the model is busy: the first request waits
        try:
            t = threading.Thread(target=lambda: gate.set() or c.post("/v1/classify",
                                                                     json={"model": "sst_a", "input": "x"}))
            t.start()
            gate.wait()
            import time
            for _ in range(100):
                if c.get("/health").json()["queue"] == 1:
                    break
                time.sleep(0.02)
            r = c.post("/v1/classify", json={"model": "sst_b", "input": "y"})
            assert r.status_code == 503 and "queue is full" in r.json()["error"]["message"]
            t.join()
        finally:
            group.lock.release()
    with TestClient(create_app(reg, timeout_s=0.5)) as c:
        group.lock.acquire()
        try:
            r = c.post("/v1/classify", json={"model": "sst_a", "input": "x"})
            assert r.status_code == 504
        finally:
            group.lock.release()


# --------------------------------------------------------------------------- generation

def test_completions_equal_offline(lm_client, offline):
    for name in ("gen_a", "gen_b", "base"):
        r = lm_client.post("/v1/completions", json={"model": name, "prompt": PROMPTS, "max_tokens": 8,
                                                    "temperature": 0})
        assert r.status_code == 200, r.text
        j = r.json()
        assert [c["text"] for c in j["choices"]] == offline[name], name
        assert j["usage"]["completion_tokens"] > 0
    assert offline["gen_a"] != offline["gen_b"] != offline["base"]  # the adapters matter


def test_concurrent_mixed_generation(lm_client, offline):
    jobs = [(n, i) for n in ("gen_a", "gen_b", "base") for i in range(len(PROMPTS))]
    res = _concurrently(lambda n, i: lm_client.post("/v1/completions", json={
        "model": n, "prompt": PROMPTS[i], "max_tokens": 8, "temperature": 0}), jobs)
    for (n, i), r in zip(jobs, res):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == offline[n][i], (n, i)


def test_stop_max_tokens_and_streaming(lm_client, offline):
    full = offline["gen_a"][0]
    r = lm_client.post("/v1/completions", json={"model": "gen_a", "prompt": PROMPTS[0], "max_tokens": 2,
                                                "temperature": 0}).json()
    assert r["choices"][0]["finish_reason"] == "length" and full.startswith(r["choices"][0]["text"])
    stop = full.split()[1]
    r = lm_client.post("/v1/completions", json={"model": "gen_a", "prompt": PROMPTS[0], "max_tokens": 8,
                                                "temperature": 0, "stop": [stop]}).json()
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["choices"][0]["text"] == full[:full.index(stop)]
    with lm_client.stream("POST", "/v1/completions", json={"model": "gen_b", "prompt": PROMPTS[1], "max_tokens": 8,
                                                           "temperature": 0, "stream": True}) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        events = [l[6:] for l in s.iter_lines() if l.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == offline["gen_b"][1]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    # streamed with a stop string: the text before it, never a piece of the stop string itself
    with lm_client.stream("POST", "/v1/completions", json={"model": "gen_a", "prompt": PROMPTS[0], "max_tokens": 8,
                                                           "temperature": 0, "stop": stop, "stream": True}) as s:
        chunks = [json.loads(l[6:]) for l in s.iter_lines() if l.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == full[:full.index(stop)]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_chat_completions(lm_client):
    body = {"model": "gen_a", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5, "temperature": 0}
    r = lm_client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["object"] == "chat.completion" and j["choices"][0]["message"]["role"] == "assistant"
    same = lm_client.post("/v1/completions", json={"model": "gen_a", "prompt": "user: hello\nassistant:",
                                                   "max_tokens": 5, "temperature": 0}).json()
    assert j["choices"][0]["message"]["content"] == same["choices"][0]["text"]
    with lm_client.stream("POST", "/v1/chat/completions", json=dict(body, stream=True)) as s:
        events = [l[6:] for l in s.iter_lines() if l.startswith("data: ")]
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == j["choices"][0]["message"]["content"]
    r = lm_client.post("/v1/chat/completions", json={"model": "gen_a", "messages": [{"role": "robot", "content": "x"}]})
    assert r.status_code == 400 and "messages.0.role" in r.json()["error"]["message"]


def test_generation_bad_input(lm_client):
    r = lm_client.post("/v1/completions", json={"model": "gen_c", "prompt": "x"})
    assert r.status_code == 404 and "gen_a" in r.json()["error"]["message"] and "base" in r.json()["error"]["message"]
    r = lm_client.post("/v1/completions", json={"model": "gen_a", "prompt": "word " * 70, "max_tokens": 4})
    assert r.status_code == 400 and "maximum length of 64" in r.json()["error"]["message"]
    r = lm_client.post("/v1/completions", json={"model": "gen_a", "prompt": "x", "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = lm_client.post("/v1/completions", json={"model": "gen_a"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


# --------------------------------------------------------------------------- one call per mixed batch, or the fallback

class _NoMixedBatches:
    """A model that refuses ``adapter_names`` (as fastpeft did before mixed batches, and as other models do)."""

    def __init__(self, model):
        self.__dict__["_m"] = model

    def __getattr__(self, name):
        return getattr(self._m, name)

    def __call__(self, *args, adapter_names=None, **kwargs):
        if adapter_names is not None:
            raise NotImplementedError("adapter_names: no mixed-adapter batches here")
        return self._m(*args, **kwargs)

    def generate(self, *args, adapter_names=None, **kwargs):
        if adapter_names is not None:
            raise TypeError("generate() got an unexpected keyword argument 'adapter_names'")
        return self._m.generate(*args, **kwargs)


def _burst(client, group, fn, jobs):
    """Run ``jobs`` concurrently while ``group``'s model is held busy until all of them are queued, so that
    they meet in one batch (mixed adapters) whatever the machine's timing."""
    import time
    out = {}
    with group.lock:
        t = threading.Thread(target=lambda: out.update(r=_concurrently(fn, jobs)))
        t.start()
        for _ in range(500):
            if client.get("/health").json()["queue"] >= len(jobs):
                break
            time.sleep(0.01)
    t.join()
    return out["r"]


def test_mixed_batches_go_through_the_model_in_one_call(cls_client, cls_registry, lm_client, offline):
    jobs = [(n, i) for i in range(len(TEXTS)) for n in ("sst_a", "sst_b")]
    group = cls_registry.groups[("sequence_classification", 2)]
    res = _burst(cls_client, group, lambda n, i: cls_client.post("/v1/classify", json={"model": n, "input": TEXTS[i]}),
                 jobs)
    assert [r.json()["data"][0]["label"] for r in res] == [offline[n][i]["label"] for n, i in jobs]
    assert group.multi_forward is True
    group = lm_client.app.state.registry.groups[("causal_lm", 0)]
    jobs = [(n, i) for n in ("gen_a", "gen_b", "base") for i in range(len(PROMPTS))]
    res = _burst(lm_client, group, lambda n, i: lm_client.post("/v1/completions", json={
        "model": n, "prompt": PROMPTS[i], "max_tokens": 8, "temperature": 0}), jobs)
    assert [r.json()["choices"][0]["text"] for r in res] == [offline[n][i] for n, i in jobs]
    assert group.multi_generate is True


def test_fallback_per_adapter_when_the_model_refuses_mixed_batches(cls_client, cls_registry, lm_client, offline):
    groups = [cls_registry.groups[("sequence_classification", 2)], lm_client.app.state.registry.groups[("causal_lm", 0)]]
    saved = [(g.model, g.multi_forward, g.multi_generate) for g in groups]
    for g in groups:
        with g.lock:
            g.model, g.multi_forward, g.multi_generate = _NoMixedBatches(g.model), None, None
    try:
        jobs = [(n, i) for i in range(len(TEXTS)) for n in ("sst_a", "sst_b")]
        res = _burst(cls_client, groups[0], lambda n, i: cls_client.post("/v1/classify", json={
            "model": n, "input": TEXTS[i]}), jobs)
        for (n, i), r in zip(jobs, res):
            d = r.json()["data"][0]
            assert d["label"] == offline[n][i]["label"]
            assert [d["scores"]["negative"], d["scores"]["positive"]] == pytest.approx(offline[n][i]["probs"], abs=1e-4)
        jobs = [(n, i) for n in ("gen_a", "gen_b", "base") for i in range(len(PROMPTS))]
        res = _burst(lm_client, groups[1], lambda n, i: lm_client.post("/v1/completions", json={
            "model": n, "prompt": PROMPTS[i], "max_tokens": 8, "temperature": 0}), jobs)
        assert [r.json()["choices"][0]["text"] for r in res] == [offline[n][i] for n, i in jobs]
        assert groups[0].multi_forward is False
        assert groups[1].multi_generate is False
    finally:
        for g, (m, f, gen) in zip(groups, saved):
            with g.lock:
                g.model, g.multi_forward, g.multi_generate = m, f, gen
