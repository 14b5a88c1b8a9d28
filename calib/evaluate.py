"""`mistral-trt eval`: the quality cost of each precision on held-out text or held-out chat.

For each artifact: perplexity, and against the fp32 reference: top-1 agreement (same argmax) and mean
KL(reference || artifact) per token. `--text`: the text is tokenized once (BOS + text) and cut into windows of
`window` predictions. `--chat CALIB_DIR`: the calibration folder's held-out conversations (eval_chat.npz: prompts
formatted as the runtime formats them, replies by the fp32 model), each its own sequence; there the fp32 model's
own greedy replies reward agreeing with its argmax (an artifact can score a lower perplexity than fp32), so top-1
and KL are the measures. Every window is a fresh prefill, so every artifact sees identical inputs.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from mistral_trt.runtime.errors import UserError
from mistral_trt.runtime.manifest import Manifest
from mistral_trt.runtime.tokenizer import Tokenizer


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def windows(ids: np.ndarray, window: int) -> list[np.ndarray]:
    """Windows of window + 1 tokens overlapping by one, so every token after the first is predicted once."""
    return [ids[i:i + window + 1] for i in range(0, len(ids) - 1, window)]


def run(folder: Path, chunks: list[np.ndarray]):
    """Per window: log-probabilities [n, V] (float64) of the next token, each window a fresh sequence."""
    from mistral_trt.runtime.backend import open_backend

    backend = open_backend(folder, exact=True)  # the artifact's arithmetic, not the CPU provider's shortcut
    for c in chunks:
        cache = backend.new_cache(1, len(c))
        cache.admit()
        yield log_softmax(backend.step(cache, [c], last=False)[0])


def evaluate(folders: list[Path], text_file: Path | None, reference: Path, window: int = 512,
             max_tokens: int | None = None, log=lambda s: print(s, file=sys.stderr, flush=True),
             chat: Path | None = None) -> list[dict]:
    """Rows for the reference and each folder, on `text_file` or (text_file None) the held-out chat of `chat`."""
    ref_m = Manifest.load(reference)
    tokenizer_sha = ref_m.files.get(ref_m.tokenizer["file"])
    for folder in folders:  # the same tokens must mean the same text to every artifact compared
        m = Manifest.load(folder)
        if m.files.get(m.tokenizer["file"]) != tokenizer_sha:
            raise UserError(f"{folder}: its tokenizer differs from the reference {reference}'s; eval compares "
                            "artifacts of one model")
    if text_file is None:
        from .data import load_eval_chat

        seqs, entry = load_eval_chat(chat)
        if entry["tokenizer_sha256"] != tokenizer_sha:
            raise UserError(f"{Path(chat) / 'manifest.json'}: eval_chat was tokenized by another tokenizer than the "
                            f"reference {reference}'s; run `mistral-trt calibrate` with this model's fp32 export")
        chunks, budget = [], max_tokens or sum(len(s) for s in seqs)
        for s in seqs:  # each conversation its own sequence (windows only where one is longer than `window`)
            s = s[:budget]
            budget -= len(s)
            chunks += windows(s, window)
            if budget < 2:
                break
    else:
        try:
            text = Path(text_file).read_text(encoding="utf-8")
        except OSError as e:
            raise UserError(f"{text_file}: cannot read: {e.strerror}") from None
        tok = Tokenizer.for_export(reference, ref_m)
        ids = tok.encode(text, bos=tok.bos_id is not None)  # BOS + text for every model: the same inputs everywhere
        if max_tokens:
            ids = ids[:max_tokens]
        chunks = windows(ids, window)
    n_tokens = sum(len(c) - 1 for c in chunks)
    log(f"eval: {n_tokens} predicted tokens in {len(chunks)} windows of up to {window}")
    ref_lp = list(run(reference, chunks))  # float64 [n, V] per window
    rows = []
    for folder in [reference] + [f for f in folders if Path(f).resolve() != Path(reference).resolve()]:
        nll = agree = kl = 0.0
        lps = ref_lp if folder == reference else run(Path(folder), chunks)
        for c, lp, rlp in zip(chunks, lps, ref_lp):
            targets = c[1:]
            nll -= lp[np.arange(len(targets)), targets].sum()
            agree += (lp[:-1].argmax(-1) == rlp[:-1].argmax(-1)).sum()
            kl += (np.exp(rlp[:-1]) * (rlp[:-1] - lp[:-1])).sum()
        m = Manifest.load(folder)
        rows.append({"artifact": str(folder), "precision": m.precision.get("name", m.dtype),
                     "set": "text" if text_file is not None else "chat", "tokens": n_tokens,
                     "perplexity": float(np.exp(nll / n_tokens)), "top1_agreement": float(agree / n_tokens),
                     "mean_kl": float(kl / n_tokens)})
        log(f"  {Path(folder).name}: ppl {rows[-1]['perplexity']:.4f}")
    base = rows[0]["perplexity"]
    for r in rows:
        r["ppl_delta_pct"] = 100 * (r["perplexity"] / base - 1)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| artifact | precision | held-out | tokens | perplexity | Δppl % | top-1 agreement | mean KL |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {Path(r['artifact']).name} | {r['precision']} | {r['set']} | {r['tokens']} | {r['perplexity']:.4f} | "
                     f"{r['ppl_delta_pct']:+.3f} | {r['top1_agreement']:.2%} | {r['mean_kl']:.2e} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    names = [f"{Path(r['artifact']).name}\n({r['precision']})" for r in rows]
    for ax, key, label in zip(axes, ("ppl_delta_pct", "top1_agreement", "mean_kl"),
                              ("perplexity change vs fp32 (%)", "top-1 agreement with fp32", "mean KL(fp32 || artifact)")):
        ax.bar(names, [r[key] for r in rows], color="tab:blue")
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(True, axis="y", alpha=0.3)
    save_png(fig, path)


def save_png(fig, path: Path) -> None:
    """Lay out and write a matplotlib figure atomically (a reader never sees half a PNG)."""
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main_eval(a) -> None:
    try:  # eval.png is part of the result: find out now, not after the work
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("eval draws eval.png with matplotlib, which is not installed: "
                        "pip install 'mistral-trt[bench]'") from None
    from mistral_trt.export.atomic import check_report_folder

    names = ("eval.json", "eval.md", "eval.png")
    out = check_report_folder(a.output, names, "eval.json", "rows")
    folders = [Path(f) for f in a.export_dirs]
    reference = Path(a.reference) if a.reference else folders[0]
    text = Path(a.text) if a.text else None
    rows = evaluate(folders, text, reference, a.window, a.max_tokens, chat=None if text else Path(a.chat))
    print(table(rows))
    check_report_folder(out, names, "eval.json", "rows")
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps({"rows": rows, "text": str(text.absolute()) if text else None,
                                               "chat": None if text else str(Path(a.chat).absolute()),
                                               "reference": str(reference.absolute())}, indent=2) + "\n")
    (out / "eval.md").write_text(table(rows) + "\n")
    plot(rows, out / "eval.png")
