"""`mistral-trt bench-speculate`: speculative decoding (prompt-lookup drafts) against plain decoding, side by side.

Four workloads, one sequence at a time, plain and speculative alternated per prompt (so drift hits both):

    grounded                    20 prompts whose reply quotes its input, built from the calibration sources
                                (calib/data.py): rewrite or summarise a passage of documentation, answer from a
                                given document, edit given code; greedy
    open chat                   10 open questions (calib/data.py's PROMPTS), where drafts rarely come true; greedy
    open chat, sampled          the same at temperature 0.7, top-p 0.9: fewer drafts come true
    open chat after a document  each question after a ~1,500-token document it does not need: a long prompt full
                                of spurious 1-token matches, and a wide step's attention over it costs more

The first two are the issue's targets; the other two are where a default-on speculation (generate's `--speculate
auto`) could lose. Per prompt: decode tokens/s of each ((new tokens - 1) / decode time, as `generate` reports it),
the drafts' acceptance, and whether the two token sequences are identical (greedy: they must be; sampled: another
draw of the same distribution, not compared). Writes bench-speculate.md, .json, .png.

For the greedy workloads a ceiling as well: this export's step costs are timed for 1 to K + 1 fed tokens, and each
plain reply is replayed with a drafter that proposes what the n-gram index proposes (up to K tokens) but pays only
for the drafts the model keeps. No length rule for these drafts can beat it, so a target above the ceiling needs
better drafts (or cheaper wide steps), not another rule.
"""
from __future__ import annotations

import importlib
import inspect
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from mistral_trt.runtime.errors import UserError
from mistral_trt.runtime.request import Request

GROUNDED_TASKS = [
    "Rewrite the following text, fixing any typos and keeping everything else as it is:\n\n{text}",
    "Summarize the following documentation, quoting its key sentences:\n\n{text}",
    "Here is a document:\n\n{text}\n\nUsing only this document, explain what it says about how to use the module.",
    "Add a docstring and type hints to this Python code, and otherwise keep it unchanged:\n\n```python\n{code}\n```",
]
DOC_MODULES = ["json", "argparse", "collections", "itertools", "functools", "pathlib", "re", "datetime", "random",
               "statistics", "textwrap", "csv", "logging", "heapq", "bisect"]
CODE_SOURCES = [("textwrap", "dedent"), ("statistics", "median"), ("fnmatch", "translate"), ("heapq", "merge"),
                ("calendar", "isleap")]  # functions written in Python (not C), so their source exists


def grounded_prompts(n: int = 20) -> list[str]:
    """n prompts that ask for a reply built from their own text (documentation and code of Python's stdlib)."""
    out = []
    docs = [(inspect.getdoc(importlib.import_module(m)) or "")[:900] for m in DOC_MODULES]
    codes = [inspect.getsource(getattr(importlib.import_module(m), f))[:900] for m, f in CODE_SOURCES]
    for i in range(n):
        task = GROUNDED_TASKS[i % len(GROUNDED_TASKS)]
        out.append(task.format(code=codes[i % len(codes)]) if "{code}" in task else task.format(text=docs[i % len(docs)]))
    return out


def open_prompts(n: int = 10) -> list[str]:
    from mistral_trt.calib.data import PROMPTS

    return PROMPTS[:n]


DOCUMENT_CHARS = 6000  # the "after a document" workload's document: about 1,500 tokens


def after_document_prompts(n: int = 10, chars: int = DOCUMENT_CHARS) -> list[str]:
    """The open questions, each after the same `chars` characters of documentation it does not need."""
    doc = "\n\n".join(inspect.getdoc(importlib.import_module(m)) or "" for m in DOC_MODULES)[:chars]
    return [f"Here is a document:\n\n{doc}\n\nSet the document aside; it is not needed. {q}" for q in open_prompts(n)]


SAMPLED = {"temperature": 0.7, "top_p": 0.9}  # the sampled workload's settings (its seed: the prompt's number)

# name -> (prompts, sampled?)
WORKLOADS = {"grounded": (grounded_prompts, False), "open chat": (open_prompts, False),
             "open chat, sampled": (open_prompts, True), "open chat after a document": (after_document_prompts, False)}


def run_one(gen, prompt: list[int], n: int, speculate, sampling) -> dict:
    ids, st = [], None
    for (u,) in gen.run([Request(np.asarray(prompt, np.int64), n, sampling)], speculation=speculate):
        if u is not None:
            ids += u.tokens
            st = u.output.stats if u.output is not None and u.output.finish_reason else st
    return {"ids": ids, "tok_s": st.decode_tokens_per_s, "new_tokens": st.new_tokens, "decode_s": st.decode_s,
            "drafted": st.drafted, "accepted": st.accepted}


def step_costs(backend, positions: int, widths, reps: int = 12) -> dict[int, float]:
    """Median seconds of a step that feeds w tokens (every column's logits, as a speculative step asks) after
    `positions` cached ones (fewer where the context is shorter), for each w in widths: one cache, each timed step
    rolled back (as a rejected draft is), widths alternated per repetition so drift hits them all."""
    positions = max(1, min(positions, backend.max_context - max(widths)))
    ids = np.random.default_rng(0).integers(3, backend.args.vocab_size, positions + max(widths))
    cache = backend.new_cache(1, positions + max(widths))
    slot = cache.admit()
    backend.step(cache, [ids[:positions]])
    times: dict[int, list[float]] = {w: [] for w in widths}
    for rep in range(reps + 1):  # the first round warms each width's kernels
        for w in widths:
            t = time.perf_counter()
            backend.step(cache, [ids[positions:positions + w]], last=False)
            if rep:
                times[w].append(time.perf_counter() - t)
            cache.rollback(slot, w)
    return {w: statistics.median(v) for w, v in times.items()}


def ceiling(prompt: list[int], ids: list[int], k: int, cost: dict[int, float]) -> float:
    """Replay a greedy reply `ids` with a drafter that proposes the n-gram index's continuation (up to k tokens) and
    pays only for the drafts the model keeps: plain decoding's time over that one's, by the step costs `cost`
    (seconds per fed width). An upper bound for any length rule over these drafts.

        >>> ceiling([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6, 9], 7, {1: 1.0, 6: 1.5})  # 6 steps of 1 -> 1 of 6
        4.0
    """
    from mistral_trt.runtime.speculative import NgramIndex

    index, pos, spent = NgramIndex(prompt), 1, 0.0
    index.append(ids[0])
    while pos < len(ids):
        room = len(ids) - pos - 1
        drafts = index.draft(min(k, room), (k,) * index.nmax) if room > 0 else []
        kept = 0
        while kept < len(drafts) and drafts[kept] == ids[pos + kept]:
            kept += 1
        spent += cost[kept + 1]
        for t in ids[pos:pos + kept + 1]:
            index.append(t)
        pos += kept + 1
    return (len(ids) - 1) * cost[1] / spent if spent else 1.0


def measure(folder: Path, speculate, max_new_tokens: int, log, provider: str = "cpu") -> dict:
    from mistral_trt.runtime.backend import open_backend
    from mistral_trt.runtime.chat import format_chat
    from mistral_trt.runtime.generate import Generator
    from mistral_trt.runtime.sampling import Sampling
    from mistral_trt.runtime.tokenizer import Tokenizer

    backend = open_backend(folder, provider)
    m = backend.manifest
    tok = Tokenizer.for_export(folder, m)
    gen = Generator(backend)

    def chat(text: str) -> list[int]:
        return format_chat(tok, [{"role": "user", "content": text}], m.chat_format, m.chat_template)

    out = {}
    for kind, (make_prompts, sampled) in WORKLOADS.items():
        rows = []
        prompts = [chat(t) for t in make_prompts()]
        room = gen.max_context - max_new_tokens - speculate.k
        chars = DOCUMENT_CHARS
        while make_prompts is after_document_prompts and max(map(len, prompts)) > room:  # a short context
            chars = int(chars * min(room / max(map(len, prompts)), 0.9))
            prompts = [chat(t) for t in after_document_prompts(chars=chars)]
        plain_ids: list[list[int]] = []
        for i, prompt in enumerate(prompts):
            sampling = Sampling(**SAMPLED, seed=i) if sampled else Sampling()
            order = (None, speculate) if i % 2 == 0 else (speculate, None)
            res = {("speculative" if s else "plain"): run_one(gen, prompt, max_new_tokens, s, sampling) for s in order}
            p, s = res["plain"], res["speculative"]
            plain_ids.append(p["ids"])
            rows.append({"prompt_tokens": len(prompt), "new_tokens": p["new_tokens"], "plain_tok_s": p["tok_s"],
                         "speculative_tok_s": s["tok_s"], "speedup": s["tok_s"] / p["tok_s"] if p["tok_s"] else 0.0,
                         "drafted": s["drafted"], "accepted": s["accepted"],
                         "identical": None if sampled else p["ids"] == s["ids"],
                         "plain_decode_s": p["decode_s"], "speculative_decode_s": s["decode_s"],
                         "speculative_new_tokens": s["new_tokens"]})
            log(f"  {folder.name} {kind} {i + 1}/{len(prompts)}: {p['tok_s']:.1f} -> {s['tok_s']:.1f} tok/s "
                f"({rows[-1]['speedup']:.2f}x), {s['accepted']}/{s['drafted']} drafts kept"
                + ("  OUTPUT DIFFERS" if rows[-1]["identical"] is False else ""))
        # decode time per token (the first comes with the prefill), so replies of different lengths (sampled) compare
        total_plain = sum(r["plain_decode_s"] for r in rows) / max(1, sum(r["new_tokens"] - 1 for r in rows))
        total_spec = (sum(r["speculative_decode_s"] for r in rows)
                      / max(1, sum(r["speculative_new_tokens"] - 1 for r in rows)))
        if not sampled:  # the ceiling: plain replies replayed, drafts paid only where kept (step costs near here)
            positions = int(statistics.median(len(p) for p in prompts)) + max_new_tokens // 2
            cost = step_costs(backend, positions, range(1, speculate.k + 2))
            for r, prompt, ids in zip(rows, prompts, plain_ids):
                r["ceiling"] = ceiling(list(map(int, prompt)), ids, speculate.k, cost)
        out[kind] = {"rows": rows, "median_speedup": statistics.median(r["speedup"] for r in rows),
                     "ceiling": statistics.median(r["ceiling"] for r in rows) if not sampled else None,
                     "time_ratio": total_plain / total_spec if total_spec else 0.0,
                     "acceptance": sum(r["accepted"] for r in rows) / max(1, sum(r["drafted"] for r in rows)),
                     "identical": None if sampled else all(r["identical"] for r in rows)}
    return out


# The targets, on the median per-prompt speedup: grounded prompts >= 1.8x; open chat no slower than plain
# decoding, within the noise of one alternated run (5 %). The other two open workloads: generate's default
# (--speculate auto) holds only where they are not slower either.
NOT_SLOWER = (0.95, "not slower (>= 0.95x)")
TARGETS = {"grounded": (1.8, ">= 1.8x"), "open chat": NOT_SLOWER, "open chat, sampled": NOT_SLOWER,
           "open chat after a document": NOT_SLOWER}


def targets_table(data: dict) -> str:
    lines = ["| target | export | median speedup | met | ceiling of these drafts |", "|---|---|---|---|---|"]
    for name, sysd in data["systems"].items():
        for kind, (want, label) in TARGETS.items():
            got, top = sysd[kind]["median_speedup"], sysd[kind].get("ceiling")
            reach = "-" if top is None else f"{top:.2f}x" + (" (below the target)" if top < want else "")
            lines.append(f"| {kind} {label} | {name} | {got:.2f}x | {'yes' if got >= want else 'no'} | {reach} |")
    return "\n".join(lines)


def report(data: dict) -> str:
    lines = ["| export | workload | prompts | plain tok/s (median) | speculative tok/s (median) | median speedup | "
             "decode time per token, plain / speculative | drafts kept | identical output | ceiling (drafts paid only "
             "where kept) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, sysd in data["systems"].items():
        for kind, d in sysd.items():
            rows = d["rows"]
            lines.append(f"| {name} | {kind} | {len(rows)} | {statistics.median(r['plain_tok_s'] for r in rows):.1f} | "
                         f"{statistics.median(r['speculative_tok_s'] for r in rows):.1f} | {d['median_speedup']:.2f}x | "
                         f"{d['time_ratio']:.2f}x | {d['acceptance']:.0%} | "
                         f"{'not compared (sampled)' if d['identical'] is None else 'yes' if d['identical'] else 'NO'} | "
                         f"{'-' if d.get('ceiling') is None else format(d['ceiling'], '.2f') + 'x'} |")
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mistral_trt.calib.evaluate import save_png

    fig, ax = plt.subplots(figsize=(12, 4))
    for k, (name, sysd) in enumerate(data["systems"].items()):
        for j, (kind, d) in enumerate(sysd.items()):
            ys = [r["speedup"] for r in d["rows"]]
            x = (len(sysd) + 1) * k + j + np.linspace(-0.25, 0.25, len(ys))
            dots = ax.scatter(x, ys, s=14, label=f"{name}: {kind}")
            if d.get("ceiling") is not None:  # the median ceiling of these drafts: a short bar over the dots
                ax.hlines(d["ceiling"], x[0], x[-1], colors=dots.get_facecolor()[:1], lw=2,
                          label="ceiling of these drafts (median)" if (k, j) == (0, 0) else None)
    ax.axhline(1.0, color="k", lw=1)
    ax.axhline(1.8, color="k", ls="--", lw=1, label="target on grounded (1.8x)")
    ax.set_ylabel("decode tokens/s, speculative / plain")
    ax.set_xticks([])
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: no point hidden
    ax.grid(True, alpha=0.3)
    fig.suptitle(f"prompt-lookup speculation (k = {data['k']}), {data['max_new_tokens']} new tokens, greedy unless "
                 f"sampled (T {SAMPLED['temperature']}, top-p {SAMPLED['top_p']})", fontsize=9)
    save_png(fig, path)


def main_bench_speculate(a) -> None:
    from mistral_trt.export.atomic import plotted_report_folder
    from mistral_trt.runtime.manifest import Manifest

    out = plotted_report_folder(a.output, "bench-speculate", "bench-speculate", "systems")
    for f in a.export_dirs:
        if Manifest.load(f).graph != "fused":
            raise UserError(f"{f}: speculative decoding needs the fused graph (export --graph fused)")
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    data = {"k": a.speculate.k, "max_new_tokens": a.max_new_tokens, "provider": a.provider, "systems": {}}
    for f in map(Path, a.export_dirs):
        data["systems"][f.name] = measure(f, a.speculate, a.max_new_tokens, log, a.provider)
    table = report(data) + "\n\n" + targets_table(data)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench-speculate.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / "bench-speculate.md").write_text(table + "\n")
    plot(data, out / "bench-speculate.png")
    log(f"wrote {out}/bench-speculate.md, .json, .png")
