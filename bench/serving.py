"""`mistral-trt bench-serve`: the server under concurrent streaming clients, over real HTTP, in one run.

For each export folder a `mistral-trt serve` process is started on 127.0.0.1, then, for each concurrency c,
c client threads send streaming /v1/completions requests back to back (prompts of mixed lengths cut from
held-out text, the same for every system; `ignore_eos` so each yields exactly --max-tokens tokens) until
--rounds x c requests are done. Measured per level:

    throughput   generated tokens / wall time, all clients together
    TTFT         request sent -> first token, p50 / p99
    ITL          time between a stream's consecutive tokens, p50 / p99
    one at a time  concurrency 1 is the baseline every other level is compared with

and one interference run: short streams decoding while a long prompt arrives; their ITL before and while it
is prefilled (chunked prefill bounds it). Writes bench-serve.md, bench-serve.json and bench-serve.png.

With --triton or --speculate, each export is also served by Triton or by `serve --speculate`, all up at once, the
levels alternated between them. Tokens are timed as their stream events arrive: a speculative step's tokens come
out together, so its ITL p50 is the gap inside such a burst and p99 the gap between steps.
"""
from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from mistral_trt.runtime.errors import UserError
from mistral_trt.runtime.manifest import DTYPE_BYTES, Manifest

from .latency import percentile

# Mistral-7B-Instruct-v0.2's config.json numbers, for the slots-per-GPU estimate on paper
MISTRAL_7B = {"num_layers": 32, "num_kv_heads": 8, "head_dim": 128, "params": 7.24e9, "max_context": 32768}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class ServerProcess:
    def __init__(self, export_dir: Path, slots: int, max_context: int, extra=()):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mistral_trt.main", "serve", str(export_dir), "--port", "0", "--max-batch", str(slots),
             "--max-queue", "1000", "--max-context", str(max_context), "--model-name", "bench", *extra],
            stderr=subprocess.PIPE, text=True)
        self.port = None
        for line in self.proc.stderr:
            if "listening on" in line:
                self.port = int(line.split("127.0.0.1:")[1].split()[0].split("/")[0]) if "127.0.0.1:" in line else None
            if line.startswith("model ready"):
                break
            if "error" in line:
                raise UserError(f"the server did not start: {line.strip()}")
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()
        if self.port is None:
            raise UserError("the server did not start")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)


def stream(port: int, prompt: list[int], max_tokens: int) -> dict:
    """One streaming request; returns sent time, token times."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "ignore_eos": True, "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise UserError(f"the server answered {resp.status}: {resp.read()[:200]}")
    times, tokens, text = [], 0, []
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        ev = json.loads(line[6:])
        now = time.perf_counter()
        if ev.get("usage"):
            tokens = ev["usage"]["completion_tokens"]
        elif ev["choices"] and ev["choices"][0]["text"]:
            times.append(now)
            text.append(ev["choices"][0]["text"])
    conn.close()
    return {"sent": t0, "times": times, "tokens": tokens or len(times), "text": "".join(text)}


def stream_triton(port: int, prompt: list[int], max_tokens: int) -> dict:
    """One streaming request to Triton's /generate_stream (serve/triton_model.py's inputs), timed as stream()."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"input_ids": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
                       "temperature": 0})
    t0 = time.perf_counter()
    conn.request("POST", "/v2/models/bench/generate_stream", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise UserError(f"tritonserver answered {resp.status}: {resp.read()[:200]}")
    times = []
    for raw in resp:
        line = raw.decode().strip()
        if line.startswith("data: ") and json.loads(line[6:]).get("text_output"):
            times.append(time.perf_counter())
    conn.close()
    return {"sent": t0, "times": times, "tokens": max_tokens}


class TritonProcess:
    """`triton-serve` on a repository of the export (in a temporary folder), via `cli`: a mistral-trt command whose
    environment has nvidia-pytriton (`make test-triton`'s venv)."""

    def __init__(self, cli: str, export_dir: Path, slots: int, max_context: int):
        import socket
        import tempfile

        self.work = Path(tempfile.mkdtemp(prefix="mistral-trt-bench-triton-"))
        repo = self.work / "repo"
        r = subprocess.run([cli, "triton-repo", str(export_dir), "-o", str(repo), "--name", "bench", "--max-batch",
                            str(slots), "--max-queue", "1000", "--max-context", str(max_context), "--force"],
                           capture_output=True, text=True)
        if r.returncode:
            raise UserError(f"triton-repo failed: {r.stderr.strip()[-300:]}")
        socks = [socket.socket() for _ in range(3)]
        for sk in socks:
            sk.bind(("127.0.0.1", 0))
        self.port, grpc, metrics = (sk.getsockname()[1] for sk in socks)
        for sk in socks:
            sk.close()
        self.proc = subprocess.Popen([cli, "triton-serve", str(repo), "--http-port", str(self.port), "--grpc-port",
                                      str(grpc), "--metrics-port", str(metrics)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/v2/health/ready")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                raise UserError("tritonserver did not start (run `mistral-trt triton-serve` by hand to see why)")
            time.sleep(0.5)

    def stop(self) -> None:
        import shutil

        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)
        shutil.rmtree(self.work, ignore_errors=True)


def run_level(send, prompts: list[list[int]], clients: int, max_tokens: int) -> dict:
    """`send(prompt, max_tokens)`: one streaming request (stream() or stream_triton())."""
    results, lock, errors = [], threading.Lock(), []
    todo = list(prompts)

    def client():
        while True:
            with lock:
                if not todo or errors:
                    return
                p = todo.pop()
            try:
                r = send(p, max_tokens)
            except Exception as e:  # raised again below, in the caller's thread
                errors.append(e)
                return
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    wall = time.perf_counter() - t0
    ttft = [r["times"][0] - r["sent"] for r in results if r["times"]]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": clients, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "throughput_tok_s": tokens / wall, "ttft_p50_ms": 1e3 * percentile(ttft, 50),
            "ttft_p99_ms": 1e3 * percentile(ttft, 99), "itl_p50_ms": 1e3 * percentile(itl, 50),
            "itl_p99_ms": 1e3 * percentile(itl, 99)}


def interference(send, short: list[list[int]], long_prompt: list[int], max_tokens: int) -> dict:
    """Short streams decode; once they run, a long prompt arrives. Their ITL before it and while it is in."""
    out, lock, errors = [], threading.Lock(), []

    def run(p, n):
        try:
            r = send(p, n)
        except Exception as e:  # raised again below, in the caller's thread
            errors.append(e)
            return
        with lock:
            out.append((p is long_prompt, r))

    threads = [threading.Thread(target=run, args=(p, max_tokens)) for p in short]
    for t in threads:
        t.start()
    time.sleep(1.0)  # the short ones are decoding
    arrive = time.perf_counter()
    tl = threading.Thread(target=run, args=(long_prompt, 8))
    tl.start()
    for t in threads + [tl]:
        t.join()
    if errors:
        raise errors[0]
    long_r = next(r for is_long, r in out if is_long)
    first = long_r["times"][0] if long_r["times"] else arrive
    before, during = [], []
    for is_long, r in out:
        if is_long:
            continue
        for a, b in zip(r["times"], r["times"][1:]):
            (during if arrive <= b <= first else before if b < arrive else []).append(b - a)
    return {"streams": len(short), "long_prompt_tokens": len(long_prompt), "long_ttft_ms": 1e3 * (first - arrive),
            "itl_before_p50_ms": 1e3 * percentile(before, 50) if before else None,
            "itl_during_p50_ms": 1e3 * percentile(during, 50) if during else None,
            "itl_during_p99_ms": 1e3 * percentile(during, 99) if during else None, "intervals_during": len(during)}


def prompts_from_text(export_dir: Path, lengths: list[int]) -> list[list[int]]:
    """Prompts of these lengths cut from held-out text, each from its own offset: no two begin at the same place,
    so none is a prefix of another (a prefix cache finds nothing it was not shown on purpose)."""
    from mistral_trt.calib.data import eval_text
    from mistral_trt.runtime.tokenizer import Tokenizer

    ids = Tokenizer.for_export(export_dir, Manifest.load(export_dir)).encode(eval_text()).tolist()
    room = len(ids) - max(lengths)
    if room < len(lengths):
        raise UserError(f"the held-out text has {len(ids)} tokens: too few for {len(lengths)} prompts of up to "
                        f"{max(lengths)} (shorten --prompt-len or --long-prompt)")
    starts = np.random.default_rng(len(lengths)).choice(room, len(lengths), replace=False)
    return [ids[a:a + n] for a, n in zip(starts.tolist(), lengths)]


def slots_on_paper(m: Manifest, max_context: int) -> list[str]:
    a = m.model
    kv_token = 2 * a.num_layers * a.num_kv_heads * a.head_dim * DTYPE_BYTES[m.dtype]
    b7 = MISTRAL_7B
    kv7 = 2 * b7["num_layers"] * b7["num_kv_heads"] * b7["head_dim"] * 2  # fp16
    free = 80e9 - b7["params"] * 2 - 4e9  # an 80 GB GPU, fp16 weights, ~4 GB activations and workspace
    lines = [f"- this export: {kv_token / 1024:.1f} KiB of KV cache per position, {kv_token * max_context / 2**20:.0f} MiB "
             f"per slot at {max_context} positions"]
    for ctx in (4096, b7["max_context"]):
        lines.append(f"- Mistral-7B fp16 on an 80 GB GPU (on paper): {kv7 / 1024:.0f} KiB per position, "
                     f"{kv7 * ctx / 2**30:.2f} GiB per slot at {ctx} positions: {int(free // (kv7 * ctx))} slots "
                     f"beside {b7['params'] * 2 / 1e9:.1f} GB of weights")
    return lines


def report(data: dict) -> str:
    lines = ["| export | concurrency | prompts | requests | tokens/s (all streams) | x one stream | TTFT p50 ms | "
             "TTFT p99 ms | ITL p50 ms | ITL p99 ms | ITL p99 / one-stream p50 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, sysd in data["systems"].items():
        one = sysd["levels"][0]
        for lv in sysd["levels"]:
            lines.append(f"| {name} | {lv['concurrency']} | {lv.get('round', 'cold')} | {lv['requests']} | "
                         f"{lv['throughput_tok_s']:.1f} | "
                         f"{lv['throughput_tok_s'] / one['throughput_tok_s']:.2f}x | {lv['ttft_p50_ms']:.0f} | "
                         f"{lv['ttft_p99_ms']:.0f} | {lv['itl_p50_ms']:.1f} | {lv['itl_p99_ms']:.1f} | "
                         f"{lv['itl_p99_ms'] / one['itl_p50_ms']:.2f} |")
    lines += ["", "A long prompt arriving while short streams decode (their inter-token latency):", "",
              "| export | streams | long prompt | its TTFT ms | ITL p50 before | ITL p50 during | ITL p99 during | p99 during / p50 before |",
              "|---|---|---|---|---|---|---|---|"]
    for name, sysd in data["systems"].items():
        x = sysd["interference"]
        ratio = x["itl_during_p99_ms"] / x["itl_before_p50_ms"] if x["itl_during_p99_ms"] and x["itl_before_p50_ms"] else float("nan")
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        lines.append(f"| {name} | {x['streams']} | {x['long_prompt_tokens']} | {x['long_ttft_ms']:.0f} | "
                     f"{fmt(x['itl_before_p50_ms'])} | {fmt(x['itl_during_p50_ms'])} | {fmt(x['itl_during_p99_ms'])} | "
                     f"{ratio:.2f} |")
    if "llama-server" in data["systems"]:
        lines += [""] + against_llama_server(data)
    lines += [f"{note}." for note in data.get("notes", [])]
    lines += ["", "KV-cache memory per slot:", ""] + data["slots_on_paper"]
    return "\n".join(lines)


def against_llama_server(data: dict) -> list[str]:
    """Ours over llama.cpp's server, level by level and round by round (cold: prompts never seen; warm: the same
    prompts again), and the targets of issue 42."""
    theirs = {(lv["concurrency"], lv.get("round", "cold")): lv for lv in data["systems"]["llama-server"]["levels"]}
    lines = ["Against llama.cpp's server (the same prompts, levels alternated; ratios ours / llama-server):", "",
             "| export | concurrency | prompts | tokens/s ours / llama | ratio | TTFT p50 ms ours / llama | "
             "ITL p99 ms ours / llama |", "|---|---|---|---|---|---|---|"]
    checks = {"tokens/s >= llama-server's at every level, cold and warm": [],
              "repeated-prompt (warm) TTFT p50 <= llama-server's": [],
              f"ITL p99 at {max(c for c, _ in theirs)} streams <= llama-server's": []}
    for name, sysd in data["systems"].items():
        if name == "llama-server":
            continue
        for lv in sysd["levels"]:
            key = (lv["concurrency"], lv.get("round", "cold"))
            t = theirs[key]
            ratio = lv["throughput_tok_s"] / t["throughput_tok_s"]
            lines.append(f"| {name} | {key[0]} | {key[1]} | {lv['throughput_tok_s']:.1f} / {t['throughput_tok_s']:.1f} "
                         f"| {ratio:.2f}x | {lv['ttft_p50_ms']:.0f} / {t['ttft_p50_ms']:.0f} | "
                         f"{lv['itl_p99_ms']:.0f} / {t['itl_p99_ms']:.0f} |")
            checks["tokens/s >= llama-server's at every level, cold and warm"].append(ratio >= 1)
            if key[1] == "warm":
                checks["repeated-prompt (warm) TTFT p50 <= llama-server's"].append(lv["ttft_p50_ms"] <= t["ttft_p50_ms"])
            if key[0] == max(c for c, _ in theirs):
                checks[f"ITL p99 at {key[0]} streams <= llama-server's"].append(lv["itl_p99_ms"] <= t["itl_p99_ms"])
    lines.append("")
    for what, ok in checks.items():
        if ok:
            lines.append(f"Target: {what}: {'met' if all(ok) else 'not met'} ({sum(ok)} of {len(ok)}).")
    return lines


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mistral_trt.calib.evaluate import save_png

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, sysd in data["systems"].items():
        for round_, style in (("cold", "-"), ("warm", ":")):
            lvs = [lv for lv in sysd["levels"] if lv.get("round", "cold") == round_]
            if not lvs:
                continue
            tag = f"{name}{', warm' if round_ == 'warm' else ''}"
            c = [lv["concurrency"] for lv in lvs]
            a.plot(c, [lv["throughput_tok_s"] for lv in lvs], "o" + style, label=tag)
            b.plot(c, [lv["itl_p50_ms"] for lv in lvs], "o" + style, label=f"{tag} p50")
            b.plot(c, [lv["itl_p99_ms"] for lv in lvs], "x" + style, label=f"{tag} p99")
    for ax, title in ((a, "generated tokens/s, all streams"), (b, "inter-token latency, ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    save_png(fig, path)


def main_bench_serve(a) -> None:
    from mistral_trt.export.atomic import plotted_report_folder

    if a.multi_turn:
        unread = sorted(set(getattr(a, "given", ())) & {"--concurrency", "--rounds", "--prompt-len", "--long-prompt",
                                                        "--triton", "--speculate", "--warm"})
        if unread:
            raise UserError(f"{', '.join(unread)}: not read by --multi-turn (its load: USERSxTURNS, --system-len, "
                            "--max-tokens)")
    if a.llama_server and "llama-server" not in (a.baseline or []):
        raise UserError("--llama-server goes with --baseline llama-server")
    if a.multi_turn:
        return main_bench_multi_turn(a)
    if "--system-len" in getattr(a, "given", ()):
        raise UserError("--system-len goes with --multi-turn")
    out = plotted_report_folder(a.output, "bench-serve", "bench-serve", "systems")
    lo, hi = a.prompt_len
    rng = np.random.default_rng(0)
    levels = sorted(set(a.concurrency))
    max_context = max(hi, a.long_prompt) + a.max_tokens + 8
    data = {"max_tokens": a.max_tokens, "prompt_len": [lo, hi], "rounds": a.rounds, "warm": bool(a.warm),
            "systems": {}, "notes": []}
    for folder in map(Path, a.export_dirs):
        m = Manifest.load(folder)
        if max_context > m.max_context:
            raise UserError(f"{folder}: --prompt-len up to {hi} and --long-prompt {a.long_prompt} with --max-tokens "
                            f"{a.max_tokens} need {max_context} positions; the export's context is {m.max_context}")
        counts = [max(a.rounds * c, 4) for c in levels]
        lengths = rng.integers(lo, hi + 1, sum(counts)).tolist()
        prompts = prompts_from_text(folder, lengths + [a.long_prompt] + [32] * 4)
        long_prompt, shorts = prompts[len(lengths)], prompts[len(lengths) + 1:]
        # each level its own prompts, never seen before (cold); --warm sends them again (the prefix cache's case)
        per_level = [prompts[sum(counts[:k]):sum(counts[:k + 1])] for k in range(len(levels))]
        servers = {folder.name: (ServerProcess, stream)}
        if a.triton:  # both servers up at once, levels alternated between them: drift hits both alike
            servers = {f"{folder.name} (serve)": (ServerProcess, stream),
                       f"{folder.name} (triton)": (lambda *x: TritonProcess(a.triton, *x), stream_triton)}
        if a.speculate:  # the same export served with prompt-lookup speculation, up at once and alternated too
            if m.graph != "fused":
                raise UserError(f"{folder}: --speculate needs the fused graph (export --graph fused)")
            servers = {(f"{folder.name} (serve)" if len(servers) == 1 else name): v for name, v in servers.items()}
            flag = ("--speculate", f"ngram:{a.speculate.k}")
            servers[f"{folder.name} (serve --speculate)"] = (lambda *x: ServerProcess(*x, extra=flag), stream)
        if "llama-server" in (a.baseline or []):
            from .multiturn import llama_server_starter

            start = llama_server_starter(a, m)
            if isinstance(start, str):
                data["notes"].append(start)
            else:
                servers["llama-server"] = (start, stream)
        log(f"{folder.name}: starting {len(servers)} server(s) ({max(levels)} slots of {max_context} positions) ...")
        running, sends = {}, {}
        try:
            for name, (start, send_fn) in servers.items():
                running[name] = srv = start(folder, max(levels), max_context)
                sends[name] = (lambda f, port: lambda p, n: f(port, p, n))(send_fn, srv.port)
                sends[name](shorts[0], 4)  # warm-up
            results = {name: {"levels": []} for name in servers}
            for k, c in enumerate(levels):
                order = list(servers) if k % 2 == 0 else list(servers)[::-1]
                for round_ in ("cold", "warm") if a.warm else ("cold",):
                    for name in order:
                        lv = run_level(sends[name], per_level[k], c, a.max_tokens) | {"round": round_}
                        results[name]["levels"].append(lv)
                        log(f"  {name} concurrency {c} ({round_}): {lv['throughput_tok_s']:.1f} tok/s, TTFT p50 "
                            f"{lv['ttft_p50_ms']:.0f} ms, ITL p50 {lv['itl_p50_ms']:.1f} / p99 {lv['itl_p99_ms']:.1f} ms "
                            f"({len(per_level[k])} requests)")
            for name in servers:
                results[name]["interference"] = interference(sends[name], shorts, long_prompt, a.max_tokens)
                log(f"  {name} long prompt: {results[name]['interference']}")
        finally:
            for srv in running.values():
                srv.stop()
        data["systems"].update(results)
        data["slots_on_paper"] = slots_on_paper(m, max_context)
    table = report(data)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench-serve.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / "bench-serve.md").write_text(table + "\n")
    plot(data, out / "bench-serve.png")
    log(f"wrote {out}/bench-serve.md, bench-serve.json, bench-serve.png")


def main_bench_multi_turn(a) -> None:
    """bench-serve --multi-turn (bench/multiturn.py): a table and a plot per export, TTFT per turn with and without
    the prefix cache."""
    from .multiturn import main_multi_turn

    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    data, tables = {}, []
    for folder in map(Path, a.export_dirs):
        data[folder.name], table = main_multi_turn(a, folder)
        tables.append(table)
    text = "\n\n".join(tables)
    print(text)
    (out / "bench-serve-multi-turn.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / "bench-serve-multi-turn.md").write_text(text + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("no bench-serve-multi-turn.png: matplotlib is not installed (pip install 'mistral-trt[bench]')")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, d in data.items():
        turns = [r["turn"] for r in d["turns_table"]]
        ax.plot(turns, [r["warm_p50_ms"] for r in d["turns_table"]], marker="o", label=f"{name}, prefix cache")
        ax.plot(turns, [r["cold_p50_ms"] for r in d["turns_table"]], marker="x", linestyle="--",
                label=f"{name}, fed whole")
    ax.set_xlabel("turn")
    ax.set_ylabel("TTFT p50 (ms)")
    ax.set_xticks(turns)
    ax.legend(fontsize=7)
    ax.set_title("time to first token per turn")
    fig.tight_layout()
    fig.savefig(out / "bench-serve-multi-turn.png", dpi=100)
    log(f"wrote {out}/bench-serve-multi-turn.md, .json, .png")
