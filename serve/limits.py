"""What one client may take from the server, and what it gets past each limit (docs/serving.md, "Operations").

    body        --max-body-bytes 8 MiB      413 request_too_large, decided from Content-Length, else while reading
    headers     --header-timeout 10 s       the connection is closed (408 if part of a request came)
    body time   --read-timeout 60 s         408 request_timeout: the body's last byte came too late
    wall time   --request-timeout 900 s     408 request_timeout (a stream: an error event, then [DONE])
    max_tokens  --default-max-tokens 2048   when a request leaves it out (never past the context's room)
    connections --max-connections 512       503 server_overloaded to a request on a connection past the limit

uvicorn has no header timeout: its keep-alive timer stops at a request's first byte, so a client that sends a
byte every few seconds holds a connection (and a file descriptor) forever (slowloris). `protocol()` adds one to
uvicorn's h11 protocol, and answers connections past the limit itself, in OpenAI's error shape.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

MiB = 2**20


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 8 * MiB
    header_timeout: float = 10.0  # from a connection's start (or its previous response) to a request's full headers
    read_timeout: float = 60.0  # from the headers to the body's last byte
    request_timeout: float = 900.0  # from the body's last byte to the response's; 0: none
    default_max_tokens: int = 2048
    max_connections: int = 512


def error_body(message: str, type_: str, code: str, param: str | None = None) -> bytes:
    # ASCII JSON: a message quoting the client's text stays valid even if that text held lone surrogates
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}}).encode()


def raw_response(status: int, reason: str, body: bytes, headers: dict | None = None) -> bytes:
    """A whole HTTP/1.1 response, for the protocol to write where no request cycle exists; the connection closes."""
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(body)}",
            "connection: close", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def protocol(limits: Limits, on_refused=lambda: None):
    """uvicorn's h11 protocol with a header timeout and a connection limit (pass it as Config(http=...))."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    overloaded = error_body(f"This server holds at most {limits.max_connections} connections (serve "
                            "--max-connections); retry shortly", "server_error", "server_overloaded")

    async def refuse(scope, receive, send):  # the app of a connection past the limit
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": overloaded})

    class Protocol(H11Protocol):
        header_timer = None
        received = False  # bytes of a request came since the timer was armed

        def connection_made(self, transport) -> None:
            refused = len(self.connections) >= limits.max_connections
            super().connection_made(transport)
            if refused:  # its first request gets the 503; it does not count, and gets 1 s to send that request
                self.connections.discard(self)
                self.app = refuse
                on_refused()
            self._arm(1.0 if refused else limits.header_timeout)

        def data_received(self, data: bytes) -> None:
            cycle = self.cycle
            self.received = True
            super().data_received(data)
            if self.cycle is not cycle:  # a request's headers are complete: the body has --read-timeout
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._arm(limits.header_timeout)

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self, seconds: float) -> None:
            self._disarm()
            self.received = False
            self.header_timer = self.loop.call_later(seconds, self._headers_too_slow)

        def _disarm(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _headers_too_slow(self) -> None:
            self.header_timer = None
            if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
                return
            if self.received:
                self.transport.write(raw_response(408, "Request Timeout", error_body(
                    f"the request's headers did not arrive within {limits.header_timeout:g} s (serve --header-timeout)",
                    "invalid_request_error", "request_timeout")))
            self.transport.close()

    return Protocol
