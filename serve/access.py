"""Who may call, and what is written about each call.

API keys: `serve --api-key KEY` (repeatable), `--api-key-file FILE` (one key a line; blank lines and # comments
skipped) and $MISTRAL_TRT_API_KEY together; a request must send one as `Authorization: Bearer KEY` (the scheme in
any case, RFC 9110). Keys are compared in constant time, each one, so the time taken says nothing about how much of
a key was right. `--protect-metrics` asks for a key on /metrics too; /health stays open for load balancers.

The access log: one JSON line per completion request on stderr, when its response has ended:

    {"time": "2026-12-06T10:00:00.123Z", "request_id": "...", "client": "127.0.0.1", "method": "POST",
     "path": "/v1/chat/completions", "status": 200, "finish_reason": "stop", "prompt_tokens": 21,
     "completion_tokens": 9, "queue_s": 0.0004, "ttft_s": 0.071, "e2e_s": 0.32}

The request id is the client's `X-Request-Id` (1-128 printable ASCII characters), else a new one; the response
carries it back. Prompt text is never logged unless `--log-prompts`. `status` is the status sent; 499 when the
client went away first (nginx's convention), also as the `status` label of mistral_trt_requests_total.
"""
from __future__ import annotations

import datetime
import hmac
import json
import os
import re
import sys
import time
import uuid
from pathlib import Path

from mistral_trt.runtime.errors import UserError

KEY = re.compile(r"[\x21-\x7e]{1,256}")  # a bearer token: printable ASCII, no spaces
REQUEST_ID = re.compile(r"[\x20-\x7e]{1,128}")
COMPLETIONS = ("/v1/chat/completions", "/v1/completions")


def load_keys(keys: list[str] | None, key_file: str | None) -> tuple[bytes, ...]:
    """The flags' keys, the file's and $MISTRAL_TRT_API_KEY; empty: no key is asked for."""
    found = [(k, "--api-key") for k in keys or []]
    env = os.environ.get("MISTRAL_TRT_API_KEY")
    if env:
        found.append((env, "MISTRAL_TRT_API_KEY"))
    if key_file is not None:
        try:
            lines = Path(key_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--api-key-file {key_file}: cannot read it: {getattr(e, 'strerror', None) or e}") from None
        in_file = [(ln.strip(), f"--api-key-file {key_file}, line {i}") for i, ln in enumerate(lines, 1)
                   if ln.strip() and not ln.lstrip().startswith("#")]
        if not in_file:
            raise UserError(f"--api-key-file {key_file}: no keys in it (one a line; # starts a comment)")
        found += in_file
    for key, where in found:
        if not KEY.fullmatch(key):
            raise UserError(f"{where}: a key is 1-256 printable ASCII characters without spaces")
    return tuple(dict.fromkeys(k.encode() for k, _ in found))


def key_ok(authorization: str | None, keys: tuple[bytes, ...]) -> bool:
    if not keys:
        return True
    scheme, _, token = (authorization or "").partition(" ")
    given = token.strip().encode("utf-8", "surrogateescape")
    ok = False
    for k in keys:  # every key, whatever matched: the time does not depend on which
        ok |= hmac.compare_digest(given, k)
    return ok and scheme.lower() == "bearer"


def request_id(scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            v = value.decode("latin-1")
            if REQUEST_ID.fullmatch(v):
                return v
    return uuid.uuid4().hex


class AccessLog:
    """ASGI middleware: the request id (taken or made, sent back), the access-log line, and the requests counter
    (by the status actually sent). The endpoint fills `scope["mistral_trt"]` (finish reason, tokens, timings)."""

    def __init__(self, app, state, write=None):
        self.app, self.state = app, state
        self.write = write or (lambda line: print(line, file=sys.stderr, flush=True))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        rid = request_id(scope)
        record = scope["mistral_trt"] = {"request_id": rid}
        t0 = time.perf_counter()
        sent = {}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            status = 499 if record.get("client_gone") else sent.get("status", 500)
            self._finish(scope, record, status, time.perf_counter() - t0)

    def _finish(self, scope, record: dict, status: int, seconds: float) -> None:
        reason = record.get("finish_reason", "none")
        metrics = self.state.metrics
        if metrics is not None and scope["path"] in COMPLETIONS:
            metrics.requests.labels(status=str(status), finish_reason=reason).inc()
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
        line = {"time": now.replace("+00:00", "Z"),
                "request_id": record["request_id"], "client": (scope.get("client") or ("",))[0],
                "method": scope["method"], "path": scope["path"], "status": status, "finish_reason": reason}
        for k in ("user", "prompt_tokens", "completion_tokens", "queue_s", "ttft_s", "error"):
            if record.get(k) is not None:
                line[k] = record[k]
        line["e2e_s"] = round(seconds, 4)
        if self.state.log_prompts and "prompt" in record:
            line["prompt"] = record["prompt"]
        self.write(json.dumps(line))  # ASCII: whatever a prompt held, the line stays one valid line
