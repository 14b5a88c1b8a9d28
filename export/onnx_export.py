"""Trace MistralForCausalLM with KV-cache inputs into ONNX.

The graph takes the cache as explicit inputs and returns the grown cache as outputs (names in
runtime/manifest.py), so any runtime can own the cache: keep it whole, or trim it to a sliding window.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from mistral_trt.runtime.manifest import ONNX_NAME, ModelArgs, io_specs

from . import attention

OPSET = 18
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26  # protobuf's 2 GB limit, with room for the graph itself
DTYPE = {"fp32": torch.float32, "fp16": torch.float16}


class KVCacheWrapper(nn.Module):
    """Flat tensors in, flat tensors out: (input_ids, attention_mask, position_ids, *past) -> (logits, *present)."""

    def __init__(self, model: nn.Module, num_layers: int):
        super().__init__()
        self.model = model
        self.num_layers = num_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        # No config= here: with it DynamicCache builds sliding layers that crop in-graph, and the crop
        # bakes trace-time lengths into the ONNX. The window lives in the attention mask instead.
        cache = DynamicCache()
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True
        )
        flat = [out.logits]
        for layer in out.cache.layers:
            flat += [layer.keys, layer.values]
        return tuple(flat)


def trace_inputs(args: ModelArgs, dtype: torch.dtype, batch: int = 2, seq: int = 3, past: int = 5):
    """Example inputs for the trace. past > 0 and seq > 1: an empty past or a single token lets the
    tracer take shortcuts (skip the cache concat, drop the sliding-window mask) that are then baked in."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    pos = torch.arange(past, past + seq).repeat(batch, 1)
    kv = [torch.zeros(batch, args.num_kv_heads, past, args.head_dim, dtype=dtype) for _ in range(2 * args.num_layers)]
    return (ids, mask, pos, *kv)


def export_onnx(model: nn.Module, args: ModelArgs, dtype: str, folder: Path) -> Path:
    """Export into folder/model.onnx; weights over 2 GB go to one folder/model.onnx.data.

    torch.export (dynamo) rather than the TorchScript tracer: it keeps references to the model's own
    tensors and streams them to disk, so peak memory stays near one copy of the weights (the tracer
    held about four), and the sliding-window mask stays symbolic.
    """
    from torch.export import Dim

    inputs, outputs = io_specs(args, dtype)
    batch, seq, past = Dim("batch"), Dim("seq"), Dim("past")
    dynamic_shapes = (
        {0: batch, 1: seq},  # input_ids
        {0: batch, 1: Dim.AUTO},  # attention_mask: total = past + seq, derived
        {0: batch, 1: seq},  # position_ids
        tuple({0: batch, 2: past} for _ in range(2 * args.num_layers)),
    )
    path = folder / ONNX_NAME
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    previous = model.config._attn_implementation
    model.set_attn_implementation(attention.register())  # GQA without repeat_kv copies (export/attention.py)
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                KVCacheWrapper(model, args.num_layers).eval(),
                trace_inputs(args, DTYPE[dtype]),
                input_names=[t.name for t in inputs],
                output_names=[t.name for t in outputs],
                dynamic_shapes=dynamic_shapes,
                opset_version=OPSET,
                dynamo=True,
                optimize=True,
                verbose=False,
            )
    finally:
        model.set_attn_implementation(previous)  # verification compares against HF's own attention
    _rename_dims(program.model, inputs + outputs)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    program.save(str(path), external_data=weight_bytes >= EXTERNAL_DATA_THRESHOLD)
    return path


def _rename_dims(model, specs) -> None:
    """torch.export names dynamic dims s0, s1, ...: give them the manifest's names (batch, seq, past, total)."""
    by_name = {t.name: t for t in specs}
    for value in list(model.graph.inputs) + list(model.graph.outputs):
        spec = by_name[value.name]
        value.shape = type(value.shape)([d if isinstance(d, int) else spec_d for d, spec_d in zip(value.shape, spec.dims)])
