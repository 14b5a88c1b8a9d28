"""Activation statistics straight from the checkpoint, one decoder layer at a time (torch): the road for models
whose fp32 export does not fit in memory (Mistral-7B: 29 GB), as llm-compressor's and AutoAWQ's sequential
pipelines handle models larger than memory.

    plans = layerwise_plans(weights, config, args, seqs, recipe)     # (layer, group) -> Smoothing

The calibration set's hidden states stay in memory, one [b, s, H] float32 tensor per batch (Mistral-7B, 64
sequences of ~250 tokens: 260 MB). Each layer is built from its own checkpoint tensors (export/weights.py: read,
never the whole file mapped), every batch is pushed through it with the inputs of its four weight-MatMul groups
captured (calib/smoothquant.py's RowSampler: the same rows the onnxruntime road samples), the layer's decisions are
made from those statistics and its own weights, and the layer is freed; its float outputs feed the next layer,
so every layer sees what the fp32 model computes, as on the onnxruntime road. Peak memory: one layer's weights
(Mistral-7B: 0.9 GB in float32), the hidden states, one layer's sampled rows, and torch.

    >>> plans[0, "qkv"].alpha, plans[0, "qkv"].clip      # doctest: +SKIP
    (0.85, 4.12)
"""
from __future__ import annotations

import time

import numpy as np

from .smoothquant import (CALIB_BATCH, ActivationStats, Recipe, RowSampler, Smoothing, calibration_batches,
                          plan_activation)

# Where each group's input is captured (its first MatMul), and the weights reading it, in the graph's order.
GROUP_WEIGHTS = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
                 "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}


def attention_mask(lengths: np.ndarray, s: int, window: int | None):
    """Additive mask [b, 1, s, s] of a right-padded batch: query i sees key j iff j <= i, i - j < window and j is
    a real token (HF's rule; a padding query sees real keys too, so no row is all -inf; padding rows are dropped)."""
    import torch

    i = torch.arange(s)
    allowed = i[None, :] <= i[:, None]
    if window is not None:
        allowed &= (i[:, None] - i[None, :]) < window
    allowed = allowed[None] & (i[None, None, :] < torch.as_tensor(lengths)[:, None, None])
    mask = torch.zeros(len(lengths), 1, s, s)
    return mask.masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)


def torch_config(config: dict, attention: str):
    """The checkpoint's config.json as transformers' MistralConfig, with the attention implementation to run."""
    from transformers import MistralConfig

    cfg = MistralConfig(**config)
    cfg._attn_implementation = attention
    return cfg


def layer_inputs(weights, cfg, args, batches: list) -> tuple[list, list]:
    """What the first decoder layer reads for each of calibration_batches' `batches`: the hidden states [b, s, H]
    (the embedding rows), and per batch what every layer reads beside them, (mask [b, 1, s, s], rotary (cos, sin),
    real [b, s]: which tokens are not padding)."""
    import torch
    from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding

    emb = weights.get("model.embed_tokens.weight", "float32")
    hidden = [torch.from_numpy(emb[ids]) for ids, _ in batches]
    del emb
    rope = MistralRotaryEmbedding(config=cfg)
    extras = []
    for ids, lengths in batches:
        b, s = ids.shape
        with torch.no_grad():
            rot = rope(hidden[0], torch.arange(s)[None].expand(b, s))
        extras.append((attention_mask(lengths, s, args.sliding_window), rot,
                       torch.from_numpy(np.arange(s)[None] < lengths[:, None])))
    return hidden, extras


def decoder_layers(weights, cfg, li: int, copies: int = 1) -> list:
    """`copies` float32 MistralDecoderLayers of layer li, frozen, in eval mode, sharing one read of its checkpoint
    tensors (built on meta, so no random initialisation is allocated). Sharing is safe where a copy replaces a
    parameter rather than editing it in place (calib/tune.py's as_artifact)."""
    import torch
    from transformers.models.mistral.modeling_mistral import MistralDecoderLayer

    with torch.device("meta"):
        layers = [MistralDecoderLayer(cfg, li) for _ in range(copies)]
    prefix = f"model.layers.{li}."
    state = {k: torch.from_numpy(weights.get(prefix + k, "float32")) for k in layers[0].state_dict()}
    for layer in layers:
        layer.load_state_dict(state, assign=True)
        layer.requires_grad_(False).eval()
    return layers


def layerwise_stats(weights, config: dict, args, seqs: list[np.ndarray], on_layer, groups=tuple(GROUP_WEIGHTS),
                    batch: int = CALIB_BATCH, log=print, hessians: bool = False) -> None:
    """For each decoder layer i: on_layer(i, {group: ActivationStats}, {module: weight [K, N] float32}), the
    weights transposed and contiguous as the ONNX graph holds them (the layer is freed after the call). With
    `hessians`, each ActivationStats also carries E[x x^T] over every real row (GPTQ)."""
    import torch

    cfg = torch_config(config, "eager")
    batches = calibration_batches(seqs, batch)
    hidden, extras = layer_inputs(weights, cfg, args, batches)  # hidden [b, s, H] per batch
    t0 = time.perf_counter()
    with torch.no_grad():
        for li in range(args.num_layers):
            layer, = decoder_layers(weights, cfg, li)
            captured: dict[str, torch.Tensor] = {}
            hooks = [layer.get_submodule(GROUP_WEIGHTS[g][0]).register_forward_pre_hook(
                lambda mod, inp, g=g: captured.__setitem__(g, inp[0])) for g in groups]
            samplers = {g: RowSampler((li, g)) for g in groups}
            second: dict[str, torch.Tensor] = {}  # group -> sum of x x^T over real rows
            rows = 0
            for bi, ((ids, lengths), (mask, rot, real)) in enumerate(zip(batches, extras)):
                hidden[bi] = layer(hidden[bi], attention_mask=mask, position_embeddings=rot)
                keep = real.reshape(-1)
                for g, x in captured.items():
                    x = x.reshape(-1, x.shape[-1])[keep]
                    samplers[g].add(bi, x.numpy(), len(lengths))
                    if hessians:
                        second[g] = second[g].addmm_(x.T, x) if g in second else x.T @ x
                rows += int(real.sum())
                captured.clear()
            for h in hooks:
                h.remove()
            ws = {name: np.ascontiguousarray(layer.get_submodule(name).weight.numpy().T)
                  for g in groups for name in GROUP_WEIGHTS[g]}
            del layer
            stats = {g: sm.finish() for g, sm in samplers.items()}
            for g, h in second.items():
                stats[g].hessian = h.div_(rows).numpy()  # float32 as accumulated (GPTQ's reference keeps it so), no copy
            second.clear()
            on_layer(li, stats, ws)
            log(f"calibration, layer by layer: {li + 1}/{args.num_layers} layers ({time.perf_counter() - t0:.0f}s)")


def layerwise_plans(weights, config: dict, args, seqs: list[np.ndarray], recipe: Recipe, log=print) -> dict:
    """(layer, group) -> Smoothing for every group of recipe.groups that a decoder layer has (lm_head's input is
    never smoothed on this road: it is not in ACTIVATION_GROUPS)."""
    groups = tuple(g for g in GROUP_WEIGHTS if g in recipe.groups)
    plans: dict[tuple[int, str], Smoothing] = {}

    def on_layer(li: int, stats: dict[str, ActivationStats], ws: dict[str, np.ndarray]) -> None:
        for g, st in stats.items():
            plans[li, g] = plan_activation(st, [ws[n] for n in GROUP_WEIGHTS[g]], g, recipe)

    layerwise_stats(weights, config, args, seqs, on_layer, groups, log=log)
    return plans


def projection_weights(args) -> int:
    """The weights of one decoder layer's seven projections (q, k, v, o, gate, up, down): what int4 quantizes."""
    h, i = args.hidden_size, args.intermediate_size
    q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    return h * (q + 2 * kv) + q * h + 3 * h * i
