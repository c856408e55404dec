"""The HTTP endpoints (FastAPI).

``create_app(registry, ...)`` returns the ASGI app; :mod:`.cli` runs it under uvicorn.

* ``POST /v1/completions``, ``POST /v1/chat/completions``: OpenAI's request and answer (``stream: true``:
  server-sent events, ``data: {...}`` chunks then ``data: [DONE]``); ``model`` names a causal-LM adapter
  or the base (``"base"`` or the ``--model`` value).
* ``POST /v1/classify``: ``{"model": adapter, "input": text | [texts]}`` (or ``"tokens": [[words]]``) ->
  ``{"data": [{"index", "label", "scores"} | {"index", "tokens", "tags"}]}``.
* ``GET /v1/adapters`` (also ``/v1/models``), ``POST /v1/adapters {"name", "path"}``,
  ``DELETE /v1/adapters/{name}``; ``GET /health``; ``GET /metrics`` (Prometheus text); ``GET /`` the page.

Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 bad field (named),
401 missing / wrong API key, 403 adapter path outside the allowed directories, 404 unknown adapter (the
message lists the loaded ones), 409 name taken, 503 queue full, 504 timeout.

(No ``from __future__ import annotations`` here: FastAPI reads the handlers' annotations, and the
classes they name are imported inside ``create_app``.)
"""

import asyncio
import contextlib
import json
import secrets
import time
import uuid

from .._optional import import_extra
from .inference import ClassifyItem, GenerateItem, ItemError, classify, generate
from .metrics import Metrics
from .page import PAGE
from .registry import AdapterError
from .scheduler import Closed, QueueFull, RequestTimeout, Scheduler

CLASSIFY_KINDS = ("sequence_classification", "token_classification")


class HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "conflict_error", 503: "overloaded_error", 504: "timeout_error"}


def _error_body(status: int, message: str, param=None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param,
                      "code": status}}


def _field(loc) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def run_batch(registry):
    """The scheduler's runner: a batch of one group, under its lock."""
    def runner(key, items):
        group = registry.groups[key]
        with group.lock:
            if isinstance(items[0], GenerateItem):
                return generate(group, items)
            return classify(group, items)
    return runner


def create_app(registry, *, api_key: str | None = None, max_batch: int = 32, window_ms: float = 5.0,
               max_queue: int = 256, timeout_s: float = 60.0):
    fastapi = import_extra("fastapi", "fastpeft serve")
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

    from .schemas import ChatRequest, ClassifyRequest, CompletionRequest, LoadRequest

    metrics = Metrics()
    metrics.adapters.set(len(registry.adapters))

    def new_scheduler():
        return Scheduler(run_batch(registry), max_batch=max_batch, window_s=window_ms / 1000, max_queue=max_queue,
                         timeout_s=timeout_s, on_batch=lambda key, n: metrics.batch_size.labels(key[0]).observe(n))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        app.state.scheduler = new_scheduler()  # its queues belong to this event loop
        yield
        await app.state.scheduler.close()  # uvicorn has let in-flight requests finish first

    app = fastapi.FastAPI(title="fastpeft serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.registry, app.state.metrics = registry, metrics

    # ---- errors
    @app.exception_handler(HTTPError)
    async def _http_error(request, exc: HTTPError):
        return JSONResponse(_error_body(exc.status, exc.message, exc.param), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {"loc": ("body",), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            msg = f"body: malformed JSON ({first.get('ctx', {}).get('error', first.get('msg'))})"
            return JSONResponse(_error_body(400, msg, "body"), status_code=400)
        parts = [f"{_field(e['loc'])}: {e['msg']}" for e in errs[:5]]
        return JSONResponse(_error_body(400, "; ".join(parts), _field(first["loc"])), status_code=400)

    def _endpoint(request) -> str:
        """The route's path template (metric labels stay few whatever paths clients send)."""
        from starlette.routing import Match
        for r in app.router.routes:
            if r.matches(request.scope)[0] != Match.NONE:
                return getattr(r, "path", "other")
        return "other"

    @app.middleware("http")
    async def _observe(request: Request, call_next):
        t0 = time.perf_counter()
        path = request.url.path
        if api_key is not None and (path.startswith("/v1/") or path == "/metrics"):
            given = request.headers.get("authorization", "")
            given = given[7:] if given.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
            if not secrets.compare_digest(given.encode(), api_key.encode()):
                resp = JSONResponse(_error_body(401, "missing or wrong API key: send 'Authorization: Bearer "
                                                     "<key>'"), status_code=401)
                metrics.requests.labels(_endpoint(request), "", "401").inc()
                return resp
        resp = await call_next(request)
        if path.startswith("/v1/"):
            endpoint = _endpoint(request)
            # the adapter label is set only for loaded adapters (request.state.adapter), never a client's string
            metrics.requests.labels(endpoint, getattr(request.state, "adapter", ""), str(resp.status_code)).inc()
            metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
        return resp

    def _lookup(name, kinds, request):
        try:
            found = registry.lookup(name, kinds)
        except AdapterError as e:
            raise HTTPError(e.status, str(e), "model") from None
        request.state.adapter = found[1] or "base"
        return found

    async def _submit(group, item):
        sched = app.state.scheduler
        metrics.queue.set(sched.pending + 1)
        try:
            return await sched.submit(group.key, item)
        except QueueFull as e:
            raise HTTPError(503, str(e)) from None
        except Closed as e:
            raise HTTPError(503, str(e)) from None
        except RequestTimeout as e:
            raise HTTPError(504, str(e)) from None
        except ItemError as e:
            raise HTTPError(e.status, str(e), "model") from None
        finally:
            metrics.queue.set(sched.pending)

    # ---- pages, health, metrics
    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE

    @app.get("/health")
    async def health():
        sched = app.state.scheduler
        return {"status": "shutting_down" if sched.closed else "ok", "adapters": registry.names(),
                "queue": sched.pending}

    @app.get("/metrics")
    async def prometheus():
        metrics.adapters.set(len(registry.adapters))
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    # ---- adapters
    def _adapter_list():
        return {"object": "list", "data": registry.describe(), "load_errors": registry.errors}

    @app.get("/v1/adapters")
    async def list_adapters():
        return _adapter_list()

    @app.get("/v1/models")
    async def list_models():
        return _adapter_list()

    @app.post("/v1/adapters", status_code=201)
    async def load_adapter(body: LoadRequest, request: Request):
        try:
            a = await asyncio.to_thread(registry.load, body.name, body.path)
        except AdapterError as e:
            raise HTTPError(e.status, str(e), "path" if str(e).startswith("path") else "name") from None
        request.state.adapter = body.name
        metrics.adapters.set(len(registry.adapters))
        return a.describe()

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str, request: Request):
        try:
            await asyncio.to_thread(registry.unload, name)
        except AdapterError as e:
            raise HTTPError(e.status, str(e), "name") from None
        request.state.adapter = name
        metrics.adapters.set(len(registry.adapters))
        return {"id": name, "object": "model", "deleted": True}

    # ---- classification
    @app.post("/v1/classify")
    async def classify_endpoint(body: ClassifyRequest, request: Request):
        group, name = _lookup(body.model, CLASSIFY_KINDS, request)
        if (body.input is None) == (body.tokens is None):
            raise HTTPError(400, "input: give either 'input' (a text or a list of texts) or 'tokens'", "input")
        if body.tokens is not None:
            if group.kind != "token_classification":
                raise HTTPError(400, "tokens: only token-classification adapters take pre-split words", "tokens")
            words = body.tokens
        else:
            texts = [body.input] if isinstance(body.input, str) else body.input
            words = [t.split() for t in texts] if group.kind == "token_classification" else texts
        adapter = registry.adapters[name]
        items = [_classify_item(group, adapter, w, i) for i, w in enumerate(words)]
        answers = await asyncio.gather(*(_submit(group, it) for it in items))
        return {"object": "classification", "model": name, "task": group.kind,
                "data": [dict(index=i, **a) for i, a in enumerate(answers)]}

    def _classify_item(group, adapter, x, i) -> ClassifyItem:
        tok = group.tokenizer
        param = f"input[{i}]"
        if group.kind == "token_classification":
            if not x:
                raise HTTPError(400, f"{param}: no words to tag", param)
            n = len(tok(x, is_split_into_words=True)["input_ids"])
            rec = {"tokens": list(x)}
        else:
            if not x.strip():
                raise HTTPError(400, f"{param}: empty text", param)
            n = len(tok(x)["input_ids"])
            rec = {"text": x}
        if n > group.max_positions:
            raise HTTPError(400, f"{param}: {n} tokens, over the model's maximum length of {group.max_positions}",
                            param)
        max_len = min(adapter.max_length or 128, group.max_positions)
        feats = group.task.encode([rec], tok, max_len, with_labels=False).features[0]
        return ClassifyItem(adapter.name, feats, rec.get("tokens"))

    # ---- generation
    def _gen_items(group, name, prompts, body):
        tok = group.tokenizer
        items = []
        for i, p in enumerate(prompts):
            ids = tok(p)["input_ids"]
            if not ids:
                raise HTTPError(400, "prompt: empty prompt", "prompt")
            if len(ids) + body.max_tokens > group.max_positions:
                raise HTTPError(400, f"prompt: {len(ids)} prompt tokens + max_tokens {body.max_tokens} exceed the "
                                     f"model's maximum length of {group.max_positions}", "prompt")
            items.append(GenerateItem(name, ids, body.max_tokens, body.stop, body.temperature, body.top_p))
        return items

    def _chat_prompt(tok, messages) -> str:
        msgs = [{"role": m.role, "content": m.content} for m in messages]
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"

    def _stream(items, group, make_chunk, final_chunk):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        for i, it in enumerate(items):
            it.on_text = (lambda i: lambda text: loop.call_soon_threadsafe(queue.put_nowait, (i, text)))(i)

        async def run_all():
            try:
                return await asyncio.gather(*(_submit(group, it) for it in items))
            finally:
                queue.put_nowait(None)

        async def events():
            task = asyncio.create_task(run_all())
            try:
                while True:
                    msg = await queue.get()
                    if msg is None:
                        break
                    yield f"data: {json.dumps(make_chunk(*msg))}\n\n"
                try:
                    answers = await task
                    for i, a in enumerate(answers):
                        yield f"data: {json.dumps(final_chunk(i, a))}\n\n"
                except HTTPError as e:
                    yield f"data: {json.dumps(_error_body(e.status, e.message, e.param))}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                if not task.done():
                    for it in items:
                        it.cancelled = True
                    task.cancel()

        return StreamingResponse(events(), media_type="text/event-stream")

    def _usage(items, answers):
        p = sum(len(it.prompt_ids) for it in items)
        c = sum(a["completion_tokens"] for a in answers)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        group, name = _lookup(body.model, ("causal_lm",), request)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        items = _gen_items(group, name, prompts, body)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "object": "text_completion", "created": created, "model": body.model}
        if body.stream:
            return _stream(items, group,
                           lambda i, text: dict(head, choices=[{"index": i, "text": text, "finish_reason": None,
                                                                "logprobs": None}]),
                           lambda i, a: dict(head, choices=[{"index": i, "text": "",
                                                             "finish_reason": a["finish_reason"], "logprobs": None}]))
        answers = await asyncio.gather(*(_submit(group, it) for it in items))
        return dict(head, choices=[{"index": i, "text": a["text"], "finish_reason": a["finish_reason"],
                                    "logprobs": None} for i, a in enumerate(answers)],
                    usage=_usage(items, answers))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        group, name = _lookup(body.model, ("causal_lm",), request)
        items = _gen_items(group, name, [_chat_prompt(group.tokenizer, body.messages)], body)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "object": "chat.completion", "created": created, "model": body.model}
        if body.stream:
            chead = dict(head, object="chat.completion.chunk")
            return _stream(items, group,
                           lambda i, text: dict(chead, choices=[{"index": i, "delta": {"role": "assistant",
                                                                                       "content": text},
                                                                 "finish_reason": None}]),
                           lambda i, a: dict(chead, choices=[{"index": i, "delta": {},
                                                              "finish_reason": a["finish_reason"]}]))
        (a,) = await asyncio.gather(*(_submit(group, it) for it in items))
        return dict(head, choices=[{"index": 0, "message": {"role": "assistant", "content": a["text"]},
                                    "finish_reason": a["finish_reason"]}], usage=_usage(items, [a]))

    return app
