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
With ``model.sliding_window = W`` a runtime may keep only the last ``cache.min_keep = W - 1`` positions
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError, read_json

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
ONNX_NAME = "model.onnx"
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
    tokenizer_files: list[str]  # copied beside model.onnx
    files: dict[str, str]  # file name -> sha256, for model.onnx (and model.onnx.data)
    cache: dict[str, Any]  # how to manage the KV cache: position_ids, min_keep, max_context
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

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, ensure_ascii=False) + "\n"

    def save(self, folder: str | Path) -> Path:
        """Write atomically: a reader never sees half a manifest."""
        path = Path(folder) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.to_json(), encoding="utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "Manifest":
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
            raise UserError(f"{where}: schema_version {version!r}, this runtime reads {SCHEMA_VERSION}")
        try:
            model = _build(ModelArgs, raw["model"], f"{where}: model")
            kw = {f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw}
            kw["model"] = model
            kw["inputs"] = [_build(TensorSpec, t, f"{where}: inputs") for t in raw["inputs"]]
            kw["outputs"] = [_build(TensorSpec, t, f"{where}: outputs") for t in raw["outputs"]]
            m = cls(**kw)
        except KeyError as e:
            raise UserError(f"{where}: missing field {e.args[0]!r}") from None
        except TypeError as e:
            raise UserError(f"{where}: {e}") from None
        if m.dtype not in DTYPES:
            raise UserError(f"{where}: dtype {m.dtype!r}, expected one of {DTYPES}")
        if m.graph not in GRAPHS:
            raise UserError(f"{where}: graph {m.graph!r}, expected one of {GRAPHS}")
        if m.chat_format not in CHAT_FORMATS:
            raise UserError(f"{where}: chat_format {m.chat_format!r}, expected one of {CHAT_FORMATS}")
        return m


def _build(cls, raw: Any, where: str):
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    missing = [n for n in names if n not in raw]
    if missing:
        raise UserError(f"{where}: missing field(s) {', '.join(sorted(missing))}")
    return cls(**{k: v for k, v in raw.items() if k in names})
