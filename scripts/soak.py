"""`make soak`: `mistral-trt serve` under a bounded mix for 10 minutes (default) on 127.0.0.1, then checked.

    python scripts/soak.py EXPORT_DIR [--seconds 600] [--clients 64] [-o build/soak]

64 client threads (stdlib http.client), each picking at random (seeded) among:
    stream        a streamed chat request, greedy: its text must equal the reference
    whole         a non-streamed completion, greedy: its text must equal the reference
    cancel        a stream dropped after its first chunks, or a non-streamed request dropped after 0.3 s
    bad           a malformed body (not JSON, a wrong type, an unknown model, a bad field): a 4xx, never a 5xx
    over          past a limit (a body over --max-body-bytes: 413; max_tokens past the context: 400)
The references are the same requests sent one at a time before the load starts. Every 5 s the server's RSS and
open file descriptors (/proc) and its gauges are sampled.

It passes when: every well-formed request got its reference answer; every bad one a 4xx; no 5xx and no
connection error; at the end, with the load stopped, the gauges (running, waiting, KV slots in use) are 0, the
open descriptors are back within 8 of the idle count before the load, and RSS is flat: the median of the last minute
at most max(64 MiB, 10 %) above the median of the second minute (the first is warm-up). It writes soak.md (a table),
soak.json and soak.png (RSS and descriptors over time). Exit 0 when it passes, 1 when not.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

PROMPTS = ["Name three colours.", "What is the capital of France?", "Write a haiku about rain.",
           "Count from one to five.", "Say hello in Spanish.", "What is 12 times 12?"]
MAX_TOKENS = 24


class Client:
    def __init__(self, port: int):
        self.port = port

    def request(self, path: str, body: bytes, timeout: float = 120) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def get(self, path: str) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", path)
            return conn.getresponse().read().decode()
        finally:
            conn.close()


def chat_body(prompt: str, stream: bool) -> bytes:
    return json.dumps({"model": "soak", "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
                       "temperature": 0, "stream": stream}).encode()


def completion_body(prompt: str) -> bytes:
    return json.dumps({"model": "soak", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}).encode()


def streamed_text(raw: bytes) -> str | None:
    """The text of an SSE chat stream, None unless it ended with a finish reason and [DONE]."""
    events = [e[6:] for e in raw.decode().split("\n\n") if e.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        return None
    chunks = [json.loads(e) for e in events[:-1]]
    if any("error" in c for c in chunks) or not any(c["choices"] and c["choices"][0]["finish_reason"] for c in chunks):
        return None
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])


def gauge(text: str, name: str) -> float:
    return next((float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(name + " ")), 0.0)


def proc_sample(pid: int) -> tuple[float, int]:
    """(RSS in MiB, open file descriptors) of the server."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")) / 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export_dir")
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--output", default="build/soak")
    a = ap.parse_args(argv)
    out_dir = Path(a.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    body_limit = 256 * 1024
    cmd = [sys.executable, "-m", "mistral_trt.main", "serve", a.export_dir, "--port", "0", "--model-name", "soak",
           "--max-batch", "8", "--max-queue", str(a.clients + 8), "--max-context", "1024",
           "--max-body-bytes", str(body_limit), "--request-timeout", "120", "--max-connections", str(4 * a.clients)]
    server = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    log = open(out_dir / "server.log", "w")
    port = None
    for line in server.stderr:
        log.write(line)
        if "listening on" in line:
            port = int(line.split("listening on http://127.0.0.1:")[1].split()[0])
        if line.startswith("model ready") or "error" in line:
            break
    threading.Thread(target=lambda: [log.write(ln) for ln in server.stderr], daemon=True).start()
    c = Client(port)
    print(f"soak: server pid {server.pid} on port {port}; references ...", flush=True)
    refs_chat = {p: json.loads(c.request("/v1/chat/completions", chat_body(p, False))[1])["choices"][0]["message"]["content"]
                 for p in PROMPTS}
    refs_text = {p: json.loads(c.request("/v1/completions", completion_body(p))[1])["choices"][0]["text"]
                 for p in PROMPTS}

    counts, failures = Counter(), []
    lock = threading.Lock()
    stop_at = time.time() + a.seconds

    def record(kind: str, ok: bool, detail: str = "") -> None:
        with lock:
            counts[(kind, ok)] += 1
            if not ok and len(failures) < 50:
                failures.append(f"{kind}: {detail}")

    def client_loop(i: int) -> None:
        rng = random.Random(a.seed * 1000 + i)
        while time.time() < stop_at:
            kind = rng.choices(["stream", "whole", "cancel", "bad", "over"], [4, 3, 2, 1, 1])[0]
            p = rng.choice(PROMPTS)
            try:
                if kind == "stream":
                    status, raw = c.request("/v1/chat/completions", chat_body(p, True))
                    text = streamed_text(raw) if status == 200 else None
                    record(kind, text == refs_chat[p], f"{status} {raw[-200:]!r}")
                elif kind == "whole":
                    status, raw = c.request("/v1/completions", completion_body(p))
                    ok = status == 200 and json.loads(raw)["choices"][0]["text"] == refs_text[p]
                    record(kind, ok, f"{status} {raw[:200]!r}")
                elif kind == "cancel":
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                    stream = rng.random() < 0.5
                    body = json.dumps({"model": "soak", "prompt": p, "max_tokens": 400, "ignore_eos": True,
                                       "stream": stream}).encode()
                    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
                    if stream:
                        r = conn.getresponse()
                        r.read1(256)
                    else:
                        time.sleep(0.3)
                    conn.close()
                    record(kind, True)
                elif kind == "bad":
                    body = rng.choice([b"{not json", b'{"model": "soak", "prompt": 3}', b'{"model": "nope", "prompt": "x"}',
                                       b'{"model": "soak", "prompt": "x", "temperature": "hot"}', b"[" * 50_000,
                                       b'{"model": "soak", "messages": [{"role": "user", "content": "\\ud800"}]}'])
                    status, raw = c.request("/v1/completions" if b"messages" not in body else "/v1/chat/completions", body)
                    record(kind, 400 <= status < 500, f"{status} {raw[:200]!r}")
                else:
                    if rng.random() < 0.5:
                        body = json.dumps({"model": "soak", "prompt": "x" * (body_limit + 10)}).encode()
                        status, raw = c.request("/v1/completions", body)
                        record(kind, status == 413, f"{status} {raw[:200]!r}")
                    else:
                        status, raw = c.request("/v1/completions", json.dumps(
                            {"model": "soak", "prompt": p, "max_tokens": 5000}).encode())
                        record(kind, status == 400, f"{status} {raw[:200]!r}")
            except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
                if kind == "over" and isinstance(e, (ConnectionResetError, BrokenPipeError)):
                    record(kind, True)  # the server answered 413 and closed while the body was still being sent
                else:
                    record(kind, False, repr(e))

    samples = []  # (seconds, RSS MiB, fds, running, waiting, slots in use)
    t0 = time.time()

    def sample() -> None:
        m = c.get("/metrics")
        rss, fds = proc_sample(server.pid)
        samples.append((round(time.time() - t0, 1), round(rss, 1), fds, gauge(m, "mistral_trt_requests_running"),
                        gauge(m, "mistral_trt_requests_waiting"), gauge(m, "mistral_trt_kv_slots_in_use")))

    sample()
    fd_idle = samples[-1][2]
    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(a.clients)]
    for t in threads:
        t.start()
    while time.time() < stop_at:
        sample()
        done = sum(counts.values())
        print(f"soak: {samples[-1][0]:6.0f} s  {done} requests  RSS {samples[-1][1]:.0f} MiB  fds {samples[-1][2]}  "
              f"failures {sum(v for (k, ok), v in counts.items() if not ok)}", flush=True)
        time.sleep(5)
    for t in threads:
        t.join(180)
    time.sleep(2)  # the last cancelled requests leave their slots at the next step
    sample()
    server.send_signal(signal.SIGTERM)
    rc = server.wait(timeout=60)

    warm = [s for s in samples if 60 <= s[0] < 120] or samples[:2]
    last = [s for s in samples if s[0] >= samples[-1][0] - 60]
    rss_warm, rss_last = statistics.median(s[1] for s in warm), statistics.median(s[1] for s in last)
    bound = max(64.0, 0.10 * rss_warm)
    end = samples[-1]
    checks = {
        "every well-formed request answered correctly": not any(not ok and k in ("stream", "whole") for k, ok in counts),
        "every bad or over-limit request got its 4xx": not any(not ok and k in ("bad", "over") for k, ok in counts),
        "gauges back to 0": end[3] == end[4] == end[5] == 0,
        f"open descriptors back within 8 of {fd_idle} (idle, before the load)": end[2] <= fd_idle + 8,
        f"RSS flat: last minute {rss_last:.0f} MiB <= {rss_warm:.0f} + {bound:.0f} MiB": rss_last <= rss_warm + bound,
        "the server exited 0 on SIGTERM": rc == 0,
    }
    kinds = ["stream", "whole", "cancel", "bad", "over"]
    rows = ["| kind | requests | failed |", "|---|---|---|"]
    rows += [f"| {k} | {counts[(k, True)] + counts[(k, False)]} | {counts[(k, False)]} |" for k in kinds]
    report = [f"# soak: {a.seconds:.0f} s, {a.clients} clients, {Path(a.export_dir).name}", "", *rows, "",
              *[f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in checks.items()], "",
              f"RSS (MiB) after warm-up {rss_warm:.0f}, last minute {rss_last:.0f}, max {max(s[1] for s in samples):.0f}; "
              f"descriptors idle before the load {fd_idle}, at most {max(s[2] for s in samples)}, at the end {end[2]}."]
    if failures:
        report += ["", "First failures:", *[f"- {f}" for f in failures[:10]]]
    (out_dir / "soak.md").write_text("\n".join(report) + "\n")
    (out_dir / "soak.json").write_text(json.dumps({"seconds": a.seconds, "clients": a.clients,
                                                   "counts": {f"{k}/{'ok' if ok else 'failed'}": v
                                                              for (k, ok), v in counts.items()},
                                                   "checks": checks, "samples": samples, "failures": failures}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4))
        ax.plot([s[0] for s in samples], [s[1] for s in samples], label="RSS (MiB)")
        ax.set_xlabel("seconds")
        ax.set_ylabel("RSS (MiB)")
        ax2 = ax.twinx()
        ax2.plot([s[0] for s in samples], [s[2] for s in samples], color="tab:orange", label="open descriptors")
        ax2.set_ylabel("open descriptors")
        fig.legend(loc="lower right")
        ax.set_title(f"mistral-trt serve under soak ({a.clients} clients)")
        fig.tight_layout()
        fig.savefig(out_dir / "soak.png", dpi=100)
    except ImportError:
        report.append("(no soak.png: matplotlib is not installed; pip install 'mistral-trt[bench]')")
    print("\n".join(report))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
