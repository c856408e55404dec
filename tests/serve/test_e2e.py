"""The real server (``python -m fastpeft serve`` on a free loopback port) answers as each adapter does
alone offline, under concurrent mixed-adapter load; SIGTERM lets a request in flight finish."""
import concurrent.futures
import threading
import time

import pytest

from .conftest import CLS_KEY, PROMPTS, TEXTS, LiveServer

httpx = pytest.importorskip("httpx")


def _served(metrics_text, adapter) -> float:
    for line in metrics_text.splitlines():
        if line.startswith("fastpeft_requests_total{") and f'adapter="{adapter}"' in line and 'status="200"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_concurrent_mixed_classification_equals_offline(cls_server, offline):
    h = {"Authorization": f"Bearer {CLS_KEY}"}
    assert httpx.post(cls_server.url + "/v1/classify", json={"model": "sst_a", "input": "x"}, timeout=30).status_code == 401
    before = _served(httpx.get(cls_server.url + "/metrics", headers=h, timeout=30).text, "sst_b")
    jobs = [(n, i) for _ in range(3) for n in ("sst_a", "sst_b", "ner") for i in range(len(TEXTS))]

    def ask(job):
        n, i = job
        r = httpx.post(cls_server.url + "/v1/classify", json={"model": n, "input": TEXTS[i]}, headers=h, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["data"][0]

    with concurrent.futures.ThreadPoolExecutor(12) as ex:
        answers = list(ex.map(ask, jobs))
    for (n, i), a in zip(jobs, answers):
        if n == "ner":
            assert a["tags"] == offline["ner"][i]
        else:
            assert a["label"] == offline[n][i]["label"]
            assert [a["scores"]["negative"], a["scores"]["positive"]] == pytest.approx(offline[n][i]["probs"], abs=1e-4)
    m = httpx.get(cls_server.url + "/metrics", headers=h, timeout=30).text
    assert _served(m, "sst_b") - before == 12, m
    assert "fastpeft_loaded_adapters 3.0" in m


def test_generation_equals_offline_and_sigterm_finishes_in_flight(serve_files, offline, tmp_path):
    f = serve_files
    s = LiveServer(["--model", f["llama"], "--adapter", f"gen_a={f['gen_a']}", "--adapter", f"gen_b={f['gen_b']}",
                    "--batch-window-ms", "400"])
    try:
        jobs = [(n, i) for n in ("gen_a", "gen_b", "base") for i in range(len(PROMPTS))]

        def ask(job):
            n, i = job
            r = httpx.post(s.url + "/v1/completions", json={"model": n, "prompt": PROMPTS[i], "max_tokens": 8,
                                                            "temperature": 0}, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        with concurrent.futures.ThreadPoolExecutor(9) as ex:
            answers = list(ex.map(ask, jobs))
        assert answers == [offline[n][i] for n, i in jobs]
        from .test_browser import CHROMIUM, page_columns
        if CHROMIUM is not None:  # the page, generation side: one prompt, two adapters and the base
            cols = page_columns(s.url, {"text": PROMPTS[1], "adapters": "gen_a,gen_b,base", "max_tokens": "8"},
                                tmp_path / "profile")
            assert cols == {n: offline[n][1] for n in ("gen_a", "gen_b", "base")}
        # a request in flight (waiting out the 400 ms batch window) when SIGTERM arrives is answered
        result = {}
        t = threading.Thread(target=lambda: result.update(r=ask(("gen_b", 0))))
        t.start()
        time.sleep(0.15)
        code = s.stop(timeout=60)
        t.join(60)
        assert result.get("r") == offline["gen_b"][0]
        # uvicorn re-raises the signal it caught once the graceful shutdown is over
        assert code in (0, -15), "".join(s.output)
        assert "Traceback" not in "".join(s.output), "".join(s.output)
    finally:
        s.stop()
