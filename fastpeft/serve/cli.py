"""Serve a base model and its LoRA adapters over HTTP (OpenAI-style completions, classification, a web page).

One base model is loaded once (per head shape) and every adapter is a LoRA adapter on it; requests
that arrive together are batched whatever their adapters.  Adapters load and unload while serving
(POST / DELETE /v1/adapters), only from the directories given here.  Ctrl-C / SIGTERM finishes the
requests in flight, then exits.

examples:
  fastpeft serve --model minilm --adapter sst2=runs/sst2/adapter --adapter ner=runs/ner/adapter
  fastpeft serve --model ./tiny-llama --task causal_lm --adapter-dir adapters/ --adapter support=adapters/support
  curl localhost:8000/v1/classify -d '{"model": "sst2", "input": "a gorgeous, witty movie"}'
  curl localhost:8000/v1/completions -d '{"model": "support", "prompt": "Hello", "max_tokens": 20}'
"""
from __future__ import annotations

import os
import socket
import sys


def add_arguments(p) -> None:
    p.epilog = __doc__.split("\n\n", 2)[2] if __doc__.count("\n\n") >= 2 else None
    p.add_argument("--model", required=True, help="base model: a bundled name (minilm) or a local directory")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="an adapter to load at start (repeatable); its path may be loaded again later")
    p.add_argument("--adapter-dir", action="append", default=[], metavar="DIR",
                   help="a directory adapters may be loaded from while serving (repeatable)")
    p.add_argument("--task", default=None,
                   help="sequence_classification | token_classification | causal_lm: the task of adapters whose "
                        "files do not say; causal_lm also serves the base model for generation")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (the ready line says which)")
    p.add_argument("--api-key", default=os.environ.get("FASTPEFT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* and /metrics (default: $FASTPEFT_API_KEY)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--max-batch", type=int, default=32, help="requests per model batch")
    p.add_argument("--batch-window-ms", type=float, default=5.0,
                   help="how long a batch waits for more requests after its first one")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting or running before 503s")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a request may wait and run (504 after)")
    p.add_argument("--log-level", default="warning")


def _looks_causal(model_path: str) -> bool:
    import json
    try:
        with open(os.path.join(model_path, "config.json")) as f:
            archs = json.load(f).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def build_registry(args):
    from .registry import AdapterError, Registry
    reg = Registry(args.model, args.adapter_dir, default_task=args.task, device=args.device)
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise AdapterError(f"--adapter: expected NAME=PATH, got {spec!r}")
        reg.allow_exact(path)
        try:
            reg.load(name, path)
        except AdapterError as e:  # reported; the server serves the others
            print(f"fastpeft serve: adapter {name!r} not loaded: {e}", file=sys.stderr)
            reg.errors.append({"name": name, "path": path, "error": str(e)})
    if reg.default_task == "causal_lm" or _looks_causal(reg.model_path):
        reg.ensure_base("causal_lm")
    return reg


def run(args) -> int:
    from .._optional import import_extra
    uvicorn = import_extra("uvicorn", "fastpeft serve")
    from .app import create_app
    from .registry import AdapterError
    try:
        reg = build_registry(args)
    except (AdapterError, ValueError) as e:
        print(f"fastpeft serve: error: {e}", file=sys.stderr)
        return 2
    app = create_app(reg, api_key=args.api_key, max_batch=args.max_batch, window_ms=args.batch_window_ms,
                     max_queue=args.max_queue, timeout_s=args.timeout)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        print(f"fastpeft serve: error: --host/--port: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=args.timeout + 5,
                            lifespan="on")
    server = uvicorn.Server(config)
    print(f"fastpeft serve: {len(reg.adapters)} adapter(s) {reg.names()} on {args.model}; "
          f"listening on http://{args.host}:{port}", flush=True)
    server.run(sockets=[sock])
    return 0
