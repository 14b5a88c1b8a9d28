"""The checkpoint's tensors one at a time, straight from its safetensors files: no model in memory.

    w = CheckpointWeights(ckpt)                     # reads only the files' JSON headers
    q = w.get("model.layers.0.self_attn.q_proj.weight", "float32")   # one tensor, [out, in]
    w.peak_tensor_bytes()                           # what one read costs, for the memory check

Why not `safe_open(...).get_tensor()` or the torch model: a 7B checkpoint is 14 GB in bf16, and both keep
the whole file mapped, so every tensor read once stays in the process's resident set (file pages count
there). Here each tensor is read with pread into its own buffer and converted; once written out it is
freed, and the export's peak memory is one layer's tensors plus a fixed part (measured: docs/precision.md).

bf16 (the real Mistral-7B-Instruct-v0.2 weights) has no numpy dtype: its 16 bits are the top half of a
float32, so widening is a shift and exact; fp16 targets then round from that float32, which is what torch's
bf16 -> fp16 conversion does too (the fused writer's tests check the bits against the torch path).
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mistral_trt.runtime.errors import UserError

SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": "bfloat16", "F64": np.float64}
HEADER_LIMIT = 100 << 20  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str  # safetensors name: F32, F16, BF16
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data in `file`
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """name -> TensorInfo from one .safetensors file (8-byte little-endian header length, JSON, data)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if not 0 < n <= HEADER_LIMIT:
                raise ValueError(f"header length {n}")
            header = json.loads(f.read(n))
        size = path.stat().st_size
    except (OSError, ValueError, struct.error) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        begin, end = t["data_offsets"]
        if t["dtype"] not in SAFETENSORS_DTYPES:
            raise UserError(f"{path}: tensor {name} has dtype {t['dtype']}; expected one of {', '.join(SAFETENSORS_DTYPES)}")
        info = TensorInfo(path, t["dtype"], tuple(t["shape"]), 8 + n + begin, end - begin)
        item = 2 if info.dtype in ("F16", "BF16") else 8 if info.dtype == "F64" else 4
        if info.nbytes != math.prod(info.shape) * item or info.start + info.nbytes > size:
            raise UserError(f"{path}: tensor {name}: its byte range does not match its shape (truncated file?)")
        out[name] = info
    return out


class CheckpointWeights:
    """Tensors by Hugging Face name, read on demand. A tied lm_head reads the embedding."""

    def __init__(self, weight_files: list[Path], tie_word_embeddings: bool = False):
        self.index: dict[str, TensorInfo] = {}
        for f in weight_files:
            self.index.update(read_header(f))
        if tie_word_embeddings and "lm_head.weight" not in self.index:
            self.index["lm_head.weight"] = self.index["model.embed_tokens.weight"]

    def get(self, name: str, dtype: str = "float32") -> np.ndarray:
        """One tensor as a new numpy array in `dtype` (float32 or float16), in the checkpoint's layout."""
        t = self.index[name]
        raw = np.empty(t.nbytes, np.uint8)
        fd = os.open(t.file, os.O_RDONLY)
        try:
            done = 0
            while done < t.nbytes:  # pread may return short reads on large tensors
                got = os.preadv(fd, [memoryview(raw)[done:]], t.start + done)
                if got <= 0:
                    raise UserError(f"{t.file}: unexpected end of file reading {name}")
                done += got
        finally:
            os.close(fd)
        if t.dtype == "BF16":  # the top 16 bits of a float32: widening is exact
            wide = np.empty(raw.size // 2, np.uint32)
            np.left_shift(raw.view(np.uint16), 16, out=wide, dtype=np.uint32)
            arr = wide.view(np.float32)
        else:
            arr = raw.view(SAFETENSORS_DTYPES[t.dtype])
        arr = arr.reshape(t.shape)
        return arr if arr.dtype == np.dtype(dtype) else arr.astype(dtype)

    def peak_tensor_bytes(self) -> int:
        return max(math.prod(t.shape) for t in self.index.values()) * 4


def rotary_tables(config: dict, head_dim: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [length, D/2] from Hugging Face's own rotary module for this config (it holds no weights),
    so the values are HF's to the bit."""
    import torch
    from transformers import MistralConfig
    from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding

    rope = MistralRotaryEmbedding(config=MistralConfig(**config))
    with torch.no_grad():
        cos, sin = rope(torch.zeros(1, dtype=torch.float32), torch.arange(length)[None])
    half = head_dim // 2
    return cos[0, :, :half].numpy(), sin[0, :, :half].numpy()


class TensorSink:
    """Initializers for a graph being written: small ones inline, the rest appended to one external-data file
    (64-byte aligned, for mmap) as they come, so no tensor stays in memory after it is written.

        sink = TensorSink(folder, external=True)
        proto = sink.add("w", arr)      # an onnx TensorProto (external above 1 KiB)
        sink.close()
    """

    def __init__(self, folder: Path, external: bool):
        from mistral_trt.runtime.manifest import ONNX_DATA_NAME

        self.location = ONNX_DATA_NAME
        self.data = open(folder / ONNX_DATA_NAME, "wb") if external else None  # on an error the export folder goes

    def add(self, name: str, arr: np.ndarray):
        from onnx import TensorProto, helper, numpy_helper

        arr = np.ascontiguousarray(arr)
        if self.data is None or arr.nbytes < 1024:  # shape constants stay inline: shape inference reads them
            return numpy_helper.from_array(arr, name)
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(arr.dtype), dims=arr.shape)
        offset = self.data.tell()
        self.data.write(arr.tobytes())
        self.data.write(b"\0" * (-self.data.tell() % 64))
        for key, value in (("location", self.location), ("offset", offset), ("length", arr.nbytes)):
            t.external_data.add(key=key, value=str(value))
        t.data_location = TensorProto.EXTERNAL
        return t

    def close(self) -> None:
        if self.data is not None:
            self.data.close()


def int8_per_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """W [K, N] float32 -> (round(W / s) int8 [K, N], s float32 [N]), s = max |W[:, n]| / 127 per output column
    (symmetric, -128 unused, an all-zero column gets 1): the weights of int8-w8a16 and int8-w8a8."""
    scale = int8_scale(w)
    return np.clip(np.rint(w / scale), -127, 127).astype(np.int8), scale


def int8_scale(w: np.ndarray) -> np.ndarray:
    scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
    scale[scale == 0] = 1.0
    return scale
