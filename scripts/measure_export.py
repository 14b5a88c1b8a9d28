"""Time and peak memory of `mistral-trt export` on random-init models with Mistral-7B's real widths.

    python scripts/measure_export.py --layers 4 8 --dtype fp16

Each size is a random-init checkpoint (hidden 4096, 32 heads, 8 kv heads, intermediate 14336, vocab 32000)
exported by the real CLI in a subprocess; peak RSS of that process per stage comes from its progress
lines. A straight line through the sizes gives cost per layer and the fixed part, extrapolated to 32 layers.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MISTRAL_7B = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
    head_dim=128, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=None,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)


def make_checkpoint(folder: Path, layers: int, dtype: str) -> None:
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import mistral_tokenizer_file

    torch.set_default_dtype({"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    model = MistralForCausalLM(MistralConfig(num_hidden_layers=layers, **MISTRAL_7B))
    model.save_pretrained(folder)
    shutil.copy(mistral_tokenizer_file(), folder / "tokenizer.model")
    torch.set_default_dtype(torch.float32)


def measure(layers: int, dtype: str, work: Path) -> dict:
    ckpt, out = work / f"ckpt-{layers}", work / f"onnx-{layers}"
    subprocess.run([sys.executable, __file__, "--make", str(ckpt), "--layers", str(layers), "--dtype", dtype], check=True)
    # Export without its built-in check, then `verify` as its own process: random weights give near-tied
    # logits, so fp16 top-1 agreement is meaningless here; what we measure is time and memory.
    export_s, export_rss = run_timed(["mistral-trt", "export", str(ckpt), "-o", str(out), "--dtype", dtype, "--no-verify"])
    verify_s, verify_rss = run_timed(["mistral-trt", "verify", str(out)], check=False)
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**30
    shutil.rmtree(ckpt), shutil.rmtree(out)
    return {"layers": layers, "export_s": export_s, "export_rss_gib": export_rss, "verify_s": verify_s,
            "verify_rss_gib": verify_rss, "output_gib": size}


def run_timed(cmd: list[str], check: bool = True) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of one command, from GNU time."""
    t = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB=%M", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t
    sys.stderr.write(p.stderr[-2000:] + p.stdout[-2000:])
    if check and p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed")
    return wall, int(re.findall(r"MAXRSS_KB=(\d+)", p.stderr)[-1]) / 2**20


def fit(rows: list[dict], key: str) -> tuple[float, float]:
    (x0, y0), (x1, y1) = [(r["layers"], r[key]) for r in (rows[0], rows[-1])]
    slope = (y1 - y0) / (x1 - x0)
    return slope, y0 - slope * x0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--make", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.make:
        return make_checkpoint(Path(a.make), a.layers[0], a.dtype)
    with tempfile.TemporaryDirectory(dir="build" if Path("build").is_dir() else None) as d:
        rows = [measure(n, a.dtype, Path(d)) for n in a.layers]
    print("\n| layers | export (s) | export peak RSS (GiB) | verify (s) | verify peak RSS (GiB) | output (GiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layers']} | {r['export_s']:.0f} | {r['export_rss_gib']:.2f} | {r['verify_s']:.0f} "
              f"| {r['verify_rss_gib']:.2f} | {r['output_gib']:.2f} |")
    for key, unit in (("export_s", "s"), ("export_rss_gib", "GiB"), ("verify_s", "s"), ("verify_rss_gib", "GiB")):
        slope, base = fit(rows, key)
        print(f"{key}: {slope:.2f} {unit}/layer + {base:.2f} {unit} -> 32 layers: {base + 32 * slope:.1f} {unit}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
