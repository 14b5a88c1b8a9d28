"""Decode speed of two checkouts side by side, in one run: `mistral-trt generate --json` on the same export, plain and
speculative, the two checkouts alternated per round so drift hits both. Prints a table with the ratios.

    python scripts/compare_decode.py EXPORT_DIR BEFORE_PKG [--rounds 5] [--max-new-tokens 128]

BEFORE_PKG: a folder holding `mistral_trt` as the other checkout lays it out (a package dir mirroring
pyproject.toml's package-dir: cli/ as mistral_trt, the others inside it); "this" is the installed package.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

PROMPTS = {  # a reply that quotes its input (speculation's case) and an open one
    "grounded": "Repeat the following text exactly, word for word:\n\nThe quick brown fox jumps over the lazy dog. "
                "Then the fox rests under the old oak tree, and the dog watches the river run to the sea.",
    "open": "Write a short story about a lighthouse keeper.",
}


def run(export: str, pkg: str | None, prompt: str, speculate: str, n: int) -> float:
    env = dict(os.environ)
    if pkg:
        env["PYTHONPATH"] = pkg
    r = subprocess.run([sys.executable, "-m", "mistral_trt.main", "generate", export, "--prompt", prompt,
                        "--max-new-tokens", str(n), "--speculate", speculate, "--json"],
                       capture_output=True, text=True, env=env, timeout=600)
    if r.returncode:
        raise SystemExit(r.stderr)
    return json.loads(r.stdout)["stats"]["decode_tokens_per_s"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("export")
    p.add_argument("before")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=128)
    a = p.parse_args()
    cases = [(name, spec) for name in PROMPTS for spec in ("off", "ngram")]
    got = {(c, who): [] for c in cases for who in ("before", "after")}
    for r in range(a.rounds):
        for c in cases:
            for who in (("before", "after") if r % 2 == 0 else ("after", "before")):
                got[c, who].append(run(a.export, a.before if who == "before" else None, PROMPTS[c[0]], c[1],
                                       a.max_new_tokens))
        print(f"round {r + 1}/{a.rounds} done", file=sys.stderr, flush=True)
    print(f"| prompt | --speculate | before tok/s (median of {a.rounds}) | after tok/s | after / before |")
    print("|---|---|---|---|---|")
    for c in cases:
        b, f = statistics.median(got[c, "before"]), statistics.median(got[c, "after"])
        print(f"| {c[0]} | {c[1]} | {b:.1f} | {f:.1f} | {f / b:.3f}x |")


if __name__ == "__main__":
    main()
