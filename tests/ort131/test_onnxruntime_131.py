"""The fused graph on onnxruntime 1.31.1 (onnxruntime-gpu's newest release): run in a venv of its own
(`make test-ort131`) whose onnxruntime is 1.31.1, everything else the main venv's. The same greedy tokens as
onnxruntime 1.32 (the main venv, run beside it), with the loader's shared-width graph (runtime/ort.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

RUN = Path(__file__).with_name("greedy_run.py")


def run(python: str, logits: Path) -> dict:
    out = subprocess.run([python, str(RUN), os.environ["MISTRAL_TRT_ORT131_EXPORT"], str(logits)], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return {**json.loads(out.stdout), "prefill_logits": np.load(logits)}


def test_fused_graph_on_onnxruntime_1_31_gives_1_32s_tokens(tmp_path):
    assert ort.__version__ == "1.31.1", ort.__file__  # this venv's own, not the main venv's 1.32
    old, new = run(sys.executable, tmp_path / "old.npy"), run(os.environ["MISTRAL_TRT_MAIN_PYTHON"], tmp_path / "new.npy")
    assert (old["onnxruntime"], old["shared_width"]) == ("1.31.1", True)
    assert new["onnxruntime"].startswith("1.32") and new["shared_width"] is False
    assert old["tokens"] == new["tokens"]
    a, b = old["prefill_logits"], new["prefill_logits"]
    assert a.shape == b.shape == (90, a.shape[1]) and np.abs(a - b).max() < 1e-3, np.abs(a - b).max()
