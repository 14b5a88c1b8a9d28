"""`mistral-trt serve` operated as a service (docs/serving.md, Operations): TLS with a real handshake, API keys,
a real CORS preflight, request ids and the access log, the metrics a dashboard reads, every limit and what it
answers, cancellation of a non-streamed request, and the drain on a real SIGTERM, repeated."""
from __future__ import annotations

import datetime
import json
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import openai
import pytest

from test_serve import Server

ROOT = Path(__file__).resolve().parents[1]


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, and its key (PEM)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_pem, key_pem = folder / "cert.pem", folder / "key.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert_pem, key_pem


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + (labels or " ")) or (not labels and line.startswith(name + "{")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class Https:
    """Raw HTTPS requests (http.client), verified against the test's certificate: (status, headers, body)."""

    class Answer:
        def __init__(self, status: int, headers: dict, text: str):
            self.status_code, self.headers, self.text = status, headers, text

        def json(self):
            return json.loads(self.text)

    def __init__(self, host: str, port: int, context: ssl.SSLContext):
        self.host, self.port, self.context = host, port, context

    def request(self, method: str, path: str, json_body=None, headers=None) -> "Https.Answer":
        import http.client

        conn = http.client.HTTPSConnection(self.host, self.port, context=self.context, timeout=60)
        data = None if json_body is None else json.dumps(json_body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        out = self.Answer(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode())
        conn.close()
        return out

    def get(self, path, headers=None):
        return self.request("GET", path, headers=headers)

    def post(self, path, json=None, headers=None):
        return self.request("POST", path, json, headers)

    def options(self, path, headers=None):
        return self.request("OPTIONS", path, headers=headers)


def access_lines(s: Server) -> list[dict]:
    return [json.loads(ln) for ln in s.lines if ln.startswith('{"time"')]


def test_serve_flags_fail_in_one_line(demo_fused, tmp_path):
    """Bad operations flags: exit 2, one line naming the flag, before a port is bound."""
    (tmp_path / "empty-keys").write_text("# no keys yet\n\n")
    (tmp_path / "not-pem").write_text("hello\n")
    cases = [
        (["--port", "70000"], "--port: expected an integer in [0, 65535], got 70000"),
        (["--api-key-file", str(tmp_path / "empty-keys")], "no keys in it"),
        (["--api-key-file", str(tmp_path / "missing")], "cannot read it"),
        (["--api-key", "two words"], "--api-key: a key is 1-256 printable ASCII characters without spaces"),
        (["--protect-metrics"], "--protect-metrics needs an API key"),
        (["--ssl-keyfile", str(tmp_path / "not-pem")], "--ssl-keyfile needs --ssl-certfile"),
        (["--ssl-certfile", str(tmp_path / "not-pem")], "not a PEM certificate and its private key"),
        (["--ssl-certfile", str(tmp_path / "missing.pem")], "no such file"),
        (["--allowed-origins", "app.example.com"], "expected an origin such as https://app.example.com"),
        (["--request-timeout", "-1"], "--request-timeout: expected a finite number > 0"),
    ]
    for args, expected in cases:
        r = subprocess.run([sys.executable, "-m", "mistral_trt.main", "serve", str(demo_fused), "--port", "0", *args],
                           capture_output=True, text=True, timeout=60)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and expected in lines[-1] and "Traceback" not in r.stderr, (args, r.stderr)


@pytest.mark.slow
def test_tls_keys_cors_request_ids_and_metrics(demo_fused, tmp_path):
    """HTTPS with the given certificate (the `openai` client verifies it); keys from --api-key (twice) and
    --api-key-file, the Bearer scheme in any case; /metrics behind a key with --protect-metrics, /health open; a CORS
    preflight from an allowed origin answered, from another refused; the X-Request-Id sent back and in the access
    log's one JSON line, which holds no prompt text; the histograms a dashboard reads, and the Grafana example's
    queries name only metrics the server exports."""
    cert, key = self_signed(tmp_path)
    (tmp_path / "keys").write_text("# team keys\nsk-file-1\n\n  sk-file-2  \n")
    origin = "https://app.example.com"
    s = Server(demo_fused, "--model-name", "demo", "--ssl-certfile", cert, "--ssl-keyfile", key,
               "--api-key", "sk-a", "--api-key", "sk-b", "--api-key-file", tmp_path / "keys", "--protect-metrics",
               "--allowed-origins", origin, "http://localhost:3000")
    try:
        assert s.url.startswith("https://127.0.0.1:")
        u = urlparse(s.url)
        served = ssl.get_server_certificate((u.hostname, u.port))
        assert ssl.PEM_cert_to_DER_cert(served) == ssl.PEM_cert_to_DER_cert(cert.read_text())
        trust = ssl.create_default_context(cafile=str(cert))
        with pytest.raises(openai.APIConnectionError):  # an unknown certificate is refused by the client
            openai.OpenAI(base_url=s.url + "/v1", api_key="sk-a", max_retries=0).models.list()
        secret = "the secret words are porcupine and lantern"
        for k in ("sk-a", "sk-b", "sk-file-1", "sk-file-2"):
            client = openai.OpenAI(base_url=s.url + "/v1", api_key=k, max_retries=0, timeout=60,
                                   http_client=openai.DefaultHttpxClient(verify=trust))
            r = client.chat.completions.with_raw_response.create(
                model="demo", messages=[{"role": "user", "content": secret}], max_tokens=4, temperature=0,
                extra_headers={"X-Request-Id": f"req-{k}"})
            assert r.headers["x-request-id"] == f"req-{k}" and r.parse().usage.completion_tokens >= 1
        http = Https(u.hostname, u.port, trust)
        body = {"model": "demo", "prompt": "Hi", "max_tokens": 2}
        assert http.post("/v1/completions", json=body, headers={"Authorization": "bearer sk-b"}).status_code == 200
        for auth in ("Bearer sk-c", "Bearer sk-aa", "Bearer SK-A", "sk-a", "Basic sk-a"):
            r = http.post("/v1/completions", json=body, headers={"Authorization": auth})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", auth
            assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])  # made when not sent
        assert http.get("/metrics").status_code == 401
        assert http.get("/health").status_code == 200
        # CORS: the preflight a browser sends before the openai JS client's POST
        pre = {"Origin": origin, "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}
        r = http.options("/v1/chat/completions", headers=pre)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        assert "POST" in r.headers["access-control-allow-methods"]
        r = http.options("/v1/chat/completions", headers={**pre, "Origin": "https://evil.example.com"})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        r = http.post("/v1/completions", json=body, headers={"Authorization": "Bearer sk-a", "Origin": origin})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
        # a 404 and a 405 in OpenAI's shape
        assert http.get("/v1/nothing").json()["error"]["message"] == "no such path: /v1/nothing"
        assert http.get("/v1/completions").status_code == 405
        text = http.get("/metrics", headers={"Authorization": "Bearer sk-file-2"}).text
        for name in ("e2e_request_latency_seconds", "request_queue_time_seconds", "request_prefill_time_seconds",
                     "request_decode_time_seconds", "request_prompt_tokens", "request_generation_tokens"):
            assert metric(text, f"mistral_trt_{name}_count") == 6, name  # the 6 completions that ran
        assert metric(text, "mistral_trt_requests_total", '{finish_reason="none",status="401"}') == 5
        dashboard = json.loads((ROOT / "docs/grafana/mistral-trt-serve.json").read_text())
        exported = set(re.findall(r"^(mistral_trt_\w+?)(?:_bucket|_count|_sum)?[{ ]", text, re.M))
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                for name in re.findall(r"mistral_trt_\w+", target["expr"]):
                    assert name.removesuffix("_bucket") in exported, (panel["title"], name)
    finally:
        assert s.stop() == 0
    lines = access_lines(s)
    mine = [ln for ln in lines if ln["request_id"].startswith("req-")]
    assert len(mine) == 4 and all(ln["status"] == 200 and ln["prompt_tokens"] > 10 and ln["completion_tokens"] >= 1
                                  and ln["e2e_s"] > 0 and ln["path"] == "/v1/chat/completions" for ln in mine)
    assert sum(ln["status"] == 401 for ln in lines) == 5
    assert "porcupine" not in "".join(s.lines)  # no prompt text without --log-prompts


def _raw(url: str, head: bytes, timeout: float = 30) -> socket.socket:
    u = urlparse(url)
    sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
    sock.sendall(head)
    return sock


def _answer(sock: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    return out


def _post_head(path: str, length: int) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n"
            "\r\n").encode()


@pytest.mark.slow
def test_limits_and_cancellation(demo_fused):
    """Slow headers (slowloris) are cut at --header-timeout, a slow body gets a 408 at --read-timeout, a request
    past --request-timeout a 408 (a stream: an error event and [DONE]), a request without max_tokens gets
    --default-max-tokens, a connection past --max-connections a 503 in OpenAI's shape; a non-streamed request whose
    client leaves is cancelled and its slot freed; afterwards every gauge is back to zero."""
    s = Server(demo_fused, "--model-name", "demo", "--header-timeout", 1, "--read-timeout", 1, "--request-timeout", 3,
               "--default-max-tokens", 7, "--max-connections", 8, "--max-batch", 4, "--log-prompts")
    long = {"model": "demo", "prompt": "Once upon a time", "max_tokens": 8000, "ignore_eos": True}
    try:
        # slowloris: a header line every 0.3 s never completes a request; each socket is closed after ~1 s
        socks = [_raw(s.url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n") for _ in range(5)]
        t0 = time.perf_counter()
        for _ in range(15):
            for sock in socks:
                try:
                    sock.sendall(b"X-A: b\r\n")
                except OSError:
                    pass
            time.sleep(0.3)
            if all(_readable(sock) for sock in socks):
                break
        answers = [_answer(sock) for sock in socks]
        assert time.perf_counter() - t0 < 4 and all(a.startswith(b"HTTP/1.1 408 ") for a in answers), answers
        assert b'"code": "request_timeout"' in answers[0]
        # a slow body: 10 of 100 bytes, then nothing
        sock = _raw(s.url, _post_head("/v1/completions", 100) + b'{"model": ')
        answer = _answer(sock).decode()
        assert answer.startswith("HTTP/1.1 408 ") and "--read-timeout" in answer
        # --request-timeout: non-streamed, then streamed
        status, err, _ = s.post("/v1/completions", long, key=None)
        assert status == 408 and err["error"]["code"] == "request_timeout" and "3 s" in err["error"]["message"]
        with urllib.request.urlopen(urllib.request.Request(
                s.url + "/v1/completions", data=json.dumps({**long, "stream": True}).encode(),
                headers={"Content-Type": "application/json"}), timeout=30) as r:
            events = r.read().decode().split("\n\n")
        assert events[-2] == "data: [DONE]" and '"code": "request_timeout"' in events[-3]
        assert len(events) > 3, events  # text came before the limit (ignore_eos: EOS and specials add no events)
        # --default-max-tokens
        status, out, _ = s.post("/v1/completions", {"model": "demo", "prompt": "Hi", "ignore_eos": True}, key=None)
        assert status == 200 and out["usage"]["completion_tokens"] == 7 and out["choices"][0]["finish_reason"] == "length"
        _wait(lambda: any(ln.get("prompt") == "Hi" for ln in access_lines(s)), 5)  # --log-prompts
        # a lone surrogate (JSON "\ud800") in every string and key of a chat and a completion body: never a 5xx
        chat = {"model": "demo", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [
            {"type": "text", "text": "Hi"}]}], "stop": ["x"], "max_tokens": 2, "user": "u1"}
        for path, body in (("/v1/chat/completions", chat),
                           ("/v1/completions", {"model": "demo", "prompt": ["Hi"], "stop": "y", "max_tokens": 2})):
            for bad in _with_surrogate(body):
                status, err, _ = s.post(path, None, key=None, raw=json.dumps(bad).encode())
                assert status < 500 and (status == 200 or "error" in err), (bad, status, err)
        # --max-connections 8: 8 connections holding streams, the 9th gets a 503
        held = [_raw(s.url, _post_head("/v1/completions", len(json.dumps({**long, "stream": True})))
                     + json.dumps({**long, "stream": True}).encode()) for _ in range(8)]
        for sock in held:
            assert sock.recv(64).startswith(b"HTTP/1.1 200")
        status, err, headers = s.post("/v1/completions", {"model": "demo", "prompt": "Hi"}, key=None)
        assert status == 503 and err["error"]["code"] == "server_overloaded" and headers["retry-after"] == "1"
        for sock in held:
            sock.close()
        # a non-streamed request whose client leaves: cancelled, its slot free at the next step
        _wait(lambda: metric(s.get("/metrics")[1], "mistral_trt_kv_slots_in_use") == 0, 10)
        sock = _raw(s.url, _post_head("/v1/completions", len(json.dumps(long))) + json.dumps(long).encode())
        _wait(lambda: metric(s.get("/metrics")[1], "mistral_trt_kv_slots_in_use") == 1, 10)
        sock.close()
        t0 = time.perf_counter()
        _wait(lambda: metric(s.get("/metrics")[1], "mistral_trt_kv_slots_in_use") == 0, 10)
        assert time.perf_counter() - t0 < 1.0
        text = s.get("/metrics")[1]
        assert metric(text, "mistral_trt_requests_total", '{finish_reason="cancelled",status="499"}') >= 9
        assert metric(text, "mistral_trt_requests_total", '{finish_reason="timeout",status="408"}') == 1
        assert metric(text, "mistral_trt_requests_total", '{finish_reason="timeout",status="200"}') == 1
        assert metric(text, "mistral_trt_connections_refused_total") >= 1
        for gauge in ("mistral_trt_requests_running", "mistral_trt_requests_waiting", "mistral_trt_kv_slots_in_use"):
            assert metric(text, gauge) == 0, gauge
        assert s.get("/health")[0] == 200
    finally:
        assert s.stop() == 0


def _with_surrogate(body):
    """`body` with "\ud800" put into one string or key at a time, for each string and key in it."""
    if isinstance(body, str):
        yield body + "\ud800"
    elif isinstance(body, list):
        for i, v in enumerate(body):
            for bad in _with_surrogate(v):
                yield [*body[:i], bad, *body[i + 1:]]
    elif isinstance(body, dict):
        for k, v in body.items():
            yield {**{kk: vv for kk, vv in body.items() if kk != k}, k + "\ud800": v}
            for bad in _with_surrogate(v):
                yield {**body, k: bad}


def _readable(sock: socket.socket) -> bool:
    import select

    return bool(select.select([sock], [], [], 0)[0])


def _wait(cond, seconds: float) -> None:
    t0 = time.perf_counter()
    while not cond():
        assert time.perf_counter() - t0 < seconds, "timed out"
        time.sleep(0.05)


def _stream(url: str, body: dict, out: list) -> threading.Thread:
    def run():
        req = urllib.request.Request(url + "/v1/completions", data=json.dumps({**body, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                out.append((r.status, r.read().decode()))
        except Exception as e:  # a cut connection is what this test looks for
            out.append((None, repr(e)))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.slow
def test_sigterm_drains_without_a_race_20_times(demo_fused):
    """20 loops of streams, then SIGTERM: a stream that can finish within --shutdown-timeout ends with its
    finish_reason and [DONE]; one that cannot ends at the deadline with an error event and [DONE]; meanwhile
    /health says draining and a new request gets a 503 with Retry-After; the process exits 0 every time, with no
    traceback. Then a second SIGTERM: the deadline moves to now."""
    short = {"model": "demo", "prompt": "Hello", "max_tokens": 12, "ignore_eos": True}
    long = {"model": "demo", "prompt": "Hello", "max_tokens": 8000, "ignore_eos": True}
    for loop in range(20):
        s = Server(demo_fused, "--model-name", "demo", "--shutdown-timeout", 1.5)
        outs = [[], []]
        threads = [_stream(s.url, short, outs[0]), _stream(s.url, long, outs[1])]
        _wait(lambda: metric(s.get("/metrics")[1], "mistral_trt_generation_tokens_total") >= 2, 30)
        s.proc.send_signal(signal.SIGTERM)
        if loop == 0:
            time.sleep(0.2)
            assert s.get("/health") == (503, '{"status":"draining"}')
            status, err, headers = s.post("/v1/completions", short, key=None)
            assert status == 503 and err["error"]["code"] == "server_shutting_down" and headers["retry-after"] == "1"
        for t in threads:
            t.join(30)
        assert s.proc.wait(timeout=30) == 0, "".join(s.lines)
        (st0, text0), (st1, text1) = outs[0][0], outs[1][0]
        assert st0 == 200 and text0.endswith("data: [DONE]\n\n") and '"finish_reason": "length"' in text0, text0[-300:]
        assert st1 == 200 and text1.endswith("data: [DONE]\n\n") and '"code": "server_shutting_down"' in text1, text1[-300:]
        assert not any("Traceback" in ln or "internal error" in ln for ln in s.lines), "".join(s.lines)
    # a second SIGTERM: no waiting for --shutdown-timeout
    s = Server(demo_fused, "--model-name", "demo", "--shutdown-timeout", 60)
    out = []
    t = _stream(s.url, long, out)
    _wait(lambda: metric(s.get("/metrics")[1], "mistral_trt_generation_tokens_total") >= 2, 30)
    s.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    t0 = time.perf_counter()
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(timeout=30) == 0 and time.perf_counter() - t0 < 5
    t.join(10)
    assert out[0][1].endswith("data: [DONE]\n\n") and '"code": "server_shutting_down"' in out[0][1]


def test_a_cancelled_waiting_request_leaves_the_queue(tiny_fused):
    """--max-queue counts requests still wanted: one cancelled while it waits leaves the queue at once (the soak
    found clients that gave up, then asked again, refused with 429 by their own abandoned requests)."""
    import numpy as np

    from mistral_trt.runtime.backend import open_backend
    from mistral_trt.runtime.request import Request
    from mistral_trt.runtime.sampling import Sampling
    from mistral_trt.runtime.tokenizer import Tokenizer
    from mistral_trt.serve.scheduler import QueueFull, Scheduler

    backend = open_backend(tiny_fused["full"])
    sched = Scheduler(backend, Tokenizer.for_export(tiny_fused["full"], backend.manifest), max_batch=1, max_queue=1,
                      max_context=256)  # not started: nothing is admitted, so the queue is what is tested
    req = Request(np.arange(5, 15, dtype=np.int64), 4, Sampling())
    first = sched.submit(req, emit=lambda out: None)
    with pytest.raises(QueueFull):
        sched.submit(req, emit=lambda out: None)
    first.cancel()
    assert len(sched.waiting) == 0
    sched.submit(req, emit=lambda out: None)
    assert len(sched.waiting) == 1
