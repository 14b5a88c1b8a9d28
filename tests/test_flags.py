"""Every flag is honoured or refused: the walk over `export`'s and `quantize`'s precision-specific flags, each given
with every precision (on the tiny checkpoint), and `generate`'s sampling flags. A flag that a combination accepts must
change what it writes; one it does not read must be refused by name (exit 2) before any work."""
from __future__ import annotations

import hashlib
import json

import pytest

from conftest import cli
from mistral_trt.main import PRECISION_FLAGS, main
from mistral_trt.runtime.manifest import Manifest

# a value for each flag that differs from its default in a way the tiny model shows
VALUES = {"--block-size": "64", "--lm-head-bits": "4", "--calib-method": "percentile", "--smoothquant-alpha": "0.3",
          "--outlier-ratio": "1.0", "--int4-method": "awq", "--calib": None}  # --calib: the walk's calibration folder
QUANTIZE = ("int8-w8a16", "int8-w8a8", "int4-w4a16", "int8-w8a8-dynamic", "int4")  # fp16 re-exports: no such flags
EXPORT = (None, "int8-w8a16", "int8-w8a8", "int4-w4a16", "int8-w8a8-dynamic", "int4")


def fingerprint(folder) -> str:
    """What an artifact computes: its graph and weight files (not the manifest's dates and paths)."""
    m = Manifest.load(folder)
    return hashlib.sha256(json.dumps({n: d for n, d in sorted(m.files.items())}).encode()).hexdigest()


@pytest.fixture(scope="module")
def walk_calib(tiny_exports, tmp_path_factory):
    out = tmp_path_factory.mktemp("walk") / "calib"
    assert main(["calibrate", str(tiny_exports["full", "fp32"]), "-o", str(out), "--count", "4", "--reply-tokens", "4"]) == 0
    return out


def walk(capsys, tmp_path, command: str, source, precisions, flags, calib, base_flags) -> list[str]:
    """Run each (precision, flag) and the precision alone; returns what each did, and asserts the rule."""
    seen = []
    for precision in precisions:
        needs_calib = precision in ("int8-w8a8",) or (command == "export" and precision in ("int4", "int4-w4a16"))
        base = [command, source, *base_flags(precision), *(["--precision", precision] if precision else []),
                *(["--calib", calib] if needs_calib else [])]
        rc, _, err = cli(capsys, *base, "-o", tmp_path / f"{precision}-base")
        assert rc == 0, (base, err)
        ref = fingerprint(tmp_path / f"{precision}-base")
        for flag in flags:
            if flag == "--calib" and needs_calib:
                continue  # part of the base: the precision needs it
            value = str(calib) if flag == "--calib" else VALUES[flag]
            if (precision, flag) == ("int4-w4a16", "--block-size"):
                value = "128"  # TensorRT takes 64 or 128 dividing K: the tiny model's 64 allows 64 only, the default
            out = tmp_path / f"{precision}{flag}"
            rc, _, err = cli(capsys, *base, flag, value, "-o", out)
            if rc == 2:
                assert flag in err.strip().splitlines()[-1] and not out.exists(), (precision, flag, err)
                seen.append(f"{precision} {flag}: refused")
            else:
                assert rc == 0, (precision, flag, err)
                assert fingerprint(out) != ref, f"{command} --precision {precision} {flag} {value}: accepted, same output"
                seen.append(f"{precision} {flag}: changes the output")
    return seen


@pytest.mark.slow
def test_quantize_flags_are_honoured_or_refused(tiny_exports, tiny_fused, walk_calib, tmp_path, capsys):
    fused = {"int8-w8a8-dynamic", "int4"}

    def source(p):
        return tiny_fused["full"] if p in fused else tiny_exports["full", "fp32"]

    seen = []
    for p in QUANTIZE:
        seen += walk(capsys, tmp_path, "quantize", source(p), [p], [*PRECISION_FLAGS, "--calib"], walk_calib,
                     lambda _: [])
    assert "int4 --calib: refused" in seen and "int8-w8a16 --block-size: refused" in seen
    assert "int4 --lm-head-bits: changes the output" in seen and "int8-w8a8 --calib-method: changes the output" in seen


@pytest.mark.slow
def test_export_flags_are_honoured_or_refused(tiny_full, walk_calib, tmp_path, capsys):
    fused = {"int8-w8a8-dynamic", "int4"}
    seen = walk(capsys, tmp_path, "export", tiny_full, EXPORT, [*PRECISION_FLAGS, "--int4-method", "--calib"],
                walk_calib, lambda p: ["--no-verify", "--graph", "fused" if p in fused else "portable"])
    assert "None --block-size: refused" in seen and "int4 --int4-method: changes the output" in seen


def test_precision_flags_are_checked_before_any_work(tiny_exports, tmp_path, capsys):
    """The fast tier's share of the walk: a flag the precision does not read is refused at once, naming it and the
    precisions that read it; `quantize --precision int4 --calib` names the command that calibrates int4."""
    src = tiny_exports["full", "fp32"]
    rc, _, err = cli(capsys, "quantize", src, "--precision", "int4", "--calib", tmp_path, "-o", tmp_path / "q")
    assert rc == 2 and "mistral-trt export CHECKPOINT -o OUT --graph fused --precision int4 --calib" in err
    rc, _, err = cli(capsys, "quantize", src, "--precision", "int8-w8a16", "--outlier-ratio", "5", "-o", tmp_path / "q")
    assert rc == 2 and "--outlier-ratio goes with --precision int8-w8a8, not int8-w8a16" in err
    assert not (tmp_path / "q").exists()


@pytest.mark.slow
def test_generate_flags_are_honoured_or_refused(tiny_fused, capsys):
    """Sampled (temperature 0.8, seed 1): each sampling flag changes the ids; greedy: the ones that only shape sampling
    are refused (tests/validation_cases.py has their messages)."""
    base = ["generate", tiny_fused["full"], "--raw", "--prompt", "a b c a b c", "--max-new-tokens", "12", "--json"]
    sampled = [*base, "--temperature", "0.8", "--seed", "1"]

    def ids(*extra):
        rc, out, err = cli(capsys, *extra)
        assert rc == 0, err
        return json.loads(out)["ids"]

    ref = ids(*sampled)
    for flag, value in (("--top-p", "0.3"), ("--top-k", "2"), ("--repetition-penalty", "3"), ("--seed", "2"),
                        ("--frequency-penalty", "2"), ("--presence-penalty", "2"), ("--max-new-tokens", "5"),
                        ("--temperature", "0.2")):
        assert ids(*sampled, flag, value) != ref, flag
    for flag, value in (("--top-p", "0.3"), ("--top-k", "2")):
        rc, _, err = cli(capsys, *base, flag, value)
        assert rc == 2 and f"{flag} {value if flag == '--top-k' else float(value)} applies to sampling" in err
