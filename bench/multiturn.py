"""`mistral-trt bench-serve EXPORT_DIR --multi-turn 8x4`: conversations through `serve`, with the prefix cache and
without it (`serve --no-prefix-cache`), both servers up at once, in one run.

Each of U users holds a conversation of T turns: a system prompt shared by all (--system-len tokens of held-out
text), then per turn a question (32 tokens of held-out text, its own per user and turn), and the streamed reply
(--max-tokens tokens), re-tokenized as a chat client resends it. Users run concurrently, turns one after another;
each request is a /v1/completions prompt of token ids: the whole conversation so far. Measured per turn: the mean
prompt length, TTFT p50 / p99 on both servers, and their ratio. The target (issue 42): the last turn's TTFT at most
0.25x the same prompts fed whole.

With `--baseline llama-server`, llama.cpp's own server runs the same conversations on an f32 GGUF of the same
checkpoint (export/gguf_convert.py's write_gguf: the weights to the bit), `--parallel USERS`, continuous batching
and its prompt cache (`cache_prompt`, on by default): the binary from scripts/build_llama_server.sh, or
--llama-server BIN. Not built: its column says so, with the command that builds it.
"""
from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from mistral_trt.runtime.errors import UserError
from mistral_trt.runtime.manifest import Manifest
from mistral_trt.runtime.tokenizer import Tokenizer

from .latency import percentile
from .serving import ServerProcess, log, prompts_from_text, stream

TARGET = 0.25
LLAMA_SERVER = Path("build/llama-server/bin/llama-server")
BUILD = "bash scripts/build_llama_server.sh"


class LlamaServer:
    """`llama-server` on 127.0.0.1, a free port; stopped with SIGTERM."""

    def __init__(self, binary: Path, gguf: Path, slots: int, max_context: int):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        threads = str(len(os.sched_getaffinity(0)))
        self.proc = subprocess.Popen([str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port),
                                      "--parallel", str(slots), "-c", str(slots * max_context), "-t", threads, "-tb",
                                      threads, "--cont-batching"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        tail: list[str] = []
        threading.Thread(target=lambda: [tail.append(ln) for ln in self.proc.stderr], daemon=True).start()
        t0 = time.time()
        while True:
            if self.proc.poll() is not None:
                raise UserError(f"llama-server exited {self.proc.returncode}: {''.join(tail[-3:]).strip()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (OSError, urllib.error.HTTPError):
                pass
            if time.time() - t0 > 300:
                raise UserError("llama-server did not become ready within 300 s")
            time.sleep(0.5)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def llama_server_starter(a, m: Manifest):
    """A start(folder, slots, max_context) for llama.cpp's server on an f32 GGUF of the export's checkpoint (written
    into --output once), or the reason it cannot run (not built: the command that builds it)."""
    binary = Path(a.llama_server) if a.llama_server else LLAMA_SERVER
    if not binary.is_file():
        msg = f"llama-server: not run, {binary} is not built ({BUILD})"
        log(msg)
        return msg

    def start(folder, slots, max_context):
        from mistral_trt.export.gguf_convert import write_gguf

        source = Path(m.source["path"])
        gguf = Path(a.output) / f"{source.name}-f32.gguf"
        if not gguf.is_file():
            gguf.parent.mkdir(parents=True, exist_ok=True)
            write_gguf(source, gguf)
        return LlamaServer(binary, gguf, slots, max_context)
    return start


def conversations(send, tok: Tokenizer, system: list[int], questions: list[list[list[int]]], max_tokens: int) -> list:
    """Every user's turns, users at once: per user a list of (prompt length, TTFT seconds)."""
    out = [[] for _ in questions]

    def user(u: int) -> None:
        ids = list(system)
        for q in questions[u]:
            ids += q
            r = send(ids, max_tokens)
            out[u].append((len(ids), r["times"][0] - r["sent"]))
            ids += tok.encode(r["text"]).tolist()

    threads = [threading.Thread(target=user, args=(u,)) for u in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def main_multi_turn(a, folder: Path) -> tuple[dict, str]:
    users, turns = a.multi_turn
    m = Manifest.load(folder)
    tok = Tokenizer.for_export(folder, m)
    texts = prompts_from_text(folder, [a.system_len] + [32] * (users * turns))
    system, qs = texts[0], texts[1:]
    questions = [qs[u * turns:(u + 1) * turns] for u in range(users)]
    max_context = a.system_len + turns * (32 + a.max_tokens + 16) + 64
    servers = {"prefix cache": (), "no prefix cache": ("--no-prefix-cache",)}
    log(f"{folder.name}: {users} users x {turns} turns, a {a.system_len}-token system prompt, {a.max_tokens}-token "
        f"replies; servers with and without the prefix cache ...")
    running, results, missing = {}, {}, None
    try:
        for name, extra in servers.items():
            running[name] = ServerProcess(folder, users, max_context, extra)
        if "llama-server" in (a.baseline or []):
            start = llama_server_starter(a, m)
            if isinstance(start, str):
                missing = start
            else:
                running["llama-server"] = start(folder, users, max_context)
        for name, srv in running.items():
            send = (lambda port: lambda p, n: stream(port, p, n))(srv.port)
            send(questions[0][0], 2)  # warm-up (a prompt no conversation starts with)
            results[name] = conversations(send, tok, system, questions, a.max_tokens)
            log(f"  {name}: done")
    finally:
        for srv in running.values():
            srv.stop()
    rows = []
    for t in range(turns):
        per = {name: [r[u][t] for u in range(users)] for name, r in results.items()}
        warm, cold = ([ttft for _, ttft in per[n]] for n in servers)
        rows.append({"turn": t + 1, "prompt_tokens": sum(n for n, _ in per["prefix cache"]) / users,
                     "warm_p50_ms": 1e3 * percentile(warm, 50), "warm_p99_ms": 1e3 * percentile(warm, 99),
                     "cold_p50_ms": 1e3 * percentile(cold, 50), "cold_p99_ms": 1e3 * percentile(cold, 99)})
        if "llama-server" in per:
            theirs = [ttft for _, ttft in per["llama-server"]]
            rows[-1] |= {"llama_p50_ms": 1e3 * percentile(theirs, 50), "llama_p99_ms": 1e3 * percentile(theirs, 99)}
    last = rows[-1]
    ratio = last["warm_p50_ms"] / last["cold_p50_ms"]
    llama = "llama-server" in results
    lines = [f"### {folder.name}: {users} users x {turns} turns, system prompt {a.system_len} tokens, "
             f"replies {a.max_tokens} tokens", "",
             "| turn | prompt tokens | TTFT p50 / p99 ms, prefix cache | TTFT p50 / p99 ms, fed whole | p50 ratio |"
             + (" TTFT p50 / p99 ms, llama-server | ours / llama-server p50 |" if llama else ""),
             "|---|---|---|---|---|" + ("---|---|" if llama else "")]
    for r in rows:
        lines.append(f"| {r['turn']} | {r['prompt_tokens']:.0f} | {r['warm_p50_ms']:.0f} / {r['warm_p99_ms']:.0f} | "
                     f"{r['cold_p50_ms']:.0f} / {r['cold_p99_ms']:.0f} | {r['warm_p50_ms'] / r['cold_p50_ms']:.2f}x |"
                     + (f" {r['llama_p50_ms']:.0f} / {r['llama_p99_ms']:.0f} | "
                        f"{r['warm_p50_ms'] / r['llama_p50_ms']:.2f}x |" if llama else ""))
    lines += ["", f"Target: turn {turns}'s TTFT p50 <= {TARGET}x the same prompts fed whole: {ratio:.2f}x, "
              f"{'met' if ratio <= TARGET else 'not met'}."]
    if llama:
        later = [r["warm_p50_ms"] <= r["llama_p50_ms"] for r in rows[1:]]
        lines.append(f"Target: multi-turn TTFT p50 <= llama-server's (turns 2-{turns}): "
                     f"{'met' if all(later) else 'not met'} ({sum(later)} of {len(later)} turns).")
    if missing:
        lines.append(missing + ".")
    return {"users": users, "turns": turns, "system_len": a.system_len, "max_tokens": a.max_tokens, "turns_table": rows,
            "last_turn_ratio": ratio, "target_met": ratio <= TARGET, "llama_server": missing or llama}, "\n".join(lines)
