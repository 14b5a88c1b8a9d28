"""Fixtures: tiny random-init Mistral checkpoints (with and without a sliding window) carrying the real
Mistral v1 tokenizer from the mistral-common wheel, and the embedded demo model converted once."""
from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from store import Store, make_tiny_mistral, mistral_tokenizer_file  # noqa: F401  (scripts/store.py; tests import them from here)

# Verified-file records (runtime/integrity.py) go to a throwaway folder, never the user's ~/.cache; set before
# any test runs so subprocesses inherit it.
os.environ["MISTRAL_TRT_CACHE"] = tempfile.mkdtemp(prefix="mistral-trt-test-cache-")
atexit.register(shutil.rmtree, os.environ["MISTRAL_TRT_CACHE"], ignore_errors=True)
# Third-party clients and onnxruntime 1.31 in their own venvs: `make test-interop`, `make test-triton` and
# `make test-ort131`, which `make test` runs. (Not a folder
# named `triton`: tests/ is on sys.path, and torch and transformers take a `triton` package for OpenAI's compiler.)
collect_ignore = [d for d, env in (("interop", "MISTRAL_TRT_INTEROP"), ("triton_server", "MISTRAL_TRT_TRITON_EXPORT"),
                                   ("ort131", "MISTRAL_TRT_ORT131_EXPORT")) if not os.environ.get(env)]


def pytest_collection_modifyitems(items):
    """A test that needs one of the demo model's exports is slow whatever its own time: built cold, they take minutes
    (make test-fast never builds them)."""
    for item in items:
        if {"demo_onnx", "demo_fused", "demo_calib"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def pytest_terminal_summary(terminalreporter, config):
    """Say what this run left out of the paths it was given, and where that runs: never a silent drop."""
    targets = {"interop": "make test-interop", "triton_server": "make test-triton", "ort131": "make test-ort131"}
    here = Path(__file__).parent
    asked = [Path(config.invocation_params.dir, a.split("::")[0]).resolve() for a in config.args]
    for d in collect_ignore:
        if any((here / d).is_relative_to(a) for a in asked):
            terminalreporter.write_line(f"tests/{d}: not collected here; it runs in its own venv as `{targets[d]}` "
                                        "(`make test` runs it)")


@pytest.fixture(scope="session")
def store():
    """The artifact store (scripts/store.py): the demo model and its exports, built once per code version."""
    return Store()


@pytest.fixture(scope="session")
def tiny_window(store) -> Path:
    return store.get("tiny-window")


@pytest.fixture(scope="session")
def tiny_full(store) -> Path:
    return store.get("tiny-full")


@pytest.fixture(scope="session")
def tiny_exports(store) -> dict:
    """Every (window?, dtype) combination exported once, verification included."""
    return {(name, dtype): store.get(f"tiny-{name}-{dtype}") for name in ("window", "full") for dtype in ("fp32", "fp16")}


@pytest.fixture(scope="session")
def tiny_fused(store) -> dict:
    """The fused graph (onnxruntime contrib ops, in-place cache) of both tiny models, fp32, verified."""
    return {name: store.get(f"tiny-{name}-fused") for name in ("window", "full")}


@pytest.fixture(scope="session")
def demo_hf(store) -> Path:
    """The embedded demo model (SmolLM2-135M-Instruct GGUF) converted into a MistralForCausalLM folder."""
    return store.get("demo-hf")


@pytest.fixture(scope="session")
def demo_onnx(store) -> Path:
    """The demo model exported in fp32 (verification included)."""
    return store.get("demo-fp32")


@pytest.fixture(scope="session")
def demo_fused(store) -> Path:
    """The demo model's fused graph (onnxruntime contrib ops, in-place cache), fp32, verified."""
    return store.get("demo-fused")


@pytest.fixture(scope="session")
def demo_calib(store) -> Path:
    """`mistral-trt calibrate` on the demo model: the default set (256 chat sequences), the held-out text and chat."""
    return store.get("demo-calib")


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def cpp() -> Path:
    """The C++ runtime's build folder: mistral-trt-cpp, libmistral_trt.so, embed (the C embedding example).
    MISTRAL_TRT_CPP_BUILD points the suite at another build (`make cpp-asan`)."""
    given = os.environ.get("MISTRAL_TRT_CPP_BUILD")
    if given:
        build = Path(given)
    else:
        r = subprocess.run(["make", "-s", "cpp"], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        build = ROOT / "build" / "cpp"
    assert (build / "mistral-trt-cpp").is_file() and (build / "libmistral_trt.so").is_file()
    return build


def run_cpp(cpp: Path, *args, ok: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([str(cpp / "mistral-trt-cpp"), *map(str, args)], capture_output=True, text=True, timeout=600)
    if ok:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def cpp_generate(cpp: Path, folder, *args) -> dict:
    """`mistral-trt-cpp generate FOLDER ARGS --json`, parsed."""
    import json

    return json.loads(run_cpp(cpp, "generate", folder, *args, "--json").stdout)


def py_generate(capsys, folder, *args) -> dict:
    """`mistral-trt generate FOLDER ARGS --json` in this process, parsed."""
    import json

    from mistral_trt.main import main

    capsys.readouterr()
    assert main(["generate", str(folder), *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


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
