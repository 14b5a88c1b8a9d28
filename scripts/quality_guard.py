"""When the quality tier runs: exactly when something it guards changed since its last recorded pass.

    python scripts/quality_guard.py check     # exit 0: unchanged since the recorded pass (says so); 1: changed (says what)
    python scripts/quality_guard.py record RESULTS.json SECONDS   # after a passing `make test-quality`: write the record

What it guards (GUARDED below, hashed file by file, plus two records):
  * calib/ (calibration data, every recipe, evaluation), the weight writers (export/weights.py,
    export/fused_graph.py) and the quality tests themselves (tests/test_quality.py);
  * the store's recipes for the demo artifacts the tier measures (scripts/store.py: each one's command and inputs);
  * the recipes' defaults: every argument default of `mistral-trt export`, `quantize` and `calibrate`, read from the
    command's own parser (so a default changed in cli/main.py counts, and nothing else there does);
  * the versions of the libraries whose arithmetic the numbers are (onnxruntime, numpy, torch, transformers, onnx,
    ml_dtypes).
The record (docs/results/quality.json, committed) holds each guarded item's hash, the CPU, the date, the tier's time
and every measured row. `make test-quality` writes it when the whole tier passes; `make test-quality-if-changed`
(run by .ci/run) runs the tier when `check` finds a difference.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECORD = ROOT / "docs" / "results" / "quality.json"
GUARDED = ["calib", "export/weights.py", "export/fused_graph.py", "tests/test_quality.py"]
LIBRARIES = ("onnxruntime", "numpy", "torch", "transformers", "onnx", "ml_dtypes")
COMMANDS = ("export", "quantize", "calibrate")


def guarded_files(root: Path = ROOT) -> list[Path]:
    out = []
    for g in GUARDED:
        p = root / g
        out += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    return out


def recipe_defaults() -> dict:
    """Every argument default of the commands that make the tier's artifacts, from the CLI's own parser."""
    from mistral_trt.main import parser

    sub = next(a for a in parser()._actions if a.dest == "command")
    return {cmd: {a.dest: repr(a.default) for a in sub.choices[cmd]._actions if a.dest != "help"} for cmd in COMMANDS}


sys.path.insert(0, str(ROOT / "scripts"))
from store import RECIPES, library_versions  # noqa: E402  (scripts/store.py)


def store_recipes() -> dict:
    return {n: [list(r.args), list(r.inputs)] for n, r in RECIPES.items() if n.startswith("demo-")}


def state(root: Path = ROOT) -> dict[str, str]:
    """Guarded item -> sha256 (16 hex digits)."""
    def h(b: bytes) -> str:
        return hashlib.sha256(b).hexdigest()[:16]

    out = {str(p.relative_to(root)): h(p.read_bytes()) for p in guarded_files(root)}
    out["defaults of " + "/".join(COMMANDS)] = h(json.dumps(recipe_defaults(), sort_keys=True).encode())
    out["store recipes of demo-*"] = h(json.dumps(store_recipes(), sort_keys=True).encode())
    out.update({f"version of {lib}": v for lib, v in library_versions(LIBRARIES).items() if lib != "python"})
    return out


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def differences(record: dict, now: dict) -> list[str]:
    old = record.get("guarded", {})
    return [f"{k}: {'new' if k not in old else 'gone' if k not in now else 'changed'}"
            for k in sorted(set(old) | set(now)) if old.get(k) != now.get(k)]


def main(argv: list[str]) -> int:
    if argv[:1] == ["check"] and len(argv) == 1:
        now = state()
        if not RECORD.is_file():
            print(f"quality tier: no record at {RECORD.relative_to(ROOT)}: it runs")
            return 1
        record = json.loads(RECORD.read_text())
        diff = differences(record, now)
        if diff:
            print(f"quality tier: {len(diff)} guarded item(s) differ from the pass recorded {record['date']}: it runs")
            for d in diff:
                print(f"  {d}")
            return 1
        print(f"quality tier: nothing it guards changed since the pass recorded {record['date']} on {record['cpu']} "
              f"({len(now)} items, {RECORD.relative_to(ROOT)}): not run again; `make test-quality` runs it anyway")
        return 0
    if argv[:1] == ["record"] and len(argv) == 3:
        results = json.loads(Path(argv[1]).read_text())
        RECORD.parent.mkdir(parents=True, exist_ok=True)
        RECORD.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "cores": os.cpu_count(),
            "seconds": round(float(argv[2])), "results": results, "guarded": state()}, indent=2) + "\n")
        print(f"quality tier: recorded the pass in {RECORD.relative_to(ROOT)} (commit it)")
        return 0
    print("usage: quality_guard.py check | record RESULTS.json SECONDS", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
