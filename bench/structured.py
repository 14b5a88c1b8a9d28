"""`mistral-trt bench-structured EXPORT_DIR`: structured outputs measured side by side in one run.

1. The grammar engines, on the schemas of tests/data/schemas.json and this export's tokenizer: llguidance (what the
   runtime uses) and xgrammar (vLLM's, SGLang's and TensorRT-LLM's default) when it is installed. Per schema: the
   compile time (the tokenizer's vocabulary prepared once before, not counted), then the time to fill one step's
   token bitmask, walked along the greedy constrained reply (the same token path for both engines). And whether
   the engine needs torch at run time (xgrammar's bitmask is a torch tensor).
2. The decoding cost of a mask: tokens/s of the scheduler (serve's, serve/scheduler.py) at 1 and 16 streams, every
   request constrained to a JSON array of 60 integers (longer than --max-tokens, so every request yields exactly
   --max-tokens tokens) against the same requests unconstrained (ignore_eos), rounds alternated. Target (issue 43):
   constrained >= 0.9x unconstrained at both levels.

Writes bench-structured.md, .json and .png under -o.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

from mistral_trt.runtime.errors import UserError

SCHEMAS = Path(__file__).resolve().parents[1] / "tests" / "data" / "schemas.json"
LONG = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 60, "maxItems": 60}
TARGET = 0.9


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def reply_path(gen, tok, m, schema: dict) -> list[int]:
    """The greedy constrained reply's ids (EOS included): the token path both engines are walked along."""
    from mistral_trt.runtime.chat import format_chat
    from mistral_trt.runtime.request import Request
    from mistral_trt.runtime.sampling import Sampling
    from mistral_trt.runtime.structured import Grammar, grammar_mask

    prompt = np.array(format_chat(tok, [{"role": "user", "content": "Reply with a JSON value."}], m.chat_format,
                                  m.chat_template), np.int64)
    req = Request(prompt, 200, Sampling(), mask=grammar_mask(Grammar("json_schema", json.dumps(schema)), tok, m))
    return [t for (u,) in gen.run([req], tok) if u is not None for t in u.tokens]


def time_llguidance(tok, m, schema: dict, path: list[int]) -> tuple[float, list[float]]:
    import llguidance
    from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

    from mistral_trt.runtime.structured import JSON_OPTIONS, ll_tokenizer

    lltok = ll_tokenizer(tok, tuple(m.eos_token_id))
    t = time.perf_counter()
    matcher = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema),
                                                                                       defaults=JSON_OPTIONS))
    compile_s = time.perf_counter() - t
    bits, steps = allocate_token_bitmask(1, lltok.vocab_size), []
    for token in path:
        t = time.perf_counter()
        fill_next_token_bitmask(matcher, bits)
        steps.append(time.perf_counter() - t)
        if not matcher.consume_token(token):
            raise UserError(f"llguidance refused its own path at token {token}: {matcher.get_error()}")
    return compile_s, steps


def time_xgrammar(info, schema: dict, path: list[int]) -> tuple[float, list[float]]:
    import xgrammar as xgr

    t = time.perf_counter()
    compiled = xgr.GrammarCompiler(info, cache_enabled=False).compile_json_schema(
        json.dumps(schema), any_whitespace=True)
    compile_s = time.perf_counter() - t
    matcher, steps = xgr.GrammarMatcher(compiled), []
    bits = xgr.allocate_token_bitmask(1, info.vocab_size)
    for token in path:
        t = time.perf_counter()
        matcher.fill_next_token_bitmask(bits)
        steps.append(time.perf_counter() - t)
        if not matcher.accept_token(token):
            return compile_s, steps  # its grammar differs (whitespace): the walk stops where they part
    return compile_s, steps


def xgrammar_info(tok, m):
    try:
        import xgrammar as xgr
    except ImportError:
        return None
    from mistral_trt.runtime.structured import token_bytes

    vocab, _ = token_bytes(tok)
    vocab += [b""] * (m.model.vocab_size - len(vocab))
    return xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW, vocab_size=m.model.vocab_size,
                             stop_token_ids=list(m.eos_token_id))


def throughput(sched, prompt, max_tokens: int, streams: int, constrained: bool, tok, m) -> float:
    """Generated tokens per second, `streams` requests at once, 2 x streams requests (at least 4) in all."""
    from mistral_trt.runtime.request import Request
    from mistral_trt.runtime.sampling import Sampling
    from mistral_trt.runtime.structured import Grammar, grammar_mask

    n = max(2 * streams, 4)
    todo, lock, tokens = list(range(n)), threading.Lock(), []

    def one() -> None:
        while True:
            with lock:
                if not todo:
                    return
                todo.pop()
            done, got = threading.Event(), []
            mask = grammar_mask(Grammar("json_schema", json.dumps(LONG)), tok, m) if constrained else None

            def emit(out):
                got.extend(out.token_ids)
                if out.finish_reason:
                    if out.error:
                        raise UserError(out.error)
                    done.set()
            sched.submit(Request(prompt, max_tokens, Sampling(), stop_on_eos=constrained, mask=mask), emit)
            done.wait(600)
            with lock:
                tokens.append(len(got))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one) for _ in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if any(k != max_tokens for k in tokens):
        raise UserError(f"a request yielded {sorted(set(tokens))} tokens, not {max_tokens}")
    return sum(tokens) / wall


def main_bench_structured(a) -> None:
    from mistral_trt.runtime.backend import open_backend
    from mistral_trt.runtime.chat import format_chat
    from mistral_trt.runtime.generate import Generator
    from mistral_trt.runtime.tokenizer import Tokenizer
    from mistral_trt.serve.scheduler import Scheduler

    folder = Path(a.export_dir)
    backend = open_backend(folder)
    m = backend.manifest
    tok = Tokenizer.for_export(folder, m)
    gen = Generator(backend)
    schemas = json.loads(SCHEMAS.read_text())
    info = xgrammar_info(tok, m)
    log(f"engines: llguidance{', xgrammar' if info else ' (xgrammar is not installed: pip install xgrammar)'}")
    rows = []
    for name, schema in schemas.items():
        path = reply_path(gen, tok, m, schema)
        row = {"schema": name, "tokens": len(path)}
        c, steps = time_llguidance(tok, m, schema, path)
        row |= {"llguidance_compile_ms": 1e3 * c, "llguidance_mask_us": 1e6 * float(np.median(steps))}
        if info is not None:
            c, steps = time_xgrammar(info, schema, path)
            row |= {"xgrammar_compile_ms": 1e3 * c, "xgrammar_mask_us": 1e6 * float(np.median(steps)),
                    "xgrammar_steps": len(steps)}
        rows.append(row)
        log(f"  {name}: {row}")
    prompt = np.array(format_chat(tok, [{"role": "user", "content": "List sixty numbers as a JSON array."}],
                                  m.chat_format, m.chat_template), np.int64)
    levels = []
    sched = Scheduler(backend, tok, max_batch=max(a.concurrency), max_context=len(prompt) + a.max_tokens + 8)
    sched.start()
    try:
        throughput(sched, prompt, 8, 1, True, tok, m)  # warm-up: compiles LONG, measures the step costs
        for c in a.concurrency:
            best = {True: 0.0, False: 0.0}
            for r in range(a.rounds):  # alternated, best of the rounds (drift hits both alike)
                for constrained in ((True, False) if r % 2 == 0 else (False, True)):
                    best[constrained] = max(best[constrained],
                                            throughput(sched, prompt, a.max_tokens, c, constrained, tok, m))
            levels.append({"streams": c, "constrained_tok_s": best[True], "plain_tok_s": best[False],
                           "ratio": best[True] / best[False]})
            log(f"  {c} streams: constrained {best[True]:.1f} tok/s, plain {best[False]:.1f} tok/s, "
                f"{best[True] / best[False]:.2f}x")
    finally:
        sched.stop()
    text = report(rows, levels, info is not None, folder.name, a)
    print(text)
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench-structured.md").write_text(text + "\n")
    (out / "bench-structured.json").write_text(json.dumps({"engines": rows, "levels": levels}, indent=1) + "\n")
    plot(rows, levels, out / "bench-structured.png", info is not None)
    log(f"wrote {out}/bench-structured.md, .json, .png")


def report(rows, levels, xgr: bool, name: str, a) -> str:
    import platform

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    lines = [f"### Structured outputs on {name} ({cpu}, {time.strftime('%Y-%m-%d')})", "",
             "Grammar engines (compile: the schema alone, the vocabulary prepared before; mask: median time to fill one "
             "step's bitmask along the greedy constrained reply):", ""]
    head = "| schema | reply tokens | llguidance compile ms | llguidance mask us |"
    lines += [head + (" xgrammar compile ms | xgrammar mask us |" if xgr else ""),
              "|---|---|---|---|" + ("---|---|" if xgr else "")]
    for r in rows:
        lines.append(f"| {r['schema']} | {r['tokens']} | {r['llguidance_compile_ms']:.2f} | {r['llguidance_mask_us']:.0f} |"
                     + (f" {r['xgrammar_compile_ms']:.2f} | {r['xgrammar_mask_us']:.0f} |" if xgr else ""))
    med = lambda k: float(np.median([r[k] for r in rows]))  # noqa: E731
    lines.append(f"| median | | {med('llguidance_compile_ms'):.2f} | {med('llguidance_mask_us'):.0f} |"
                 + (f" {med('xgrammar_compile_ms'):.2f} | {med('xgrammar_mask_us'):.0f} |" if xgr else ""))
    lines += ["", "Needs torch at run time: llguidance no (its bitmask is a numpy array); xgrammar yes (its bitmask "
              "and matcher API are torch tensors, and the wheel requires torch and triton)." if xgr else
              "", "", f"Decoding with a mask (the scheduler, greedy, {a.max_tokens} tokens a request, best of {a.rounds} "
              "alternated rounds):", "",
              "| streams | constrained tok/s | unconstrained tok/s | ratio |", "|---|---|---|---|"]
    for lv in levels:
        lines.append(f"| {lv['streams']} | {lv['constrained_tok_s']:.1f} | {lv['plain_tok_s']:.1f} | {lv['ratio']:.2f}x |")
    ok = all(lv["ratio"] >= TARGET for lv in levels)
    lines += ["", f"Target: constrained >= {TARGET}x unconstrained at every level: {'met' if ok else 'not met'}."]
    worst = max(r["llguidance_compile_ms"] for r in rows)
    lines.append(f"Target: compiling a schema adds <= 50 ms to the first token: {'met' if worst <= 50 else 'not met'} "
                 f"(the slowest of {len(rows)}: {worst:.1f} ms; a cached one: a copy of its matcher).")
    return "\n".join(lines)


def plot(rows, levels, path: Path, xgr: bool) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("no bench-structured.png: matplotlib is not installed (pip install 'mistral-trt[bench]')")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(rows))
    a.bar(x - 0.2, [r["llguidance_mask_us"] for r in rows], 0.4, label="llguidance")
    if xgr:
        a.bar(x + 0.2, [r["xgrammar_mask_us"] for r in rows], 0.4, label="xgrammar")
    a.set_xticks(x, [r["schema"] for r in rows], rotation=60, fontsize=7)
    a.set_ylabel("mask fill per token (us)")
    a.legend(fontsize=8)
    s = [lv["streams"] for lv in levels]
    b.plot(s, [lv["constrained_tok_s"] for lv in levels], "o-", label="constrained")
    b.plot(s, [lv["plain_tok_s"] for lv in levels], "x--", label="unconstrained")
    b.set_xscale("log", base=2)
    b.set_xlabel("streams")
    b.set_ylabel("tokens/s")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
