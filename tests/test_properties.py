"""Property-based bad input (hypothesis): whatever a user or a broken tool writes into manifest.json, and
whatever they pass as a sampling flag, the CLI answers with exit code 2 and one line naming the field or
flag, never a traceback, and changes no file; a valid value runs (exit 0)."""
from __future__ import annotations

import json
import math
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import mistral_tokenizer_file, tree_state
from mistral_trt.main import main
from mistral_trt.runtime.tokenizer import Tokenizer

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# JSON values of every type; each field below draws only values its own rule must refuse.
ANY_JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=False)
                        | st.text(max_size=8), lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                        max_leaves=4)
NOT_POSITIVE_INT = ANY_JSON.filter(lambda v: not (type(v) is int and v > 0))
NOT_POSITIVE_NUMBER = ANY_JSON.filter(lambda v: not (type(v) in (int, float) and v > 0))
NOT_BOOL = ANY_JSON.filter(lambda v: not isinstance(v, bool))
NOT_TOKEN_ID = ANY_JSON.filter(lambda v: not (v is None or (type(v) is int and 0 <= v < 32000)))
NOT_HEX64 = ANY_JSON | st.text(alphabet="0123456789abcdefXYZ", min_size=60, max_size=66)

FIELDS = {
    **{f"model.{k}": NOT_POSITIVE_INT for k in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size",
                                                 "intermediate_size", "vocab_size", "max_position_embeddings")},
    "model.rope_theta": NOT_POSITIVE_NUMBER,
    "model.rms_norm_eps": NOT_POSITIVE_NUMBER,
    "model.sliding_window": ANY_JSON.filter(lambda v: v is not None and not (type(v) is int and v > 0)),
    "model.tie_word_embeddings": NOT_BOOL,
    "dtype": ANY_JSON.filter(lambda v: v not in ("fp32", "fp16")),
    "graph": ANY_JSON.filter(lambda v: v not in ("portable", "fused")),
    "chat_format": ANY_JSON.filter(lambda v: v not in ("mistral-v1", "template", "none")),
    "bos_token_id": NOT_TOKEN_ID,
    "pad_token_id": NOT_TOKEN_ID,
    "eos_token_id": ANY_JSON.filter(lambda v: not (isinstance(v, list) and all(type(t) is int and 0 <= t < 32000 for t in v))),
    "tokenizer.add_bos": NOT_BOOL,
    "tokenizer.vocab_size": ANY_JSON.filter(lambda v: not (type(v) is int and 0 < v <= 32000)),
    "tokenizer.file": ANY_JSON.filter(lambda v: v != "tokenizer.model" and v != "generation_config.json"),
    "cache.max_context": ANY_JSON.filter(lambda v: not (type(v) is int and 1 < v <= 1024)),
    "cache.keep": ANY_JSON.filter(lambda v: v is not None),
    "files.model.onnx": NOT_HEX64.filter(lambda v: not (isinstance(v, str) and len(v) == 64
                                                        and all(c in "0123456789abcdef" for c in v))),
    "tokenizer_files": ANY_JSON.filter(lambda v: v != ["tokenizer.model", "generation_config.json"]),
}


@pytest.fixture(scope="module")
def folder(tiny_exports, tmp_path_factory):
    return shutil.copytree(tiny_exports["full", "fp32"], tmp_path_factory.mktemp("props") / "out")


def run(capsys, *args) -> tuple[int, str]:
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def one_line(err: str) -> str:
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


@SETTINGS
@given(field=st.sampled_from(sorted(FIELDS)), data=st.data())
@pytest.mark.slow
def test_any_bad_manifest_field_is_named(folder, capsys, field, data):
    value = data.draw(FIELDS[field], label="value")
    path = folder / "manifest.json"
    good = path.read_text()
    raw = json.loads(good)
    if field == "files.model.onnx":
        raw["files"]["model.onnx"] = value
    else:
        obj, *keys = [raw] + field.split(".")
        for k in keys[:-1]:
            obj = obj[k]
        obj[keys[-1]] = value
    path.write_text(json.dumps(raw))
    before = tree_state(folder)
    try:
        rc, err = run(capsys, "generate", folder, "--prompt", "Hi", "--max-new-tokens", "1")
        assert rc == 2, err
        assert f"field '{field}" in one_line(err) or (field == "files.model.onnx" and "field 'files.model.onnx'" in err)
        assert tree_state(folder) == before  # nothing written, nothing rewritten
    finally:
        path.write_text(good)


PROMPT = "Hi there"
PROMPT_LEN = len(Tokenizer.load(mistral_tokenizer_file()).encode(PROMPT, bos=True))  # --raw: BOS + the text
FLAGS = {  # flag: (how the CLI parses it, the rule it must follow); the default value runs
    "--temperature": (float, lambda v: math.isfinite(v) and v >= 0),
    "--top-p": (float, lambda v: v == 1.0),  # valid in (0, 1], but without --temperature only 1 (off) runs
    "--top-k": (int, lambda v: v == 0),  # likewise
    "--repetition-penalty": (float, lambda v: math.isfinite(v) and v > 0),
    "--seed": (int, lambda v: 0 <= v < 2**64),
    "--max-new-tokens": (int, lambda v: 1 <= v <= 1024 - PROMPT_LEN),  # prompt + new tokens fit 1024 positions
}
VALUES = st.one_of(st.integers(-5, 1100).map(str), st.integers(1024 - PROMPT_LEN - 2, 1026).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                   st.sampled_from(["", "abc", "1e9", "0x10", "nan", "-inf", "1_0", " 3 ", "0.0", "1", "0"]),
                   st.text(max_size=4))


def expected_ok(flag: str, text: str) -> bool:
    parse, rule = FLAGS[flag]
    try:
        return bool(rule(parse(text)))
    except (ValueError, OverflowError):
        return False


@SETTINGS
@given(flag=st.sampled_from(sorted(FLAGS)), text=VALUES)
@pytest.mark.slow
def test_any_sampling_flag_value_runs_or_is_named(folder, capsys, flag, text):
    before = tree_state(folder)
    args = ["generate", folder, "--raw", "--prompt", PROMPT, "--json", flag, text]
    if flag != "--max-new-tokens":
        args += ["--max-new-tokens", "2"]
    rc, err = run(capsys, *args)
    if expected_ok(flag, text):
        assert rc == 0, err
    else:
        assert rc == 2 and flag in one_line(err), err
    assert tree_state(folder) == before
