"""manifest.json: the contract between the exporter and any runtime (Python, C++, ...).

A runtime drives ``model.onnx`` from this file alone. The graph is one function

    logits, present.* = model(input_ids, attention_mask, position_ids, past_key_values.*)

    input_ids          int64  [batch, seq]
    attention_mask     int64  [batch, total]        total = past + seq; 1 = real token, 0 = padding
    position_ids       int64  [batch, seq]          absolute positions (never reset when the cache is trimmed)
    past_key_values.{i}.key|value  kv_dtype [batch, num_kv_heads, past, head_dim]   (past may be 0)
    logits             float32|float16 [batch, seq, vocab_size]
    present.{i}.key|value          kv_dtype [batch, num_kv_heads, total, head_dim]

``present`` is ``past`` with this step's keys/values appended; feed it back as the next ``past``.
With ``model.sliding_window = W`` a runtime may keep only the last ``cache.keep = W - 1`` positions
(and the matching columns of ``attention_mask``) and still get the full-sequence logits exactly.

That is ``graph: "portable"``. ``graph: "fused"`` (onnxruntime contrib ops, export/fused_graph.py) has
other inputs, listed in ``inputs``/``outputs`` and explained in ``fused_io_specs``: right-padded rows, no
mask or positions, and a KV buffer of fixed capacity that is bound as both ``past`` and ``present``.

Example:
    >>> m = Manifest.load("build/onnx/smollm2-135m-instruct")       # doctest: +SKIP
    >>> m.model.num_layers, m.input_names()[:3]                     # doctest: +SKIP
    (30, ['input_ids', 'attention_mask', 'position_ids'])
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError, read_json

SCHEMA_VERSION = 2  # 2: tokenizer record, sha256 of every file the runtime reads, a checked schema
MANIFEST_NAME = "manifest.json"
ONNX_NAME = "model.onnx"
ENGINE_NAME = "model.engine"  # a TensorRT plan, in an engine folder (runtime/engine.py) instead of the ONNX
ONNX_DATA_NAME = "model.onnx.data"  # external weights, only when the model is over protobuf's 2 GB limit
DTYPES = ("fp32", "fp16")
NUMPY_DTYPE = {"fp32": "float32", "fp16": "float16"}
DTYPE_BYTES = {"fp32": 4, "fp16": 2}
CHAT_FORMATS = ("mistral-v1", "template", "none")

# Symbolic dims, as named in the ONNX graph.
DIMS = {
    "batch": "number of sequences",
    "seq": "tokens fed this step",
    "past": "cached positions fed in (0 for the first step)",
    "total": "past + seq",
    "capacity": "positions the in-place KV buffer holds (graph 'fused': bound as both past and present)",
    "logits_len": "columns of this step that get logits (graph 'fused': logits_index)",
}
# Weights as `export --precision` writes them from the checkpoint: MatMulNBits ones (graph fused) by bits, and
# int8-w8a16 / int8-w8a8 / int4-w4a16 (portable graph, Q/DQ for TensorRT; w8a8 calibrated layer by layer on the
# checkpoint). `quantize` makes the same from an fp32 export.
NBITS_PRECISIONS = {"int8-w8a8-dynamic": 8, "int4": 4}
QDQ_PRECISIONS = ("int8-w8a16", "int8-w8a8", "int4-w4a16")
WEIGHT_ONLY = ("int8-w8a16", "int4-w4a16")  # Q/DQ weights, float activations: TensorRT's weight-only GEMMs
EXPORT_PRECISIONS = ("fp32", "fp16", *QDQ_PRECISIONS, *NBITS_PRECISIONS)
GRAPHS = ("portable", "fused")  # traced standard ops (any runtime, TensorRT) | onnxruntime contrib ops, in-place cache


@dataclass(frozen=True)
class ModelArgs:
    """Architecture numbers of a MistralForCausalLM checkpoint (the ones a runtime needs)."""

    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float
    max_position_embeddings: int
    sliding_window: int | None  # None: full attention (Mistral-7B v0.2); an int W: query i sees keys i-W+1..i
    rms_norm_eps: float
    tie_word_embeddings: bool


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: int64, float32, float16
    dims: list  # symbolic names from DIMS or ints


def io_specs(args: ModelArgs, dtype: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph's inputs and outputs, in order."""
    inputs = [
        TensorSpec("input_ids", "int64", ["batch", "seq"]),
        TensorSpec("attention_mask", "int64", ["batch", "total"]),
        TensorSpec("position_ids", "int64", ["batch", "seq"]),
    ]
    return _with_cache(args, dtype, inputs, past="past", present="total")


def _with_cache(args: ModelArgs, dtype: str, inputs: list[TensorSpec], past: str, present: str, logits: str = "seq"):
    """Append past_key_values.{i}.key|value to `inputs`; outputs are logits and present.{i}.key|value."""
    f = NUMPY_DTYPE[dtype]
    kv = lambda name, length: TensorSpec(name, f, ["batch", args.num_kv_heads, length, args.head_dim])  # noqa: E731
    outputs = [TensorSpec("logits", f, ["batch", logits, args.vocab_size])]
    for i in range(args.num_layers):
        for kind in ("key", "value"):
            inputs.append(kv(f"past_key_values.{i}.{kind}", past))
            outputs.append(kv(f"present.{i}.{kind}", present))
    return inputs, outputs


def fused_io_specs(args: ModelArgs, dtype: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of the fused graph (export/fused_graph.py): right-padded rows, in-place cache.

    input_ids              int64 [batch, seq]       row b: query_seqlens[b] real tokens first, then padding
    seqlens_k              int32 [batch]            tokens of row b after this step, minus one
    total_sequence_length  int32 []                 the batch's largest seqlens_k + 1
    query_seqlens          int32 [batch]            real tokens of row b in this step (0: row idle)
    logits_index           int64 [batch, logits_len]  columns of row b that get logits: all of them to score
                                                    every position, [query_seqlens[b] - 1] for the next token
    past_key_values.{i}.*  kv    [batch, KV, capacity, D]   the same buffer is bound as present.{i}.*
    logits                 dtype [batch, logits_len, vocab_size]
    """
    inputs = [
        TensorSpec("input_ids", "int64", ["batch", "seq"]),
        TensorSpec("seqlens_k", "int32", ["batch"]),
        TensorSpec("total_sequence_length", "int32", []),
        TensorSpec("query_seqlens", "int32", ["batch"]),
        TensorSpec("logits_index", "int64", ["batch", "logits_len"]),
    ]
    return _with_cache(args, dtype, inputs, past="capacity", present="capacity", logits="logits_len")


@dataclass
class Manifest:
    model: ModelArgs
    dtype: str  # fp32 | fp16: weights, activations, logits and KV cache
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    bos_token_id: int | None
    eos_token_id: list[int]  # generation stops on any of these
    pad_token_id: int | None  # None: pad with anything, the attention_mask hides it
    chat_format: str  # mistral-v1 | template | none
    chat_template: str | None  # jinja2 source when chat_format == "template"
    tokenizer: dict[str, Any]  # file (the one the runtime loads), vocab_size, add_bos (the tokenizer's own rule)
    tokenizer_files: list[str]  # copied beside model.onnx
    files: dict[str, str]  # file name -> sha256 of every file the runtime reads (ONNX, weights, tokenizer files)
    cache: dict[str, Any]  # how to manage the KV cache: position_ids, keep, max_context, layout
    source: dict[str, Any]  # where the weights came from: path, weights {file: sha256}
    versions: dict[str, str]
    verification: list[dict] = field(default_factory=list)  # rows written by `verify`
    precision: dict = field(default_factory=dict)  # set by `quantize`: name, method, source export, calibration
    graph: str = "portable"  # portable: io_specs, any runtime | fused: fused_io_specs, onnxruntime only
    schema_version: int = SCHEMA_VERSION
    dims: dict[str, str] = field(default_factory=lambda: dict(DIMS))

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def max_context(self) -> int:
        """The model's context limit in positions (prompt + generated)."""
        return self.cache["max_context"]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, ensure_ascii=False) + "\n"

    def save(self, folder: str | Path) -> Path:
        """Write atomically: a reader never sees half a manifest."""
        path = Path(folder) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.to_json(), encoding="utf-8")
        tmp.replace(path)
        return path

    def check_files(self, folder: str | Path, full: bool = False, names: list[str] | None = None) -> None:
        """Refuse files that differ from the sha256 recorded at export (runtime/integrity.py: hashed in
        full once, then remembered while the file is unchanged; `full` always hashes). `names`: only these."""
        from .integrity import check_files

        files = self.files if names is None else {n: self.files[n] for n in names}
        check_files(folder, files, full=full, where=str(Path(folder) / MANIFEST_NAME))

    @classmethod
    def load(cls, folder: str | Path) -> "Manifest":
        """Read and validate manifest.json (types, ranges, consistency with the graph's inputs)."""
        folder = Path(folder)
        path = folder / MANIFEST_NAME if folder.is_dir() or not folder.suffix == ".json" else folder
        if not path.is_file():
            raise UserError(f"{path}: no manifest (expected an export folder written by `mistral-trt export`)")
        return cls.from_dict(read_json(path), where=str(path))

    @classmethod
    def from_dict(cls, raw: dict, where: str = "manifest") -> "Manifest":
        if not isinstance(raw, dict):
            raise UserError(f"{where}: expected a JSON object")
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:
            hint = ": written by an older mistral-trt, export it again" if version in (1,) else ""
            raise UserError(f"{where}: schema_version {version!r}, this runtime reads {SCHEMA_VERSION}{hint}")
        check_manifest(raw, where)
        kw = {f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw}
        kw["model"] = ModelArgs(**{f.name: raw["model"][f.name] for f in dataclasses.fields(ModelArgs)})
        kw["inputs"] = [TensorSpec(**t) for t in raw["inputs"]]
        kw["outputs"] = [TensorSpec(**t) for t in raw["outputs"]]
        m = cls(**kw)
        want = (io_specs if m.graph == "portable" else fused_io_specs)(m.model, m.dtype)
        for kind, got, exp in (("inputs", m.inputs, want[0]), ("outputs", m.outputs, want[1])):
            if m.graph == "fused" and kind == "inputs" and "logits_index" not in [t.name for t in got]:
                raise UserError(f"{where}: a fused graph without the logits_index input (exported before it existed); "
                                "export it again with `mistral-trt export --graph fused`")
            if got != exp:
                i = next((i for i, (g, e) in enumerate(zip(got, exp)) if g != e), min(len(got), len(exp)))
                shown = json.dumps(dataclasses.asdict(got[i])) if i < len(got) else "nothing"
                expected = json.dumps(dataclasses.asdict(exp[i])) if i < len(exp) else "nothing"
                raise UserError(f"{where}: field '{kind}[{i}]': expected {expected} for this model and graph "
                                f"{m.graph!r}, got {shown}")
        return m


# -- schema ----------------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return type(v) is int  # bool is an int subclass; true is not a layer count


def _is_num(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _plain_name(v) -> bool:
    return isinstance(v, str) and v not in ("", ".", "..") and "/" not in v and "\\" not in v and "\0" not in v


POS_INT = (lambda v: _is_int(v) and v > 0, "a positive integer")
# a model's sizes: positive and below 2**31 (what any runtime, the C++ one's int included, can hold and allocate)
SIZE = (lambda v: _is_int(v) and 0 < v < 2**31, "a positive integer below 2**31")
MODEL_SCHEMA = {
    "architecture": (lambda v: v == "MistralForCausalLM", '"MistralForCausalLM"'),
    "num_layers": SIZE, "num_heads": SIZE, "num_kv_heads": SIZE, "head_dim": SIZE,
    "hidden_size": SIZE, "intermediate_size": SIZE, "vocab_size": SIZE, "max_position_embeddings": SIZE,
    "rope_theta": (lambda v: _is_num(v) and v > 0, "a positive number"),
    "sliding_window": (lambda v: v is None or (_is_int(v) and v > 0), "null or a positive integer"),
    "rms_norm_eps": (lambda v: _is_num(v) and v > 0, "a positive number"),
    "tie_word_embeddings": (lambda v: isinstance(v, bool), "true or false"),
}
SPEC_SCHEMA = {
    "name": (lambda v: isinstance(v, str) and v != "", "a tensor name"),
    "dtype": (lambda v: v in ("int32", "int64", "float16", "float32"), "int32, int64, float16 or float32"),
    "dims": (lambda v: isinstance(v, list) and all(isinstance(d, str) or (_is_int(d) and d >= 0) for d in v),
             "a list of dimension names and sizes"),
}
SHA256 = (lambda v: isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v),
          "a sha256 (64 lowercase hex digits)")


def _check(obj: dict, schema: dict, where: str, prefix: str) -> None:
    for key, (ok, expected) in schema.items():
        if key not in obj:
            raise UserError(f"{where}: missing field '{prefix}{key}'")
        if not ok(obj[key]):
            raise UserError(f"{where}: field '{prefix}{key}': expected {expected}, got {json.dumps(obj[key])}")


def _fail(where: str, key: str, expected: str, got) -> UserError:
    return UserError(f"{where}: field '{key}': expected {expected}, got {json.dumps(got, ensure_ascii=False)[:200]}")


def check_manifest(raw: dict, where: str) -> None:
    """Every field a runtime relies on: type, range and consistency with the others. One line per problem,
    naming the field (a manifest edited by hand must fail here, not run and print garbage)."""
    top = {
        "model": (lambda v: isinstance(v, dict), "an object"),
        "dtype": (lambda v: v in DTYPES, " or ".join(DTYPES)),
        "graph": (lambda v: v in GRAPHS, " or ".join(GRAPHS)),
        "inputs": (lambda v: isinstance(v, list) and len(v) > 0, "a list of tensors"),
        "outputs": (lambda v: isinstance(v, list) and len(v) > 0, "a list of tensors"),
        "bos_token_id": (lambda v: v is None or (_is_int(v) and v >= 0), "null or a token id"),
        "eos_token_id": (lambda v: isinstance(v, list) and all(_is_int(t) and t >= 0 for t in v),
                         "a list of token ids"),
        "pad_token_id": (lambda v: v is None or (_is_int(v) and v >= 0), "null or a token id"),
        "chat_format": (lambda v: v in CHAT_FORMATS, " or ".join(CHAT_FORMATS)),
        "chat_template": (lambda v: v is None or isinstance(v, str), "null or a jinja2 template"),
        "tokenizer": (lambda v: isinstance(v, dict), "an object"),
        "tokenizer_files": (lambda v: isinstance(v, list) and len(v) > 0 and all(_plain_name(n) for n in v),
                            "a list of file names"),
        "files": (lambda v: isinstance(v, dict) and all(_plain_name(n) for n in v), "an object: file name -> sha256"),
        "cache": (lambda v: isinstance(v, dict), "an object"),
        "source": (lambda v: isinstance(v, dict), "an object"),
        "versions": (lambda v: isinstance(v, dict), "an object"),
    }
    _check(raw, top, where, "")
    for key, ok_type in (("verification", list), ("precision", dict), ("dims", dict)):
        if key in raw and not isinstance(raw[key], ok_type):
            raise _fail(where, key, "a list" if ok_type is list else "an object", raw[key])
    model = raw["model"]
    _check(model, MODEL_SCHEMA, where, "model.")
    if model["num_heads"] % model["num_kv_heads"]:
        raise _fail(where, "model.num_kv_heads", f"a divisor of model.num_heads ({model['num_heads']})",
                    model["num_kv_heads"])
    vocab = model["vocab_size"]
    for key in ("bos_token_id", "pad_token_id"):
        if raw[key] is not None and raw[key] >= vocab:
            raise _fail(where, key, f"null or a token id below model.vocab_size {vocab}", raw[key])
    if any(t >= vocab for t in raw["eos_token_id"]):
        raise _fail(where, "eos_token_id", f"token ids below model.vocab_size {vocab}", raw["eos_token_id"])
    if raw["chat_format"] == "template" and not raw["chat_template"]:
        raise _fail(where, "chat_template", "a jinja2 template (chat_format is 'template')", raw["chat_template"])
    for i, kind in enumerate(("inputs", "outputs")):
        for j, t in enumerate(raw[kind]):
            if not isinstance(t, dict):
                raise _fail(where, f"{kind}[{j}]", "an object with name, dtype, dims", t)
            _check(t, SPEC_SCHEMA, where, f"{kind}[{j}].")
    for name, digest in raw["files"].items():
        if not SHA256[0](digest):
            raise _fail(where, f"files.{name}", SHA256[1], digest)
    if ONNX_NAME not in raw["files"] and ENGINE_NAME not in raw["files"]:
        raise UserError(f"{where}: field 'files': no sha256 for {ONNX_NAME}")
    for name in raw["tokenizer_files"]:
        if name not in raw["files"]:
            raise UserError(f"{where}: field 'files': no sha256 for the tokenizer file {name}")
    tok = raw["tokenizer"]
    _check(tok, {"file": (lambda v: v in raw["tokenizer_files"], f"one of tokenizer_files {raw['tokenizer_files']}"),
                 "vocab_size": (lambda v: _is_int(v) and 0 < v <= vocab, f"a positive integer <= model.vocab_size {vocab}"),
                 "add_bos": (lambda v: isinstance(v, bool), "true or false")}, where, "tokenizer.")
    if tok["add_bos"] and raw["bos_token_id"] is None:
        raise _fail(where, "bos_token_id", "a token id (tokenizer.add_bos is true)", None)
    cache = raw["cache"]
    window = model["sliding_window"]
    portable = raw["graph"] == "portable"
    _check(cache, {
        "position_ids": (lambda v: v == ("absolute" if portable else "implicit"),
                         '"absolute"' if portable else '"implicit"'),
        "keep": (lambda v: v == (None if window is None else window - 1),
                     "null (model.sliding_window is null)" if window is None else f"{window - 1} (model.sliding_window - 1)"),
        "max_context": (lambda v: _is_int(v) and 1 < v <= model["max_position_embeddings"],
                        f"an integer in [2, model.max_position_embeddings = {model['max_position_embeddings']}]"),
        "layout": (lambda v: v == ("double-buffer" if portable else "in-place"),
                   '"double-buffer"' if portable else '"in-place"'),
    }, where, "cache.")
