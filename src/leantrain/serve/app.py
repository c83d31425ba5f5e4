"""The HTTP side: a FastAPI app speaking OpenAI's completions and chat completions API over one `Engine`.

    POST /v1/completions, POST /v1/chat/completions   (stream: true -> server-sent events, ending data: [DONE])
    GET  /v1/models, /health, /metrics (Prometheus text), /  (the chat page, one offline HTML file)

Handlers run on the event loop and never touch the model: they check and tokenize the request, hand it
to the engine thread, and turn the tokens it sends back (through `call_soon_threadsafe`) into text. A
handler that ends early -- its client disconnected, it timed out -- cancels its sequence, and the engine
frees the slot before its next step. Limits: a body larger than `max_body` is refused with 413 before it
is parsed, a full queue is 429, an API key (when set) is checked in constant time on every /v1 route.
An output constraint (`response_format`, `guided_json`, `guided_regex`, `guided_grammar`) is compiled off the
event loop, once per distinct rule (`serve.guided`), and each of the request's sequences gets its own matcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from leantrain.errors import LeantrainError
from leantrain.serve import protocol
from leantrain.serve.engine import CANCELLED, ERROR, STOP, Engine, QueueFull, Sampling, Sequence
from leantrain.serve.guided import Grammars
from leantrain.serve.loader import ServedModel
from leantrain.serve.metrics import Metrics
from leantrain.serve.protocol import APIError

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/")


@dataclass
class Limits:
    """The server's safety settings (docs/serving.md)."""

    api_key: str | None = None
    max_body: int = 1 << 20        # bytes of a request body
    max_batch: int = 16            # requests decoded together
    max_queue: int = 64            # requests waiting for a slot; more get 429
    timeout: float = 300.0         # seconds per request


class Detokenizer:
    """Token ids -> text pieces whose concatenation is `decode(all ids)`, cut at the first stop string.

    A piece is released only when the text decodes whole (no half of a multi-byte character) and, with
    stop strings, only up to the point where no stop string could still begin.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str]) -> None:
        self.decode, self.stop = decode, stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.text, self.sent, self.stopped = "", 0, False

    def add(self, token: int) -> str:
        self.ids.append(token)
        full = self.decode(self.ids)
        if full.endswith("\ufffd"):
            return ""
        self.text = full
        if self.stop:
            hits = [i for i in (full.find(s) for s in self.stop) if i >= 0]
            if hits:
                self.text, self.stopped = full[:min(hits)], True
                return self._take(len(self.text))
        return self._take(len(self.text) - self.hold)

    def flush(self) -> str:
        if not self.stopped:
            self.text = self.decode(self.ids)
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:upto], upto
        return piece


class Generation:
    """The prompts of one request running in the engine; iterate to get (index, text piece, finish reason)."""

    def __init__(self, app: ServerState, prompts: list[list[int]], params: protocol.Params, max_tokens: list[int],
                 grammar: Any = None) -> None:
        self.state, self.params = app, params
        self.start = time.perf_counter()
        self.first_token: float | None = None
        self.queue: asyncio.Queue[tuple[int, int | None, str | None]] = asyncio.Queue()
        self.detok = [Detokenizer(app.served.decode, params.stop) for _ in prompts]
        self.reasons: list[str | None] = [None] * len(prompts)
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.seqs: list[Sequence] = []
        stop_ids = frozenset() if params.ignore_eos or app.served.eos_id is None else frozenset({app.served.eos_id})
        try:
            for i, (ids, n) in enumerate(zip(prompts, max_tokens, strict=True)):
                sampling = Sampling(n, params.temperature, params.top_p, params.top_k, params.seed, stop_ids)
                constraint = None if grammar is None else grammar.matcher()  # one matcher per sequence
                self.seqs.append(app.engine.submit(ids, sampling, self._sink(i), constraint))
        except QueueFull as e:
            self.cancel()
            raise APIError(429, f"the server is busy ({e}); retry later", code="queue_full",
                           type="rate_limit_error") from None

    def _sink(self, index: int) -> Callable[[int | None, str | None], None]:
        dispatcher, queue = self.state.dispatcher, self.queue

        def sink(token: int | None, reason: str | None) -> None:
            dispatcher.put(queue, (index, token, reason))
        return sink

    def cancel(self) -> None:
        for seq in self.seqs:
            seq.cancel()

    @property
    def completion_tokens(self) -> int:
        return sum(len(s.generated) for s in self.seqs)

    async def events(self) -> AsyncIterator[tuple[int, str, str | None]]:
        """Text pieces as they decode; each prompt ends with one event carrying its finish reason."""
        deadline = self.start + self.state.limits.timeout
        try:
            while any(r is None for r in self.reasons):
                try:
                    index, token, reason = await asyncio.wait_for(self.queue.get(), deadline - time.perf_counter())
                except TimeoutError:
                    raise APIError(504, f"the request took longer than {self.state.limits.timeout:g} s; ask for "
                                   "fewer tokens or raise --timeout", code="timeout", type="timeout_error"
                                   ) from None
                if self.reasons[index] is not None:
                    continue  # the engine confirming a stop-string cancel
                if self.first_token is None and token is not None:
                    self.first_token = time.perf_counter()
                detok = self.detok[index]
                piece = detok.add(token) if token is not None else ""
                if detok.stopped:
                    self.seqs[index].cancel()
                    reason = STOP
                if reason in (ERROR, CANCELLED):
                    raise APIError(500, f"generation failed in the engine ({self.state.engine.last_error}); "
                                   "see the server log", type="server_error", code="engine_error")
                if reason is not None:
                    self.reasons[index] = reason
                    piece += detok.flush()
                if piece or reason is not None:
                    yield index, piece, reason
        finally:
            self.cancel()  # a no-op for finished sequences; frees the slots of abandoned ones
            end = time.perf_counter()
            self.state.metrics.finished(self.prompt_tokens, self.completion_tokens, end - self.start,
                                        None if self.first_token is None else self.first_token - self.start)


class Dispatcher:
    """Hands tokens from the engine thread to the event loop with one wake-up per burst, not one per token:
    a decode step of 16 requests costs the loop one `call_soon_threadsafe`, not 16."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self._items: list[tuple[asyncio.Queue, Any]] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def put(self, queue: asyncio.Queue, item: Any) -> None:
        with self._lock:
            self._items.append((queue, item))
            if self._scheduled or self.loop is None:
                return
            self._scheduled = True
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        for queue, item in items:
            queue.put_nowait(item)


@dataclass
class ServerState:
    served: ServedModel
    engine: Engine
    limits: Limits
    metrics: Metrics
    dispatcher: Dispatcher
    grammars: Grammars


async def _grammar(state: ServerState, body: dict[str, Any]) -> Any:
    """The request's compiled output rule (None without one); compiled on a worker thread, then cached."""
    rule = protocol.constraint_rule(body)
    return None if rule is None else await asyncio.to_thread(state.grammars.get, rule)


def _max_tokens(state: ServerState, prompts: list[list[int]], params: protocol.Params, where: str) -> list[int]:
    """Each prompt's token budget: the requested max_tokens, checked against the context (seq_len)."""
    seq_len = state.served.seq_len
    out = []
    for ids in prompts:
        room = seq_len - len(ids)
        if room < 1:
            raise APIError(400, f"the {where} is {len(ids)} tokens but the model's context is {seq_len}; shorten "
                           "it", where, "context_length_exceeded")
        want = params.max_tokens if params.max_tokens is not None else room
        if want > room:
            raise APIError(400, f"max_tokens = {want} does not fit: {len(ids)} prompt tokens + {want} exceed the "
                           f"model's context of {seq_len}; ask for at most {room}", "max_tokens",
                           "context_length_exceeded")
        out.append(want)
    return out


def _model_check(state: ServerState, body: dict[str, Any]) -> None:
    model = body.get("model")
    if model is not None and model != state.served.name:
        raise APIError(404, f"the model {json.dumps(model)[:80]} does not exist; this server serves "
                       f"{state.served.name!r} (GET /v1/models)", "model", "model_not_found")


async def _completions(state: ServerState, body: dict[str, Any]) -> Response:
    _model_check(state, body)
    prompts = [p if isinstance(p, list) else state.served.encode(p) for p in protocol.completion_prompts(body)]
    vocab = state.served.model.cfg.vocab_size
    if any(not 0 <= t < vocab for p in prompts for t in p):
        raise APIError(400, f"prompt token ids must lie in [0, {vocab})", "prompt", "invalid_value")
    if any(not p for p in prompts):
        raise APIError(400, "the prompt encodes to no tokens; send some text", "prompt", "invalid_value")
    params = protocol.sampling_params(body, COMPLETION_DEFAULT_MAX_TOKENS, chat=False)
    if params.max_tokens == COMPLETION_DEFAULT_MAX_TOKENS and body.get("max_tokens") is None:
        params.max_tokens = min(COMPLETION_DEFAULT_MAX_TOKENS, *(state.served.seq_len - len(p) for p in prompts))
        params.max_tokens = max(params.max_tokens, 1)
    budgets = _max_tokens(state, prompts, params, "prompt")
    gen = Generation(state, prompts, params, budgets, await _grammar(state, body))
    rid, name, created = protocol.new_id("cmpl"), state.served.name, int(time.time())
    if params.stream:
        async def stream() -> AsyncIterator[bytes]:
            try:
                async for index, piece, reason in gen.events():
                    yield protocol.sse(protocol.completion_chunk(rid, name, created, index, piece, reason))
                if params.include_usage:
                    yield protocol.sse({"id": rid, "object": "text_completion", "created": created, "model": name,
                                        "choices": [], "usage": protocol.usage(gen.prompt_tokens,
                                                                               gen.completion_tokens)})
            except APIError as e:
                yield protocol.sse(e.body())
            yield protocol.sse("[DONE]")
        return _sse_response(stream())
    texts = [""] * len(prompts)
    async for index, piece, _ in gen.events():
        texts[index] += piece
    return JSONResponse(protocol.completion(rid, name, list(zip(texts, gen.reasons, strict=True)), gen.prompt_tokens,
                                            gen.completion_tokens))


async def _chat(state: ServerState, body: dict[str, Any]) -> Response:
    _model_check(state, body)
    messages = protocol.chat_messages(body)
    try:
        ids = state.served.chat_ids(messages)
    except Exception as e:  # noqa: BLE001 - a template that refuses these messages (raise_exception)
        raise APIError(400, f"the chat template cannot render these messages: {e}", "messages", "invalid_value"
                       ) from None
    params = protocol.sampling_params(body, None, chat=True)
    budgets = _max_tokens(state, [ids], params, "messages")
    gen = Generation(state, [ids], params, budgets, await _grammar(state, body))
    rid, name, created = protocol.new_id("chatcmpl"), state.served.name, int(time.time())
    if params.stream:
        async def stream() -> AsyncIterator[bytes]:
            yield protocol.sse(protocol.chat_chunk(rid, name, created, {"role": "assistant", "content": ""}, None))
            try:
                async for _, piece, reason in gen.events():
                    if piece:
                        yield protocol.sse(protocol.chat_chunk(rid, name, created, {"content": piece}, None))
                    if reason is not None:
                        yield protocol.sse(protocol.chat_chunk(rid, name, created, {}, reason))
                if params.include_usage:
                    yield protocol.sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                                        "model": name, "choices": [],
                                        "usage": protocol.usage(gen.prompt_tokens, gen.completion_tokens)})
            except APIError as e:
                yield protocol.sse(e.body())
            yield protocol.sse("[DONE]")
        return _sse_response(stream())
    text = ""
    async for _, piece, _ in gen.events():
        text += piece
    return JSONResponse(protocol.chat_completion(rid, name, text, gen.reasons[0] or STOP, gen.prompt_tokens,
                                                 gen.completion_tokens))


def _sse_response(body: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


class GuardMiddleware:
    """Pure ASGI: counts every answer by endpoint and status, checks the API key on /v1 routes, and refuses
    bodies over `max_body` with 413 (the body is read and dropped, up to a hard cap, so that the client gets
    to read the answer)."""

    DRAIN_CAP = 64 << 20

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status = 500

        async def send_counting(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        limit = self.state.limits.max_body
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > limit
        received = 0

        async def receive_limited() -> dict:
            nonlocal received, too_big
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    too_big = True
                    raise _BodyTooLarge()
            return message

        try:
            if self.state.limits.api_key and scope["path"].startswith("/v1/") and not self._authorized(scope):
                await _error(APIError(401, "missing or wrong API key; send the header Authorization: Bearer KEY",
                                      code="invalid_api_key"))(scope, receive, send_counting)
                return
            if too_big:
                raise _BodyTooLarge()
            await self.app(scope, receive_limited, send_counting)
        except _BodyTooLarge:
            drained = received
            while drained <= self.DRAIN_CAP:
                message = await receive()
                if message["type"] != "http.request":
                    break
                drained += len(message.get("body", b""))
                if not message.get("more_body", False):
                    break
            await _error(APIError(413, f"the request body is larger than {limit} bytes; send less (or raise "
                                  "--max-body)", code="body_too_large"))(scope, receive, send_counting)
        finally:
            self.state.metrics.request(path, status)


    def _authorized(self, scope: dict) -> bool:
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        key = (self.state.limits.api_key or "").encode()
        return scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), key)


class _BodyTooLarge(Exception):
    pass


def create_app(served: ServedModel, limits: Limits | None = None, engine: Engine | None = None) -> FastAPI:
    """The ASGI app serving `served`; its lifespan starts the engine thread and, on shutdown, drains it."""
    limits = limits or Limits()
    engine = engine or Engine(served.model, max_batch=limits.max_batch, max_queue=limits.max_queue)
    grammars = Grammars(served.tokenizer, served.model.cfg.vocab_size, served.eos_id)
    metrics = Metrics({
        "leantrain_queue_depth": ("gauge", "Requests waiting for a decode slot.", lambda: engine.queued),
        "leantrain_running_requests": ("gauge", "Requests being decoded.", lambda: engine.running),
        "leantrain_decode_steps_total": ("counter", "Batched decode steps run.", lambda: engine.steps),
        "leantrain_mean_batch": ("gauge", "Mean requests per decode step so far.",
                                 lambda: round(engine.batched_tokens / max(engine.steps, 1), 3)),
        "leantrain_cancelled_requests_total": ("counter", "Requests dropped early: client gone, timeout, stop string.",
                                               lambda: engine.cancelled),
        "leantrain_engine_errors_total": ("counter", "Engine steps that failed (their requests got 500).",
                                          lambda: engine.errors),
        "leantrain_constraints_compiled_total": ("counter", "Output constraints compiled (the others came from the "
                                                 "cache).", lambda: grammars.compiled)})
    state = ServerState(served, engine, limits, metrics, Dispatcher(), grammars)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.dispatcher.loop = asyncio.get_running_loop()
        engine.start()
        try:
            yield
        finally:  # uvicorn has waited for the open requests; what is left in the engine finishes now
            await asyncio.to_thread(engine.close, limits.timeout)

    app = FastAPI(title="leantrain serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state
    app.add_middleware(GuardMiddleware, state=state)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return _error(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                               code="not_found" if e.status_code == 404 else None))

    async def body_of(request: Request) -> dict[str, Any]:
        return protocol.parse_json(await request.body())

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _completions(state, await body_of(request))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _chat(state, await body_of(request))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0,
                                            "owned_by": "leantrain", "max_model_len": served.seq_len}]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": served.name, "running": engine.running, "queued": engine.queued}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    page = resources.files("leantrain.serve").joinpath("page.html").read_text(encoding="utf-8")

    @app.get("/")
    async def index() -> HTMLResponse:
        return HTMLResponse(page.replace("__MODEL__", json.dumps(served.name)))

    return app


def run(served: ServedModel, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None,
        log_level: str = "info") -> None:
    """Serve until SIGTERM/SIGINT, then return: uvicorn stops accepting, waits for the open requests (at
    most the request timeout), and the app's lifespan drains the engine. uvicorn re-raises the signal it
    caught once it is done; that second delivery is swallowed here, so a drained stop is a normal return."""
    import signal

    import uvicorn

    limits = limits or Limits()
    config = uvicorn.Config(create_app(served, limits), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=limits.timeout, access_log=False)
    server = uvicorn.Server(config)
    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, lambda signum, frame: None) for sig in (signal.SIGTERM, signal.SIGINT)
                } if main else {}
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind
        if server.started:
            raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise LeantrainError(f"could not listen on {host}:{port} (the port is in use, or the host is not an address "
                             "of this machine); pick another --port or --host")
