"""The HTTP side: FastAPI routes in the OpenAI shape, server-sent events, errors, metrics.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (streamed with ``stream: true``: SSE chunks
ending with ``data: [DONE]``), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus), and for
sessions ``GET`` / ``DELETE /v1/sessions/{session_id}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import protocol as P
from .engine import Engine, Job, Overloaded, SamplingParams, Unavailable
from .metrics import Metrics
from .sessions import BadSessionId, SessionBusy, SessionState, SessionStore

logger = logging.getLogger("zeros_lm.serve")

RETRY_AFTER_S = 1  # what a 429 / 503 asks the client to wait
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DISCONNECT_POLL_S = 0.5  # how often a whole (not streamed) response checks that its client is still there
# A model without a chat template: each message as "Role: content" on its own line; the reply is generated
# after "Assistant:" (an assistant message is written back right after it, as the model wrote it).
PLAIN_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}
PLAIN_GENERATION_PROMPT = "Assistant:"


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type_, param, code, headers


def _error_response(status: int, message: str, type_: str, param=None, code=None, headers=None) -> JSONResponse:
    body = P.ErrorResponse(error=P.ErrorDetail(message=message, type=type_, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


@dataclasses.dataclass
class ServerConfig:
    model_name: str
    max_batch: int = 32
    max_queue: int = 64
    max_sessions: int = 1024
    state_dir: str | None = None
    prefill_budget: int = 512
    max_context: int | None = None  # tokens a stream may hold (prompt + generated) when the model has softmax layers
    default_max_tokens: int = 256  # a chat request without max_tokens
    drain_timeout: float = 30.0


def render_plain_chat(messages: list[P.ChatMessage]) -> str:
    parts = []
    for m in messages:
        role = PLAIN_ROLES[m.role]
        parts.append(f"{role}:{m.text()}\n" if m.role == "assistant" else f"{role}: {m.text()}\n")
    return "".join(parts) + PLAIN_GENERATION_PROMPT


class Server:
    """Model, tokenizer, engine and sessions behind the routes."""

    def __init__(self, model, tokenizer, config: ServerConfig):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.metrics = Metrics()
        self.sessions = SessionStore(model, config.max_sessions, config.state_dir, self.metrics)
        self.engine = Engine(model, tokenizer, max_batch=config.max_batch, max_queue=config.max_queue,
                             prefill_budget=config.prefill_budget, sessions=self.sessions, metrics=self.metrics)
        self.metrics.sessions_in_memory.set_function(lambda: self.sessions.in_memory)
        self.metrics.session_bytes.set_function(lambda: self.sessions.memory_bytes)
        self.has_softmax = "softmax" in model.config.mixer_types
        self.created = P.now()

    # -- tokens ---------------------------------------------------------------------------------------------
    def encode(self, text: str, special: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special).input_ids

    def chat_tokens(self, messages: list[P.ChatMessage]) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):
            dicts = [{"role": m.role, "content": m.text()} for m in messages]
            text = self.tokenizer.apply_chat_template(dicts, add_generation_prompt=True, tokenize=False)
            return self.encode(text, special=False)
        return self.encode(render_plain_chat(messages), special=True)

    def completion_tokens(self, prompt, first: bool) -> list[int]:
        if isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
            vocab = self.model.config.vocab_size
            bad = [x for x in prompt if not 0 <= x < vocab]
            if bad:
                raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="prompt")
            return list(prompt)
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, f"prompt: one prompt per request, got a list of {len(prompt)}", param="prompt")
            prompt = prompt[0]
        return self.encode(prompt, special=first)

    # -- one request --------------------------------------------------------------------------------------
    def check_model(self, name: str) -> None:
        if name != self.config.model_name:
            raise APIError(400, f"model {name!r} is not served here; GET /v1/models lists {self.config.model_name!r}",
                           param="model", code="model_not_found")

    def sampling(self, req: P._Request, max_tokens: int | None, default: int) -> SamplingParams:
        try:
            stop = req.stop_strings()
        except ValueError as e:
            raise APIError(400, str(e), param="stop") from None
        if req.session_id is not None and req.n != 1:
            raise APIError(400, "session_id needs n = 1 (a session continues one stream)", param="n")
        return SamplingParams(max_tokens=max_tokens or default, temperature=req.temperature, top_p=req.top_p,
                              top_k=req.top_k, stop=stop, seed=req.seed, n=req.n)

    async def acquire(self, session_id: str | None) -> SessionState | None:
        if session_id is None:
            return None
        try:
            return await asyncio.to_thread(self.sessions.acquire, session_id)
        except BadSessionId as e:
            raise APIError(400, str(e), param="session_id") from None
        except SessionBusy as e:
            raise APIError(409, str(e), param="session_id", code="session_busy") from None
        except (OSError, ValueError) as e:
            raise APIError(500, f"session {session_id!r}: its state file cannot be read: {e}", "server_error") from None

    @contextlib.contextmanager
    def released_on_error(self, session_id: str | None, session: SessionState | None):
        """Until the job is submitted the request holds the session: on any error it goes back unchanged."""
        try:
            yield
        except BaseException:
            if session_id is not None:
                self.sessions.release(session_id, session)
            raise

    def start(self, req: P._Request, params: SamplingParams, session: SessionState | None,
              ids: list[int], reuse: bool, loop) -> tuple[Job, asyncio.Queue]:
        """Submit a job reading ``ids`` (after ``session``'s state if ``reuse``); the queue gets its events."""
        queue: asyncio.Queue = asyncio.Queue()

        def sink(event):
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody listens any more
                loop.call_soon_threadsafe(queue.put_nowait, event)

        if not ids:
            raise APIError(400, "the prompt is empty: nothing to read", param="prompt")
        cached = session.read if reuse and session is not None else 0
        total = cached + len(ids) + params.max_tokens
        if self.has_softmax and self.config.max_context is not None and total > self.config.max_context:
            raise APIError(
                400, f"the prompt ({cached + len(ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds this "
                f"model's context limit of {self.config.max_context} tokens (its softmax layers keep every token; "
                "--max-context)", param="max_tokens", code="context_length_exceeded")
        job = Job(ids, params, sink, session_id=req.session_id, session=session if reuse else None)
        try:
            self.engine.submit(job)
        except Overloaded as e:
            self.metrics.rejected.labels("overloaded").inc()
            raise APIError(429, f"{e}; retry in a moment", "rate_limit_error", code="overloaded",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except Unavailable as e:
            self.metrics.rejected.labels("draining").inc()
            raise APIError(503, str(e), "server_error", code="unavailable",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        return job, queue


class CountRequests:
    """ASGI middleware: counts every HTTP request by route and status (``zeros_lm_requests_total``) when its
    response starts. A plain ASGI wrapper rather than ``@app.middleware("http")``: Starlette's
    BaseHTTPMiddleware passes every chunk of a streamed response through a task and a memory stream of its
    own, a cost paid for each token of each stream."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                route = scope.get("route")  # (the router has matched it by now)
                self.metrics.requests.labels(getattr(route, "path", "other"), str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


def create_app(model, tokenizer, config: ServerConfig) -> FastAPI:
    server = Server(model, tokenizer, config)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(server.engine.stop, config.drain_timeout)
            written = await asyncio.to_thread(server.sessions.save_all)
            if written:
                logger.info("wrote the states of %d sessions to %s", written, config.state_dir)

    app = FastAPI(title="zeros-lm", lifespan=lifespan)
    app.state.server = server

    app.add_middleware(CountRequests, metrics=server.metrics)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return _error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return _error_response(400, message, "invalid_request_error", param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return _error_response(e.status_code, str(e.detail), "invalid_request_error")

    @app.get("/health")
    async def health():
        if server.engine.draining:
            return _error_response(503, "shutting down", "server_error", headers={"Retry-After": str(RETRY_AFTER_S)})
        return {"status": "ok", "active_streams": server.engine.in_flight}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return P.ModelList(data=[P.ModelCard(id=config.model_name, created=server.created)]).model_dump()

    def on_session(action, session_id: str):
        """``action(session_id)`` of the session store, its errors as OpenAI-shaped ones; a falsy result
        (no such session) is a 404."""
        try:
            result = action(session_id)
        except BadSessionId as e:
            raise APIError(400, str(e), param="session_id") from None
        except SessionBusy as e:
            raise APIError(409, str(e), param="session_id", code="session_busy") from None
        if not result:
            raise APIError(404, f"unknown session {session_id!r}", param="session_id", code="session_not_found")
        return result

    @app.get("/v1/sessions/{session_id}")
    async def session_info(session_id: str):
        return on_session(server.sessions.info, session_id)

    @app.delete("/v1/sessions/{session_id}")
    async def session_delete(session_id: str):
        on_session(server.sessions.delete, session_id)
        return {"id": session_id, "object": "session", "deleted": True}

    @app.post("/v1/completions")
    async def completions(req: P.CompletionRequest, request: Request):
        server.check_model(req.model)
        params = server.sampling(req, req.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS)
        session = await server.acquire(req.session_id)
        with server.released_on_error(req.session_id, session):
            first = session is None or session.history.numel() == 0
            ids = (session.pending if session is not None else []) + server.completion_tokens(req.prompt, first)
            job, queue = server.start(req, params, session, ids, True, asyncio.get_running_loop())
        return await _respond(server, req, job, queue, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: P.ChatCompletionRequest, request: Request):
        server.check_model(req.model)
        params = server.sampling(req, req.max_completion_tokens or req.max_tokens, config.default_max_tokens)
        session = await server.acquire(req.session_id)
        with server.released_on_error(req.session_id, session):
            conversation = server.chat_tokens(req.messages)
            reuse = False
            if session is not None and session.read > 0 and session.history.numel() <= len(conversation):
                known = session.history.tolist()
                reuse = conversation[: len(known)] == known  # the state read exactly this conversation so far
            ids = conversation[session.read:] if reuse else conversation
            job, queue = server.start(req, params, session, ids, reuse, asyncio.get_running_loop())
        return await _respond(server, req, job, queue, request, chat=True)

    return app


async def _respond(server: Server, req, job: Job, queue: asyncio.Queue, request: Request, chat: bool):
    rid = P.new_id("chatcmpl" if chat else "cmpl")
    created = P.now()
    name = server.config.model_name
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(index, text=None, finish=None, role=False):
        if chat:
            delta = P.Delta(role="assistant" if role else None, content=text)
            body = P.ChatCompletionChunk(id=rid, created=created, model=name, session_id=req.session_id,
                                         choices=[P.ChatChunkChoice(index=index, delta=delta, finish_reason=finish)])
        else:
            body = P.CompletionResponse(id=rid, created=created, model=name, session_id=req.session_id,
                                        choices=[P.CompletionChoice(index=index, text=text or "", finish_reason=finish)])
        return body.model_dump_json(exclude_none=chat)

    if req.stream:
        async def events():
            done = False
            try:
                if chat:
                    for i in range(req.n):
                        yield {"data": chunk(i, "", role=True)}
                while True:
                    kind, *rest = await queue.get()
                    if kind == "delta":
                        yield {"data": chunk(rest[0], rest[1])}
                    elif kind == "finish":
                        yield {"data": chunk(rest[0], finish=_public_reason(rest[1]))}
                    elif kind == "error":
                        done = True
                        body = P.ErrorResponse(error=P.ErrorDetail(message=rest[0], type="server_error"))
                        yield {"data": body.model_dump_json()}
                        return
                    else:  # end
                        done = True
                        if include_usage:
                            usage = P.Usage(**rest[0])
                            cls = P.ChatCompletionChunk if chat else P.CompletionResponse
                            body = cls(id=rid, created=created, model=name, choices=[], usage=usage,
                                       session_id=req.session_id)
                            yield {"data": body.model_dump_json(exclude_none=chat)}
                        yield {"data": "[DONE]"}
                        return
            finally:
                if not done:  # the client went away (or the server stops): free the stream's slot
                    server.engine.cancel(job)

        # on shutdown (SIGTERM), running streams get the drain timeout to finish before they are cut
        return EventSourceResponse(events(), shutdown_grace_period=server.config.drain_timeout)

    texts, reasons = [""] * req.n, [None] * req.n
    try:
        while True:
            try:
                kind, *rest = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    server.engine.cancel(job)
                    return Response(status_code=499)
                continue
            if kind == "delta":
                texts[rest[0]] += rest[1]
            elif kind == "finish":
                reasons[rest[0]] = _public_reason(rest[1])
            elif kind == "error":
                raise APIError(500, rest[0], "server_error")
            else:
                usage = P.Usage(**rest[0])
                break
    except asyncio.CancelledError:
        server.engine.cancel(job)
        raise
    if chat:
        choices = [P.ChatChoice(index=i, message=P.AssistantMessage(content=t), finish_reason=r)
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        body = P.ChatCompletionResponse(id=rid, created=created, model=name, choices=choices, usage=usage,
                                        session_id=req.session_id)
    else:
        choices = [P.CompletionChoice(index=i, text=t, finish_reason=r) for i, (t, r) in enumerate(zip(texts, reasons))]
        body = P.CompletionResponse(id=rid, created=created, model=name, choices=choices, usage=usage,
                                    session_id=req.session_id)
    return body.model_dump()


def _public_reason(reason: str) -> str:
    return "stop" if reason == "cancelled" else reason


def load_model(model_dir, dtype: str = "auto", device: str = "auto"):
    """(model, tokenizer) of a directory written by save_pretrained, in eval mode on ``device``."""
    import torch
    import transformers

    from zeros_lm.pretrained import load_pretrained

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = load_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()  # weights must fit
    return model, tokenizer
