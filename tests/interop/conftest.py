"""Third-party clients load our export folder as it is written (make test-interop sets the environment):
MISTRAL_TRT_INTEROP = an export of the demo model (portable graph), MISTRAL_TRT_CLI = our `mistral-trt` (the
reference ids come from it, so the client's own venv needs nothing of ours)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Write a haiku about the sea."]


@pytest.fixture(scope="session")
def export_dir() -> Path:
    return Path(os.environ["MISTRAL_TRT_INTEROP"])


@pytest.fixture(scope="session")
def ours(export_dir) -> dict:
    """prompt text -> (prompt ids, our 32 greedy ids), through our CLI."""
    out = {}
    for text in PROMPTS:
        r = subprocess.run([os.environ["MISTRAL_TRT_CLI"], "generate", str(export_dir), "--raw", "--prompt", text,
                            "--max-new-tokens", "32", "--json"], capture_output=True, text=True, check=True)
        got = json.loads(r.stdout)
        out[text] = (got["prompt_ids"], got["ids"])
    return out
