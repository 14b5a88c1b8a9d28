"""The OpenAI-compatible HTTP API over the scheduler (Starlette): the shapes vLLM, TGI, llama.cpp's server and
trtllm-serve speak, so the `openai` client and curl work unchanged.

    POST /v1/chat/completions   messages -> the model's chat format; streamed (SSE) or not
    POST /v1/completions        a raw prompt (text, or token ids)
    GET  /v1/models             the one model served
    GET  /health                200 when the model is loaded, 503 before (and while draining)
    GET  /metrics               Prometheus text (serve/metrics.py)

Errors are OpenAI's JSON, `{"error": {"message", "type", "param", "code"}}`, never a 500 for bad input:
400 malformed or unsupported, 401 wrong API key, 404 unknown model or path, 408 too slow (serve/limits.py),
413 body too large, 429 queue full (Retry-After), 503 loading, draining or overloaded (Retry-After).

A request's life: read its body (serve/limits.py's limits), then parse, validate and tokenize it in a worker thread
(so a huge body never holds the event loop), then a Completion submits it and waits for its outputs. It ends at its
finish reason, or earlier: its client went away (non-streamed too: the slot is free at the next step), it ran past
--request-timeout, or the server's drain reached --shutdown-timeout (serve/server.py).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from dataclasses import dataclass, field

from mistral_trt.runtime.chat import check_messages, format_chat
from mistral_trt.runtime.errors import RequestError, UserError
from mistral_trt.runtime.request import HTTP, Defaults, Request, build_request
from mistral_trt.runtime.tokenizer import check_text
from mistral_trt.runtime.sampling import SAMPLING_RULES
from mistral_trt.runtime.sequence import Output
from mistral_trt.runtime.structured import Grammar

from .access import COMPLETIONS, AccessLog, key_ok
from .limits import Limits, error_body
from .scheduler import QueueFull
UNSUPPORTED = {  # parameter -> why (a 400 instead of silently ignoring what the caller asked for)
    "tools": "tool calls are not supported", "tool_choice": "tool calls are not supported",
    "parallel_tool_calls": "tool calls are not supported",
    "functions": "function calls are not supported", "function_call": "function calls are not supported",
    "audio": "audio output is not supported", "modalities": "only text output is supported",
    "suffix": "suffix is not supported", "best_of": "best_of is not supported",
    "store": "storing completions is not supported", "metadata": "metadata is stored only with store",
    "prediction": "predicted outputs are not supported", "reasoning_effort": "this model does not reason",
    "web_search_options": "web search is not supported",
}
MAX_N = 16  # choices per request (OpenAI allows 128; each is a sequence in a slot)
# Every field a request may carry; any other is a 400 naming it (a misspelt or foreign parameter, such as vLLM's
# guided_json or llama.cpp's grammar, would otherwise be dropped while the caller believes it was applied).
OPENAI_CHAT = {"model", "messages", "frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "top_logprobs",
               "max_tokens", "max_completion_tokens", "n", "seed", "stop", "stream", "stream_options", "temperature",
               "top_p", "user", "response_format"}
OPENAI_COMPLETION = {"model", "prompt", "echo", "frequency_penalty", "presence_penalty", "logit_bias", "logprobs",
                     "max_tokens", "n", "seed", "stop", "stream", "stream_options", "temperature", "top_p", "user",
                     "response_format"}
# vLLM's names and meanings (structured_outputs too), and llama.cpp's server's grammar (GBNF) and json_schema
EXTENSIONS = {"top_k", "min_p", "repetition_penalty", "ignore_eos", "structured_outputs", "grammar", "json_schema"}
CHAT_EXTENSIONS = {"safe_prompt"}  # Mistral's API



class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type, self.headers = status, message, param, code, type_, headers


@dataclass
class ServerState:
    """What the app serves and how; `scheduler` is None while the model loads."""

    model_name: str
    max_context: int = 0
    keys: tuple[bytes, ...] = ()  # API keys (serve/access.py); empty: none asked for
    protect_metrics: bool = False  # /metrics asks for a key too
    allowed_origins: tuple[str, ...] = ()  # CORS; empty: no CORS headers
    log_prompts: bool = False  # the access log may hold prompt text
    safe_prompt: bool = False
    limits: Limits = field(default_factory=Limits)
    scheduler: object = None
    tokenizer: object = None
    manifest: object = None
    metrics: object = None
    load_error: str | None = None
    # the drain (serve/server.py): SIGTERM sets `draining` (new requests get 503), its deadline sets `aborting`
    draining: bool = False
    aborting: bool = False
    active: set = field(default_factory=set)  # Completions whose responses have not ended
    pending: int = 0  # requests being read or prepared, not yet a Completion

    @property
    def idle(self) -> bool:
        return not self.active and not self.pending

    def abort(self) -> None:
        """The drain's deadline: every request still open ends now, with an error (event-loop thread)."""
        self.aborting = True
        for c in list(self.active):
            c.end(SHUTDOWN)


# -- request parsing: OpenAI's shapes to runtime/request.py's fields (the rules and messages are its) -------------
def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    v = body.get(name, default)
    if v is None:
        return default
    ok = (isinstance(v, int) if integer else isinstance(v, (int, float))) and not isinstance(v, bool)
    if not ok or not (low <= v <= high) or v != v:
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"{name}: expected {kind} in [{low:g}, {high:g}], got {json.dumps(v)}", param=name)
    return v


def _object_of(body, state: ServerState, known: set[str], path: str, model_required: bool) -> None:
    """A body is an object of known fields (any other is a 400 naming it) for this server's model."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for name in body:
        if name not in known:
            raise ApiError(400, f"{name}: not a parameter of {path} on this server (docs/serving.md lists them)",
                           param=name, code="unknown_parameter")
    model = body.get("model")
    if model is None and not model_required:
        return
    if not isinstance(model, str):
        raise ApiError(400, "model: expected the model's name (GET /v1/models)", param="model")
    if model != state.model_name:
        raise ApiError(404, f"The model `{model}` does not exist (this server serves `{state.model_name}`).",
                       param="model", code="model_not_found")


def _common(body: dict, state: ServerState, chat: bool = True) -> None:
    known = (OPENAI_CHAT | CHAT_EXTENSIONS if chat else OPENAI_COMPLETION) | EXTENSIONS | set(UNSUPPORTED)
    _object_of(body, state, known, "/v1/chat/completions" if chat else "/v1/completions", model_required=True)
    for name, why in UNSUPPORTED.items():
        v = body.get(name)
        if v not in (None, [], {}, False):
            raise ApiError(400, f"{name}: {why} by this server", param=name, code="unsupported_parameter")
    _number(body, "n", 1, 1, MAX_N, integer=True)
    if not isinstance(body.get("stream", False), bool):
        raise ApiError(400, "stream: expected true or false", param="stream")
    opts = body.get("stream_options")
    if opts is not None and not (isinstance(opts, dict) and isinstance(opts.get("include_usage", False), bool)):
        raise ApiError(400, "stream_options: expected {\"include_usage\": true|false}", param="stream_options")


def _messages(body: dict, state: ServerState) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages: expected a non-empty list of {role, content}", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}]: expected an object", param=f"messages[{i}]")
        role = {"developer": "system"}.get(m.get("role"), m.get("role"))
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}].role: {json.dumps(m.get('role'))} is not supported (system, developer, "
                           "user, assistant)", param=f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", param=f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content: expected a string", param=f"messages[{i}].content")
        msg = {"role": role, "content": content}
        if m.get("prefix") is not None:
            msg["prefix"] = m["prefix"]
        out.append(msg)
    return out


# -- responses --------------------------------------------------------------------------------------
def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def _usage(ev: Output) -> dict:
    return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
            "total_tokens": ev.prompt_tokens + ev.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": ev.cached_tokens}}  # OpenAI's: a reused prefix


@dataclass(frozen=True)
class Ending:
    """Why a request ended before its sequence did: what a non-streamed reply gets (status, code) and what the
    finish_reason label and access log say."""

    status: int
    code: str
    message: str
    reason: str  # the finish_reason label: shutdown, cancelled, timeout
    type: str = "server_error"
    headers: dict | None = None

    def error(self) -> ApiError:
        return ApiError(self.status, self.message, code=self.code, type_=self.type, headers=self.headers)


SHUTDOWN = Ending(503, "server_shutting_down", "the server is shutting down (serve --shutdown-timeout passed before "
                  "this request finished); retry on another instance", "shutdown", headers={"Retry-After": "1"})
GONE = Ending(499, "client_closed_request", "the client went away", "cancelled")


class Completion:
    """One request's life: submit its n choices (n > 1: the first one's prompt is copied by the others, so it is
    fed once), then collect or stream their events in OpenAI's shapes; `end` stops it early."""

    def __init__(self, state: ServerState, reqs: list[Request], chat: bool, body: dict, record: dict):
        self.state, self.reqs, self.chat, self.record = state, reqs, chat, record
        self.req = reqs[0]
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tokens = [0] * len(reqs)  # generated so far, per choice
        self.offset = [0] * len(reqs)  # characters of each choice's text so far (the legacy logprobs' text_offset)
        self.echo = "" if chat or not body.get("echo") else _prompt_text(body, state)
        self.done = False
        record["prompt_tokens"] = len(self.req.prompt)
        loop = asyncio.get_running_loop()

        def emitter(i: int):
            def emit(ev):  # the scheduler's worker thread; once the loop has closed, nobody is left to tell
                try:
                    loop.call_soon_threadsafe(self.queue.put_nowait, (i, ev))
                except RuntimeError:
                    pass
            return emit

        self.handles = []
        try:
            for i, req in enumerate(reqs):
                self.handles.append(state.scheduler.submit(req, emit=emitter(i),
                                                           after=self.handles[0] if i else None))
        except (QueueFull, UserError) as e:
            for h in self.handles:
                h.cancel()
            if isinstance(e, QueueFull):
                raise ApiError(429, f"Too many requests: {e}; retry shortly", type_="rate_limit_error",
                               code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
            raise ApiError(400, str(e), param="messages" if chat else "prompt") from None
        self.handle = self.handles[0]
        state.active.add(self)
        t = state.limits.request_timeout
        self.timer = loop.call_later(t, self.end, Ending(
            408, "request_timeout", f"the request ran past this server's limit of {t:g} s (serve --request-timeout); "
            "ask for fewer max_tokens", "timeout", type="timeout_error")) if t else None

    def end(self, why: Ending) -> None:
        """Stop early (event-loop thread): the consumer answers `why`, the slots are free at the next step."""
        self.queue.put_nowait((None, why))

    async def next(self) -> tuple[int | None, Output | Ending]:
        """(choice index, its next output), or (None, why every choice ended early)."""
        i, ev = await self.queue.get()
        if isinstance(ev, Ending):
            for h in self.handles:
                h.cancel()
            self.record["finish_reason"] = ev.reason
        else:
            self.tokens[i] = ev.completion_tokens if ev.finish_reason else self.tokens[i] + len(ev.token_ids)
            if ev.finish_reason:
                self.record["finish_reason"] = ev.finish_reason
        return i, ev

    def close(self, client_gone: bool = False) -> None:
        """The response has ended (or its client left first: then the request is cancelled)."""
        if client_gone and not self.done:
            for h in self.handles:
                h.cancel()
            self.record["client_gone"] = True
            self.record.setdefault("finish_reason", "cancelled")
        self.done = True
        if self.timer:
            self.timer.cancel()
        self.state.active.discard(self)
        self.record["completion_tokens"] = sum(self.tokens)
        self.record.update(self.handle.timings())

    def _choice(self, i: int, text: str, logprobs: list, finish, delta: bool) -> dict:
        c = {"index": i, "finish_reason": finish}
        if self.chat:
            c["delta" if delta else "message"] = {"content": text} if delta else {"role": "assistant", "content": text}
            c["logprobs"] = {"content": logprobs} if self.req.logprobs is not None else None
        else:
            c["text"], c["logprobs"] = text, _legacy_logprobs(logprobs, self.offset[i]) if self.req.logprobs is not None else None
            self.offset[i] += len(text)
        return c

    def _envelope(self, choices: list, chunk: bool) -> dict:
        obj = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.state.model_name, "choices": choices}

    def _usage(self, finals: dict) -> dict:
        """The prompt counted once (and its cached tokens: the first choice's), completion tokens of every choice."""
        u = _usage(finals[0])
        u["completion_tokens"] = sum(ev.completion_tokens for ev in finals.values())
        u["total_tokens"] = u["prompt_tokens"] + u["completion_tokens"]
        return u

    async def collect(self, receive) -> dict:
        """The whole reply. Meanwhile `receive` is watched: a client that goes away ends the request."""

        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
            self.record["client_gone"] = True
            self.end(GONE)

        watcher = asyncio.ensure_future(watch())
        n = len(self.reqs)
        text, logprobs, finals = [[] for _ in range(n)], [[] for _ in range(n)], {}
        try:
            while len(finals) < n:
                i, ev = await self.next()
                if isinstance(ev, Ending):
                    raise ev.error()
                if ev.error:
                    self.record["error"] = ev.error
                    for h in self.handles:
                        h.cancel()
                    raise ApiError(503, ev.error, type_="server_error", code="generation_failed")
                text[i].append(ev.text)
                logprobs[i] += ev.logprobs
                if ev.finish_reason:
                    finals[i] = ev
            out = self._envelope([self._choice(i, self.echo + "".join(text[i]), logprobs[i], finals[i].finish_reason,
                                               delta=False)
                                  for i in range(n)], chunk=False)
            out["usage"] = self._usage(finals)
            return out
        finally:
            watcher.cancel()
            self.close()

    async def stream(self):
        """SSE chunks, each choice's under its index. Every stream ends with `data: [DONE]`: after every choice's
        finish reason, or after an error event."""
        n, finals = len(self.reqs), {}
        if self.chat:  # the role comes first, as OpenAI sends it
            for i in range(n):
                yield _sse(self._envelope([{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}], chunk=True))
        elif self.echo:  # the prompt first, as the legacy API streams it
            for i in range(n):
                yield _sse(self._envelope([self._choice(i, self.echo, [], None, delta=True)], chunk=True))
        while len(finals) < n:
            i, ev = await self.next()
            if isinstance(ev, Ending) or ev.error:
                e = ev.error() if isinstance(ev, Ending) else ApiError(503, ev.error, code="generation_failed",
                                                                       type_="server_error")
                if not isinstance(ev, Ending):
                    for h in self.handles:
                        h.cancel()
                self.record["error"] = e.message
                yield _sse({"error": {"message": e.message, "type": e.type, "param": None, "code": e.code}})
                break
            if ev.text or ev.logprobs:
                yield _sse(self._envelope([self._choice(i, ev.text, ev.logprobs, None, delta=True)], chunk=True))
            if ev.finish_reason:
                finals[i] = ev
                last = self._choice(i, "", [], ev.finish_reason, delta=True)
                if self.chat:
                    last["delta"] = {}  # as OpenAI's last chunk
                yield _sse(self._envelope([last], chunk=True))
        if len(finals) == n and self.include_usage:
            yield _sse({**self._envelope([], chunk=True), "usage": self._usage(finals)})
        self.done = True
        yield b"data: [DONE]\n\n"


class Streamed:
    """The streamed response as an ASGI app, so the Completion is closed however the response ends (Starlette
    drops a body iterator it has not started when the client leaves, without closing it)."""

    def __init__(self, c: Completion):
        self.c = c

    async def __call__(self, scope, receive, send):
        from starlette.responses import StreamingResponse

        r = StreamingResponse(self.c.stream(), media_type="text/event-stream",
                              headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            await r(scope, receive, send)
        finally:
            self.c.close(client_gone=True)  # no-op for a stream that sent [DONE]


# -- the app ---------------------------------------------------------------------------------------
def create_app(state: ServerState):
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware
    from starlette.requests import Request as HttpRequest
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    def error(e: ApiError) -> Response:
        return Response(error_body(e.message, e.type, e.code, e.param), status_code=e.status, headers=e.headers,
                        media_type="application/json")

    def not_ready() -> ApiError:
        return ApiError(503, state.load_error or "the model is loading", type_="server_error", code="model_not_ready",
                        headers={"Retry-After": "5"})

    def unauthorized(http: HttpRequest) -> Response | None:
        if key_ok(http.headers.get("authorization"), state.keys):
            return None
        return error(ApiError(401, "Incorrect API key provided.", code="invalid_api_key"))

    async def read_body(http: HttpRequest) -> bytes:
        """The body, refused with a 413 as soon as it passes the limit (never read whole first), and with a 408 if
        it has not all come within --read-timeout."""
        limit, seconds = state.limits.max_body_bytes, state.limits.read_timeout
        close = {"Connection": "close"}  # the rest of the body is never read: the connection cannot be reused
        too_big = ApiError(413, f"the request body is larger than this server's limit of {limit} bytes "
                                "(serve --max-body-bytes)", code="request_too_large", headers=close)
        declared = http.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_big
        chunks = []

        async def read():
            size = 0
            async for chunk in http.stream():
                size += len(chunk)
                if size > limit:
                    raise too_big
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), seconds or None)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {seconds:g} s (serve --read-timeout)",
                           code="request_timeout", headers=close) from None
        return b"".join(chunks)

    def prepare(raw: bytes, chat: bool) -> tuple[dict, Request]:
        """Parse, validate and tokenize: in a worker thread, so a huge or deeply nested body never holds the event
        loop (every other request, /health included, is answered meanwhile)."""
        body = _parse(raw)
        _common(body, state, chat)
        req = _request(body, state, chat)
        return body, _choices(req, body.get("n") or 1)

    async def completion(http: HttpRequest, chat: bool):
        record = http.scope.setdefault("mistral_trt", {})
        if (denied := unauthorized(http)) is not None:
            return denied
        if state.scheduler is None:
            return error(not_ready())
        if state.draining:
            return error(ApiError(503, "the server is shutting down; retry on another instance", type_="server_error",
                                  code="server_shutting_down", headers={"Retry-After": "1"}))
        state.pending += 1
        try:
            body, reqs = await asyncio.to_thread(prepare, await read_body(http), chat)
            if state.log_prompts:
                record["prompt"] = body.get("messages") if chat else body.get("prompt")
            if isinstance(body.get("user"), str):
                record["user"] = body["user"][:256]  # OpenAI's end-user id: for the operator's access log
            if state.aborting:
                raise SHUTDOWN.error()
            c = Completion(state, reqs, chat, body, record)
        except ApiError as e:
            return error(e)
        finally:
            state.pending -= 1
        if body.get("stream"):
            return Streamed(c)
        try:
            return JSONResponse(await c.collect(http.receive))
        except ApiError as e:
            return error(e)

    async def chat_completions(http):
        return await completion(http, chat=True)

    async def completions(http):
        return await completion(http, chat=False)

    async def tokens(http: HttpRequest, encode: bool):
        """vLLM's POST /tokenize and /detokenize: the ids this server feeds for a prompt or a conversation, and text
        back from ids (the same ids as `mistral-trt tokenize`)."""
        if (denied := unauthorized(http)) is not None:
            return denied
        if state.scheduler is None:
            return error(not_ready())

        def run(raw: bytes) -> dict:
            body = _parse(raw)
            return _tokenize(body, state) if encode else _detokenize(body, state)
        try:
            return JSONResponse(await asyncio.to_thread(run, await read_body(http)))
        except ApiError as e:
            return error(e)

    async def tokenize(http):
        return await tokens(http, encode=True)

    async def detokenize(http):
        return await tokens(http, encode=False)

    async def models(http):
        if (denied := unauthorized(http)) is not None:
            return denied
        return JSONResponse({"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0,
                                                         "owned_by": "mistral-trt",
                                                         "max_model_len": state.max_context}]})  # vLLM's field name

    async def health(http):
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if state.scheduler is None:
            return JSONResponse({"status": "loading" if not state.load_error else "failed",
                                 "error": state.load_error}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics(http):
        if state.protect_metrics and (denied := unauthorized(http)) is not None:
            return denied
        if state.metrics is None:
            return PlainTextResponse("", status_code=503)
        return Response(state.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def http_error(http, exc: HTTPException):  # Starlette's own 404 and 405, in OpenAI's shape
        message = {404: f"no such path: {http.url.path}", 405: f"{http.method} is not allowed on {http.url.path}"}
        return error(ApiError(exc.status_code, message.get(exc.status_code, exc.detail), code=None,
                              headers=exc.headers))

    middleware = [Middleware(AccessLog, state=state)]
    if state.allowed_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(state.allowed_origins),
                                     allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"],
                                     expose_headers=["X-Request-Id", "Retry-After"], max_age=600))
    return Starlette(routes=[
        Route(COMPLETIONS[0], chat_completions, methods=["POST"]),
        Route(COMPLETIONS[1], completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ], middleware=middleware, exception_handlers={HTTPException: http_error})


def _parse(raw: bytes):
    """A request body as JSON, or the 400 that says why not."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, "the request body is not valid JSON: nested too deeply") from None


def _flag(body: dict, name: str, default: bool) -> bool:
    v = body.get(name, default)
    if not isinstance(v, bool):
        raise ApiError(400, f"{name}: expected true or false", param=name)
    return v


def _tokenize(body, state: ServerState) -> dict:
    """{"prompt", "add_special_tokens"} or {"messages", "add_generation_prompt"} -> {"count", "max_model_len",
    "tokens"} (and "token_strs" with return_token_strs). A conversation with add_generation_prompt (the default) is
    what a chat completion feeds; without it, the conversation as it stands (`mistral-trt tokenize`'s form)."""
    _object_of(body, state, {"model", "prompt", "add_special_tokens", "messages", "add_generation_prompt",
                             "return_token_strs"}, "/tokenize", model_required=False)
    tok, m = state.tokenizer, state.manifest
    if ("prompt" in body) == ("messages" in body):
        raise ApiError(400, "give the text as prompt or the conversation as messages (one of them)", param="prompt")
    try:
        if "prompt" in body:
            if "add_generation_prompt" in body:
                raise ApiError(400, "add_generation_prompt goes with messages", param="add_generation_prompt")
            text = body["prompt"]
            if not isinstance(text, str):
                raise ApiError(400, "prompt: expected a string", param="prompt")
            check_text(text, "prompt")
            ids = tok.encode(text, bos=tok.add_bos and _flag(body, "add_special_tokens", True)).tolist()
        else:
            if "add_special_tokens" in body:
                raise ApiError(400, "add_special_tokens goes with prompt (a conversation's special tokens are its chat "
                               "format's)", param="add_special_tokens")
            messages = check_messages(_messages(body, state))
            complete = not _flag(body, "add_generation_prompt", True)
            ids = format_chat(tok, messages, m.chat_format, m.chat_template, complete=complete)
    except UserError as e:
        raise ApiError(400, str(e), param="messages" if "messages" in body else "prompt") from None
    out = {"count": len(ids), "max_model_len": state.max_context, "tokens": [int(i) for i in ids]}
    if _flag(body, "return_token_strs", False):
        out["token_strs"] = [tok.id_to_piece(int(i)) for i in ids]
    return out


def _detokenize(body, state: ServerState) -> dict:
    _object_of(body, state, {"model", "tokens"}, "/detokenize", model_required=False)
    ids, vocab = body.get("tokens"), state.manifest.model.vocab_size
    if not (isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab
                                          for i in ids)):
        raise ApiError(400, f"tokens: expected a list of token ids in [0, {vocab})", param="tokens")
    return {"prompt": state.tokenizer.decode(ids)}


def _grammar(body: dict) -> Grammar | None:
    """What a reply must match, from the one field that says it: OpenAI's response_format (json_object, or
    json_schema with its schema), vLLM's structured_outputs (json, regex, choice, grammar, json_object), or llama.cpp's
    grammar (GBNF) and json_schema. More than one is a 400."""
    found = []
    rf = body.get("response_format")
    if rf is not None:
        kind = rf.get("type") if isinstance(rf, dict) else None
        if kind == "json_object":
            found.append(Grammar("json_schema", '{"type": "object"}', "response_format"))
        elif kind == "json_schema":
            js = rf.get("json_schema")
            schema = js.get("schema") if isinstance(js, dict) else None
            if not isinstance(schema, dict):
                raise ApiError(400, "response_format.json_schema.schema: expected a JSON schema (an object)",
                               param="response_format")
            found.append(Grammar("json_schema", _canonical(schema), "response_format.json_schema.schema"))
        elif kind != "text":
            raise ApiError(400, "response_format.type: expected text, json_object or json_schema",
                           param="response_format")
    so = body.get("structured_outputs")
    if so is not None:
        keys = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
                "json_object": "json_schema"}
        given = [k for k in (so if isinstance(so, dict) else ()) if so[k] not in (None, False)]
        if not isinstance(so, dict) or len(given) != 1 or given[0] not in keys:
            raise ApiError(400, "structured_outputs: expected exactly one of json, regex, choice, grammar, json_object",
                           param="structured_outputs")
        k, v = given[0], so[given[0]]
        origin = f"structured_outputs.{k}"
        if k == "json_object":
            v = {"type": "object"}
        if k in ("json", "json_object"):
            v = json.loads(v) if isinstance(v, str) and v.strip().startswith("{") else v
            if not isinstance(v, dict):
                raise ApiError(400, f"{origin}: expected a JSON schema (an object)", param="structured_outputs")
            found.append(Grammar("json_schema", _canonical(v), origin))
        elif k == "choice":
            if not isinstance(v, list):
                raise ApiError(400, f"{origin}: expected a list of strings", param="structured_outputs")
            found.append(Grammar("choice", json.dumps(v), origin))
        else:
            if not isinstance(v, str):
                raise ApiError(400, f"{origin}: expected a string", param="structured_outputs")
            found.append(Grammar(keys[k], v, origin))
    if body.get("grammar") is not None:
        if not isinstance(body["grammar"], str):
            raise ApiError(400, "grammar: expected a GBNF grammar (a string)", param="grammar")
        found.append(Grammar("grammar", body["grammar"], "grammar"))
    if body.get("json_schema") is not None:
        if not isinstance(body["json_schema"], dict):
            raise ApiError(400, "json_schema: expected a JSON schema (an object)", param="json_schema")
        found.append(Grammar("json_schema", _canonical(body["json_schema"]), "json_schema"))
    if len(found) > 1:
        raise ApiError(400, f"{found[0].origin} and {found[1].origin}: give one constraint per request",
                       param=found[1].origin.split(".")[0])
    return found[0] if found else None


def _choices(req: Request, n: int) -> list[Request]:
    """n requests for n choices: the same prompt; with a seed, choice i samples with seed + i (reproducible, and
    distinct); each has its own grammar matcher."""
    out = [req]
    for i in range(1, n):
        s = req.sampling
        seed = None if s.seed is None else (s.seed + i) % 2**64
        out.append(dataclasses.replace(req, sampling=dataclasses.replace(s, seed=seed),
                                       mask=req.mask.copy() if req.mask is not None else None))
    return out


def _prompt_text(body: dict, state: ServerState) -> str:
    """What `echo` puts before a completion: the prompt as sent, or its ids decoded."""
    p = body.get("prompt")
    p = p[0] if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str) else p
    return p if isinstance(p, str) else state.tokenizer.decode(p)


def _legacy_logprobs(entries: list[dict], offset: int) -> dict:
    """The chat API's per-token logprobs in /v1/completions' shape: tokens, token_logprobs, top_logprobs (a dict per
    token) and text_offset (where each token's text starts in the choice's text)."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


def _canonical(obj) -> str:
    """A schema's text with sorted keys: the compiled-grammar cache's key, so key order does not compile twice."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False)


def _request(body: dict, state: ServerState, chat: bool) -> Request:
    """The body's fields in runtime/request.py's names; its rules decide, and its messages (in the API's names) say
    why not. What is OpenAI's alone stays here: content parts, the developer role, chat's logprobs pair."""
    params = {name: body.get(name) for name in SAMPLING_RULES}
    params |= {"stop": body.get("stop"), "ignore_eos": body.get("ignore_eos"),  # vLLM's extension (benchmarks)
               "logit_bias": body.get("logit_bias"), "grammar": _grammar(body),
               "max_tokens": body.get("max_completion_tokens", body.get("max_tokens"))}
    if chat:
        params["messages"] = _messages(body, state)
        params["safe_prompt"] = body.get("safe_prompt", state.safe_prompt)
        if body.get("logprobs"):
            if not isinstance(body["logprobs"], bool):
                raise ApiError(400, "logprobs: expected true or false", param="logprobs")
            params["logprobs"] = body.get("top_logprobs", 0)
        elif body.get("top_logprobs") is not None:
            raise ApiError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
    else:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
            p = p[0]
        if isinstance(p, str):
            params |= {"text": p, "raw": True}  # a completion's prompt is the text itself
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            params["ids"] = p
        else:
            raise ApiError(400, "prompt: expected a string or a list of token ids (one prompt per request)",
                           param="prompt")
        lp = body.get("logprobs")
        if lp is not None:  # the legacy API's: an integer, the alternatives per token (0: the chosen one's only)
            if not (isinstance(lp, int) and not isinstance(lp, bool) and 0 <= lp <= 5):
                raise ApiError(400, "logprobs: expected an integer in [0, 5] on /v1/completions", param="logprobs")
            params["logprobs"] = lp
        if not isinstance(body.get("echo", False), bool):
            raise ApiError(400, "echo: expected true or false", param="echo")
        if body.get("echo") and lp is not None:
            raise ApiError(400, "echo with logprobs: the prompt's own logprobs are not computed by this server; ask "
                           "for one of them", param="echo")
    try:
        return build_request(params, state.tokenizer, state.manifest, state.max_context, HTTP,
                             Defaults(max_tokens_cap=state.limits.default_max_tokens))
    except RequestError as e:
        param = {"text": "prompt", "ids": "prompt", "logprobs": "top_logprobs"}.get(e.field, e.field)
        if e.code == "context_length_exceeded":
            param = "messages" if chat else "prompt"
        raise ApiError(400, str(e), param=param, code=e.code) from None
