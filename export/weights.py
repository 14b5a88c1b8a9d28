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

import ml_dtypes
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
        raw = pack_int4(arr) if arr.dtype == INT4 else arr.tobytes()  # int4: two values a byte on disk, not one
        self.data.write(raw)
        self.data.write(b"\0" * (-self.data.tell() % 64))
        for key, value in (("location", self.location), ("offset", offset), ("length", len(raw))):
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


FP16_SCALE_RANGE = (float(np.finfo(np.float16).tiny), float(np.finfo(np.float16).max))  # TensorRT: a scale > 0


def fp16_scales(w: np.ndarray, q: np.ndarray, scale: np.ndarray, block: int | None, bits: int,
                requantize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(q, scale) with the scale in fp16, the dequantizer's output type in a strongly typed network (TensorRT), so
    the GEMMs run on fp16 activations. q is rounded again against the fp16 scale it will meet (unless `requantize`
    is off: GPTQ's calibrated levels are kept as they are)."""
    s16 = np.clip(scale, *FP16_SCALE_RANGE).astype(np.float16)
    if not requantize:
        return q, s16
    full = np.repeat(s16.astype(np.float32), block, axis=0)[: len(w)] if block else s16.astype(np.float32)[None, :]
    lo, hi = (-127, 127) if bits == 8 else (-8, 7)
    return np.clip(np.rint(w / full), lo, hi).astype(q.dtype), s16


@dataclass(frozen=True)
class WeightQdq:
    """How the portable graph's MatMul weights sit behind DequantizeLinear (the Q/DQ form TensorRT reads):

        int8-w8a16, int8-w8a8   WeightQdq(8)       per output channel, DequantizeLinear axis=1, opset 18
        int4-w4a16              WeightQdq(4, 32)   per block of 32 input channels, axis=0 + block_size, opset 21

    both symmetric with zero point 0. `quantize` turns W^T [K, N] into the three DequantizeLinear inputs."""
    bits: int = 8
    block_size: int | None = None
    lm_head_bits: int | None = None  # int4-w4a16's lm_head: int8 per channel (the default recipe), None: `bits`
    scale_dtype: str = "float32"  # float16 for an fp16 graph: DequantizeLinear outputs its scale's type

    @staticmethod
    def of(precision: str, block_size: int, lm_head_bits: int | None, dtype: str = "fp32") -> "WeightQdq":
        """The scheme of a Q/DQ precision (int8-w8a16, int8-w8a8, int4-w4a16) in a graph of `dtype`."""
        scale = "float16" if dtype == "fp16" else "float32"
        return WeightQdq(4, block_size, lm_head_bits, scale) if precision == "int4-w4a16" else WeightQdq(8, scale_dtype=scale)

    def for_weight(self, name: str) -> "WeightQdq":
        """lm_head's own scheme (a tied one reaches its MatMul as the embedding's transpose)."""
        if self.lm_head_bits and self.lm_head_bits != self.bits and ("lm_head" in name or "embed_tokens" in name):
            return WeightQdq(self.lm_head_bits, None if self.lm_head_bits == 8 else self.block_size,
                             scale_dtype=self.scale_dtype)
        return self

    @property
    def suffix(self) -> str:  # the quantized initializer is "<weight>_int8" / "<weight>_int4"
        return f"_int{self.bits}"

    @property
    def opset(self) -> int:
        # blockwise DequantizeLinear and int4 tensors are opset 21; an fp16 scale is opset 19
        return 21 if self.bits == 4 else 19 if self.scale_dtype == "float16" else 18

    def attrs(self) -> dict:
        return {"axis": 1} if self.bits == 8 else {"axis": 0, "block_size": self.block_size}

    def quantize(self, w: np.ndarray, calibrated=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """W^T [K, N] -> (q, scale, zero point). `calibrated`: int4 weights already quantized (calib/gptq.py), in
        MatMulNBits' packed layout, written as they are."""
        if self.bits == 8:
            q, scale = int8_per_channel(w)
        else:
            q, scale = (unpack_nbits4(*calibrated, len(w)) if calibrated is not None
                        else int4_blocks(w, self.block_size, positive=True))  # TensorRT: scales > 0
        if self.scale_dtype == "float16":
            q, scale = fp16_scales(w, q, scale, self.block_size if self.bits == 4 else None, self.bits,
                                   requantize=calibrated is None)
        if self.bits == 8:
            return q, scale, np.zeros(scale.shape, np.int8)
        return q.astype(INT4), scale, np.zeros(scale.shape, INT4)


NBITS_BLOCK = 32  # MatMulNBits' default block (int8-w8a8-dynamic, int4): the best quality of 32/64/128 (docs/precision.md); 64 decodes 10-17 % faster
TENSORRT_INT4_BLOCKS = (128, 64)  # TensorRT's weight-only INT4 GEMM: blocks of 64 or 128 input channels


def block_size_for(precision: str | None, block_size: int | None, args) -> int:
    """--block-size as `precision` reads it, its default where None: MatMulNBits' (32) for the fused precisions; for
    int4-w4a16, which TensorRT reads, the largest block TensorRT takes (128, else 64) that divides every MatMul's
    input size, refusing any other (the demo's 576 allows only 64; Mistral-7B's 4096 and 14336 take 128)."""
    if precision != "int4-w4a16":
        block_size = NBITS_BLOCK if block_size is None else block_size
        check_block_size(precision, block_size)
        return block_size
    ks = sorted({args.hidden_size, args.num_heads * args.head_dim, args.intermediate_size})
    fits = [b for b in TENSORRT_INT4_BLOCKS if all(k % b == 0 for k in ks)]
    what = f"TensorRT's INT4 weight-only GEMM takes blocks of 64 or 128 input channels, dividing every MatMul's K " \
           f"({', '.join(map(str, ks))} here)"
    if block_size is None:
        if not fits:
            raise UserError(f"--precision int4-w4a16: {what}, and neither does; use --precision int4 --graph fused "
                            "(onnxruntime) for this model")
        return fits[0]
    if block_size not in fits:
        raise UserError(f"--block-size {block_size}: {what}; expected " + (" or ".join(map(str, fits)) or "none fits"))
    return block_size


def check_block_size(precision: str | None, block_size: int) -> None:
    """--block-size, read by the blockwise precisions (MatMulNBits' int8-w8a8-dynamic and int4, and int4-w4a16,
    whose values its quantizer makes): a power of two >= 16."""
    from mistral_trt.runtime.manifest import NBITS_PRECISIONS

    if (precision in NBITS_PRECISIONS or precision == "int4-w4a16") and (block_size < 16 or block_size & (block_size - 1)):
        raise UserError(f"--block-size {block_size}: expected a power of two >= 16 (onnxruntime MatMulNBits)")


INT4 = np.dtype(ml_dtypes.int4)  # onnx's own int4 (it depends on ml_dtypes): a byte per value in numpy, half in ONNX


# int4 block scales. Round to nearest (no calibration data) puts the block's largest magnitude m exactly on the grid's
# end; GPTQ (calib/gptq.py) picks among multiples of that, its error weighted by the input's second moment. (A search
# by unweighted weight error clips the largest weights, which matter most: demo +27.7 % perplexity against +21.8 %.)
# Two conventions, by runtime:
#   signed    (onnxruntime's MatMulNBits: the fused int4 graph) base = m / -8, m the block's value of largest
#             magnitude: m lands exactly on -8 and the scale takes m's sign, so all 16 levels serve the block
#             (onnxruntime's own quantizer and llama.cpp's Q4_0 do the same).
#   positive  (TensorRT: int4-w4a16) TensorRT refuses a DequantizeLinear scale that is not > 0: base = |m| / 8 where
#             m < 0 (m on -8), |m| / 7 where m > 0 (m on +7).
# GPTQ's candidates are these ratios of max|w| / 8 (ratios below the base clip the extremes for finer steps). On the
# demo the signed convention loses less (AWQ + GPTQ: +6.45 % against +10.87 % perplexity, docs/precision.md).
INT4_SCALE_GRID = {"signed": (1.0, 0.95, 0.9, 0.85, 0.8, 0.75),
                   "positive": (8 / 7, 1.07, 1.0, 0.95, 0.9, 0.85, 0.8, 0.75)}


def int4_base_scale(x: np.ndarray, positive: bool) -> np.ndarray:
    """Blocks x [..., block] -> the scale [..., 1] that puts m, the block's value of largest magnitude, on -8 (or,
    positive with m > 0, on +7); never 0."""
    m = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)
    base = np.where(m < 0, -m / 8, m / 7) if positive else m / -8
    base[base == 0] = 1.0
    return base.astype(np.float32)


def int4_block_scales(x: np.ndarray, positive: bool, importance: np.ndarray | None = None) -> np.ndarray:
    """Blocks x [..., block] -> scale [..., 1]: without `importance`, int4_base_scale; with it (GPTQ: H's diagonal,
    broadcast against x), the candidate of INT4_SCALE_GRID (times max|x| / 8, signed like the base) of least
    importance-weighted squared error."""
    base = int4_base_scale(x, positive)
    if importance is None:
        return base
    unit = np.abs(x).max(-1, keepdims=True).astype(np.float32) / 8 * np.sign(base)  # the base's sign, |m| / 8
    unit[unit == 0] = 1.0
    best_s = best_e = None
    for r in INT4_SCALE_GRID["positive" if positive else "signed"]:
        s = unit * np.float32(r)
        d = np.clip(np.rint(x / s), -8, 7) * s - x
        e = (d * d * importance).sum(-1, keepdims=True)
        if best_s is None:
            best_s, best_e = s, e
        else:
            better = e < best_e
            best_s, best_e = np.where(better, s, best_s), np.where(better, e, best_e)
    return best_s


def int4_blocks(w: np.ndarray, block: int, positive: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """W [K, N] float32 -> (q int8 [K, N] in -8..7, s float32 [ceil(K / block), N]): symmetric int4 per block of
    `block` input channels, round to nearest at each block's int4_base_scale; `positive` for TensorRT (int4-w4a16),
    else onnxruntime's signed convention (the fused graph packs q with pack_nbits4)."""
    k, n = w.shape
    pad = -k % block
    x = np.pad(w, ((0, pad), (0, 0))) if pad else w
    x = np.ascontiguousarray(x.reshape(-1, block, n).transpose(0, 2, 1), np.float32)  # [blocks, N, block]
    out_q = np.empty(x.shape, np.int8)
    out_s = np.empty(x.shape[:2], np.float32)
    step = max(1, (1 << 22) // (n * block))  # blocks per chunk: bounded temporaries on a 7B's widest weights
    for a in range(0, x.shape[0], step):
        xs = x[a:a + step]
        s = int4_block_scales(xs, positive)
        out_q[a:a + step] = np.clip(np.rint(xs / s), -8, 7)
        out_s[a:a + step] = s[..., 0]
    q = out_q.transpose(0, 2, 1).reshape(-1, n)[:k]
    return np.ascontiguousarray(q), out_s


def int4_dequantize(q: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    """(q [K, N] in -8..7, s [blocks, N]) -> the float weights q * s [K, N] they stand for."""
    return q * np.repeat(scales, block, 0)[:len(q)]


def pack_nbits4(q: np.ndarray, scales: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(q [K, N] in -8..7, s [blocks, N]) -> MatMulNBits' 4-bit layout: (packed uint8 [N, blocks, block / 2], low
    nibble first, zero point 8; scales [N, blocks])."""
    k, n = q.shape
    blocks = scales.shape[0]
    u = np.full((n, blocks * block), 8, np.uint8)  # padding: the zero point, value 0
    u[:, :k] = (q.T.astype(np.int16) + 8).astype(np.uint8)
    u = u.reshape(n, blocks, block)
    return np.ascontiguousarray(u[..., 0::2] | (u[..., 1::2] << 4)), np.ascontiguousarray(scales.T)


def unpack_nbits4(packed: np.ndarray, scales: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """pack_nbits4's inverse: (q int8 [K, N], s [blocks, N])."""
    n, blocks, half = packed.shape
    u = np.empty((n, blocks, 2 * half), np.uint8)
    u[..., 0::2], u[..., 1::2] = packed & 0x0F, packed >> 4
    q = (u.reshape(n, -1)[:, :k].astype(np.int8) - 8).T
    return np.ascontiguousarray(q), np.ascontiguousarray(scales.T)


def pack_int4(arr: np.ndarray) -> bytes:
    """ONNX's int4 layout: two values per byte, the first in the low nibble, the last byte padded."""
    flat = arr.reshape(-1).astype(np.int8).view(np.uint8) & 0x0F
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def raise_opset(model, version: int) -> None:
    """Raise the default domain's opset to `version` (int4's blockwise DequantizeLinear needs 21). The ops the
    trace emits keep their meaning from 18 to 21 (those versions widened types: int4, float8), so none changes."""
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx") and o.version < version:
            o.version = version


def weight_only_record(precision: str, block_size: int, lm_head_bits: int = 8, dtype: str = "fp32") -> dict:
    """The manifest's precision record of int8-w8a16 and int4-w4a16 (`export` and `quantize` alike)."""
    acts = f"{dtype} activations and scales"
    if precision == "int8-w8a16":
        return {"name": precision, "calibration": None,
                "method": f"per-channel symmetric int8 weights (DequantizeLinear, zero point 0); {acts}"}
    head = "; lm_head int8 per channel" if lm_head_bits == 8 else ""
    return {"name": precision, "calibration": None, "block_size": block_size, "lm_head_bits": lm_head_bits,
            "method": (f"symmetric int4 weights per block of {block_size} input channels (blockwise DequantizeLinear, "
                       f"zero point 0, opset 21), round to nearest{head}; {acts}")}
