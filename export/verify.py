"""Check an exported ONNX against the PyTorch model it came from, on the same tokens.

Each scenario drives the ONNX the way a runtime would (chunks, cache fed back, left padding, a trimmed
cache) and compares every logit with one plain full-sequence PyTorch forward per sequence, which involves
no cache and no padding at all: the simplest reference there is.

References are computed first so the PyTorch model can be freed before onnxruntime loads the ONNX
(a 7B model cannot be held twice in 24 GiB).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from mistral_trt.runtime.generate import ending_together
from mistral_trt.runtime.manifest import ModelArgs

FP32_MAX_ABS = 1e-3  # fp32: every argmax equal and max |logit diff| <= this
FP16_MIN_AGREE = 0.99  # fp16: top-1 agreement with the fp16 PyTorch model
MAX_WINDOW_CHECK = 2048  # longest sequence the sliding-window scenario runs by default (3W + 5 tokens)


@dataclass
class Scenario:
    name: str
    rows: list[np.ndarray]  # token ids per sequence; shorter rows are left-padded
    schedule: list[int]  # tokens fed per step, summing to the padded length
    keep: int | None = None  # the manifest's cache.keep: the cache trims itself to it (None: keeps everything)
    skipped: str = ""


@dataclass
class CheckResult:
    name: str
    tokens: int
    max_abs_diff: float
    argmax_agreement: float
    passed: bool
    note: str = ""


def scenarios(args: ModelArgs, seed: int = 0, max_window_check: int = MAX_WINDOW_CHECK) -> list[Scenario]:
    rng = np.random.default_rng(seed)
    rand = lambda n: rng.integers(3, args.vocab_size, n, dtype=np.int64)  # noqa: E731  (skip ids 0-2: unk/bos/eos)
    out = [
        Scenario("prefill, empty past", [rand(32)], [32]),
        Scenario("prefill 8 + 56 decode steps", [rand(64)], [8] + [1] * 56),
        Scenario("batch 2, left padding, 8 decode steps", [rand(40), rand(28)], [32] + [1] * 8),
        # the short row is all padding in the first chunk: a runtime must not let it poison later steps
        Scenario("batch 2, chunked prefill, idle row", [rand(40), rand(12)], [16, 16, 4] + [1] * 4),
    ]
    w = args.sliding_window
    if w is not None:
        n = 3 * w + 5
        name = f"window {w}: {n} tokens, cache trimmed to {w - 1}"
        first, second = w + 3, w // 2 + 1  # a chunk longer than the window on an empty past, then one onto a trimmed cache
        s = Scenario(name, [rand(n)], [first, second] + [1] * (n - first - second), keep=w - 1)
        if n > max_window_check:
            s.skipped = f"{n} tokens > --max-window-check {max_window_check}"
        out.append(s)
    return out


def reference_logits(model, scen: list[Scenario]) -> list[list[np.ndarray] | None]:
    """One full-sequence PyTorch forward per row: logits [len(row), vocab] as float32."""
    import torch

    refs = []
    with torch.no_grad():
        for s in scen:
            if s.skipped:
                refs.append(None)
                continue
            refs.append([model(torch.from_numpy(r)[None]).logits[0].float().numpy() for r in s.rows])
    return refs


def run_steps(backend, s: Scenario) -> tuple[np.ndarray, np.ndarray]:
    """Drive the graph step by step like a runtime, through the backend's own cache (the path Generator
    uses): the rows end together (runtime/generate.py, ending_together); in the window scenario the cache trims
    itself to the manifest's `cache.keep`, in the others it keeps everything (the graph's mask applies the
    window). Returns logits [B, T, V] on the left-padded layout and its real-token mask [B, T]."""
    b, t = len(s.rows), max(len(r) for r in s.rows)
    mask = np.zeros((b, t), np.int64)
    for i, r in enumerate(s.rows):
        mask[i, t - len(r):] = 1
    cache = backend.new_cache(b, t if s.keep is None else s.keep + max(s.schedule), trim=s.keep is not None)
    for _ in s.rows:
        cache.admit()
    logits = np.zeros((b, t, backend.args.vocab_size), np.float32)
    start = 0
    for n, tokens in zip(s.schedule, ending_together(s.rows, s.schedule)):
        out = backend.step(cache, tokens, last=False)  # row i's logits in its first len(tokens[i]) columns
        for i, x in enumerate(tokens):
            logits[i, start + n - len(x):start + n] = out[i, :len(x)]
        start += n
    return logits, mask


def compare(s: Scenario, got: np.ndarray, mask: np.ndarray, ref: list[np.ndarray], dtype: str) -> CheckResult:
    diffs, agree, n = [], 0, 0
    for i, r in enumerate(ref):
        g = got[i][mask[i] == 1]
        diffs.append(float(np.abs(g - r).max()))
        agree += int((g.argmax(-1) == r.argmax(-1)).sum())
        n += len(r)
    max_abs, frac = max(diffs), agree / n
    # fp16 rows are judged together (see verify): one near-tie in 40 tokens says little on its own.
    ok = (frac == 1.0 and max_abs <= FP32_MAX_ABS) if dtype == "fp32" else True
    return CheckResult(s.name, n, max_abs, frac, ok)


def verify(backend, scen: list[Scenario], refs) -> list[CheckResult]:
    results = []
    for s, ref in zip(scen, refs):
        if s.skipped:
            results.append(CheckResult(s.name, 0, float("nan"), float("nan"), True, note=f"skipped: {s.skipped}"))
            continue
        got, mask = run_steps(backend, s)
        results.append(compare(s, got, mask, ref, backend.manifest.dtype))
    if backend.manifest.dtype == "fp16":
        ran = [r for r in results if r.tokens]
        n = sum(r.tokens for r in ran)
        frac = sum(r.argmax_agreement * r.tokens for r in ran) / n
        results.append(CheckResult("all positions", n, max(r.max_abs_diff for r in ran), frac, frac >= FP16_MIN_AGREE))
    return results


def criteria(dtype: str) -> str:
    if dtype == "fp32":
        return f"fp32: every argmax equal and max |logit diff| <= {FP32_MAX_ABS:g}"
    return f"fp16: top-1 agreement >= {FP16_MIN_AGREE:.0%} with the fp16 PyTorch model over all positions"


def table(results: list[CheckResult], dtype: str) -> str:
    head = f"{'check':<46} {'tokens':>6} {'max |Δlogit|':>13} {'argmax agree':>13}  result"
    lines = [head, "-" * len(head)]
    for r in results:
        if r.note.startswith("skipped"):
            lines.append(f"{r.name:<46} {'-':>6} {'-':>13} {'-':>13}  {r.note}")
            continue
        verdict = "ok" if r.passed else "FAIL"
        lines.append(f"{r.name:<46} {r.tokens:>6} {r.max_abs_diff:>13.2e} {r.argmax_agreement:>12.2%}  {verdict}")
    lines.append(f"criteria: {criteria(dtype)}")
    return "\n".join(lines)


def as_rows(results: list[CheckResult]) -> list[dict]:
    return [{k: (None if isinstance(v, float) and v != v else v) for k, v in asdict(r).items()} for r in results]
