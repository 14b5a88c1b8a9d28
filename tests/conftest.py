"""Fixtures: tiny random-init Mistral checkpoints (with and without a sliding window) carrying the real
Mistral v1 tokenizer from the mistral-common wheel, and the embedded demo model converted once."""
from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

# Verified-file records (runtime/integrity.py) go to a throwaway folder, never the user's ~/.cache; set before
# any test runs so subprocesses inherit it.
os.environ["MISTRAL_TRT_CACHE"] = tempfile.mkdtemp(prefix="mistral-trt-test-cache-")
atexit.register(shutil.rmtree, os.environ["MISTRAL_TRT_CACHE"], ignore_errors=True)
# Third-party clients in their own venvs: `make test-interop` and `make test-triton`, not `make test`. (Not a folder
# named `triton`: tests/ is on sys.path, and torch and transformers take a `triton` package for OpenAI's compiler.)
collect_ignore = [d for d, env in (("interop", "MISTRAL_TRT_INTEROP"), ("triton_server", "MISTRAL_TRT_TRITON_EXPORT"))
                  if not os.environ.get(env)]


def mistral_tokenizer_file() -> Path:
    spec = importlib.util.find_spec("mistral_common")
    assert spec is not None, "tests need mistral-common (pip install -e '.[test]')"
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "tokenizer.model.v1"
    assert path.is_file(), f"{path} missing from the mistral-common wheel"
    return path


def make_tiny_mistral(folder: Path, sliding_window: int | None, seed: int = 0, **overrides) -> Path:
    """A 2-layer Mistral with Mistral-7B's vocabulary and GQA layout (4 heads, 2 kv heads), random weights."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    cfg = dict(
        vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, sliding_window=sliding_window,
        rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        initializer_range=0.2,  # wider than the default 0.02 so random logits are not all near-ties
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = MistralForCausalLM(MistralConfig(**cfg)).eval()
    with torch.no_grad():  # RMSNorm gammas as a trained model has them: distinct, not all ones
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    shutil.copy(mistral_tokenizer_file(), folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="session")
def tiny_window(tmp_path_factory) -> Path:
    return make_tiny_mistral(tmp_path_factory.mktemp("ckpt") / "tiny-window", sliding_window=8)


@pytest.fixture(scope="session")
def tiny_full(tmp_path_factory) -> Path:
    return make_tiny_mistral(tmp_path_factory.mktemp("ckpt") / "tiny-full", sliding_window=None, seed=1)


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory, tiny_window, tiny_full) -> dict:
    """Every (window?, dtype) combination exported once, verification included."""
    from mistral_trt.export.pipeline import export_model

    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for name, ckpt in (("window", tiny_window), ("full", tiny_full)):
        for dtype in ("fp32", "fp16"):
            out[name, dtype] = root / f"{name}-{dtype}"
            export_model(str(ckpt), out[name, dtype], dtype=dtype)
    return out


@pytest.fixture(scope="session")
def demo_hf(tmp_path_factory) -> Path:
    """The embedded demo model (SmolLM2-135M-Instruct GGUF) converted once into a MistralForCausalLM folder."""
    from mistral_trt.export.gguf_convert import convert_gguf, default_gguf

    return convert_gguf(default_gguf(), tmp_path_factory.mktemp("demo") / "smollm2")


@pytest.fixture(scope="session")
def demo_onnx(demo_hf, tmp_path_factory) -> Path:
    """The demo model exported in fp32 (verification included)."""
    from mistral_trt.export.pipeline import export_model

    out = tmp_path_factory.mktemp("demo-onnx") / "smollm2-fp32"
    export_model(str(demo_hf), out, dtype="fp32")
    return out


@pytest.fixture(scope="session")
def demo_fused(demo_hf, tmp_path_factory) -> Path:
    """The demo model's fused graph (onnxruntime contrib ops, in-place cache), fp32, verified."""
    from mistral_trt.export.pipeline import export_model

    out = tmp_path_factory.mktemp("demo-fused") / "smollm2-fused"
    export_model(str(demo_hf), out, graph="fused")
    return out


@pytest.fixture(scope="session")
def demo_calib(demo_onnx, tmp_path_factory) -> Path:
    """`mistral-trt calibrate` on the demo model: the default set (256 chat sequences), the held-out text and chat."""
    from mistral_trt.main import main

    out = tmp_path_factory.mktemp("demo-calib") / "cal"
    assert main(["calibrate", str(demo_onnx), "-o", str(out)]) == 0
    return out


def run_without_torch(code: str, blocked=("torch", "transformers")) -> subprocess.CompletedProcess:
    """Run Python code in a fresh interpreter where torch and transformers (or `blocked`) cannot be imported."""
    blocker = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {tuple(blocked)!r}:
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
    """)
    return subprocess.run([sys.executable, "-c", blocker + textwrap.dedent(code)], capture_output=True, text=True)


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run `mistral-trt ARGS` in this process: (exit code, stdout, stderr). A non-zero exit must end stderr
    with exactly one error line and no traceback (the project's promise for bad input); that line is returned
    as stderr then."""
    from mistral_trt.main import main

    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:  # argparse
        rc = e.code
    out = capsys.readouterr()
    if rc:  # progress lines may come first; the error is one line, the last
        lines = out.err.rstrip("\n").split("\n")
        assert "Traceback" not in out.err and lines[-1].startswith("mistral-trt "), out.err
        assert sum("error:" in line for line in lines) == 1, out.err
        return rc, out.out, lines[-1]
    return rc, out.out, out.err


def tree_state(folder: Path) -> dict:
    """Every file under `folder` with its bytes' hash and inode: to assert that nothing was changed."""
    import hashlib

    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_ino)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def tiny_fused(tmp_path_factory, tiny_window, tiny_full) -> dict:
    """The fused graph (onnxruntime contrib ops, in-place cache) of both tiny models, fp32, verified."""
    from mistral_trt.export.pipeline import export_model

    root = tmp_path_factory.mktemp("fused")
    out = {}
    for name, ckpt in (("window", tiny_window), ("full", tiny_full)):
        out[name] = root / f"{name}-fused"
        export_model(str(ckpt), out[name], graph="fused")
    return out


def score(backend, ids):
    """Logits [n, V] (float32) of every token of one sequence, through the public step contract: a fresh
    cache, one slot, one step. `backend`: a Backend or an export folder."""
    import numpy as np

    from mistral_trt.runtime.backend import open_backend

    if not hasattr(backend, "step"):
        backend = open_backend(backend)
    ids = np.asarray(ids, np.int64)
    cache = backend.new_cache(1, len(ids), trim=False)
    cache.admit()
    return backend.step(cache, [ids], last=False)[0].astype(np.float32)
