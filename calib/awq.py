"""int4 with activation-aware scaling (AWQ, Lin et al. 2024), calibrated on the checkpoint one decoder layer at a
time (calib/layerwise.py), for the fused graph's MatMulNBits weights.

Round-to-nearest int4 treats every input channel alike, but a few channels carry most of the activation's
magnitude and their weights matter most. AWQ scales those weight rows up before quantizing (their relative
rounding error shrinks) and the activation down by the same factor, folded into the op that produces it:

    x @ W  =  (x / s) @ (s * W)          s_c = mean|x_c| ** alpha, normalised (sqrt(max s * min s) = 1)

alpha is chosen per activation by measured output error on calibration rows: the alpha whose
(x / s) @ Q4(s * W) is closest to x @ W, summed over the MatMuls reading x (alpha 0 is round to nearest, so the
choice is never worse than it on those rows). 1/s is folded exactly where the graph allows: the RMSNorm gamma
before q/k/v and before gate/up, up_proj's columns before down_proj (SwiGLU is silu(gate) * up). o_proj's input,
the attention output, has no such producer in the fused graph (GroupQueryAttention), so it stays round to nearest.

    scales = awq_scales(weights, config, args, seqs, block_size=32)   # (layer, group) -> s
    build_graph(..., nbits=NBits(4, 32), awq=scales)                  # export/fused_graph.py applies them
"""
from __future__ import annotations

import numpy as np

from .layerwise import GROUP_WEIGHTS, layerwise_stats
from .smoothquant import SEARCH_COLUMNS, ActivationStats

AWQ_GROUPS = ("qkv", "gate_up", "down")  # the activations whose 1/s folds into a producer in the fused graph
ALPHAS = np.linspace(0.0, 1.0, 11)
SEARCH_ROWS = 512


def fake_int4(w: np.ndarray, block: int) -> np.ndarray:
    """W [K, N] through symmetric int4 blocks of `block` input channels and back (MatMulNBits' scheme: the block's
    largest magnitude maps to 8 steps, values in -8..7)."""
    k, n = w.shape
    pad = -k % block
    x = np.pad(w, ((0, pad), (0, 0))) if pad else w
    x = x.reshape(-1, block, n)
    scale = np.abs(x).max(1, keepdims=True) / 8
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(x / scale), -8, 7) * scale
    return q.reshape(-1, n)[:k]


def choose_scale(st: ActivationStats, ws: list[np.ndarray], block: int) -> tuple[np.ndarray, float, float]:
    """(s, alpha, relative output error) for one activation read by MatMuls with weights ws [K, N]."""
    x = st.rows[:SEARCH_ROWS].astype(np.float32)
    mean = np.abs(st.rows).mean(0).astype(np.float64) + 1e-8
    rng = np.random.default_rng(0)
    ws = [w if w.shape[1] <= SEARCH_COLUMNS else w[:, np.sort(rng.choice(w.shape[1], SEARCH_COLUMNS, replace=False))]
          for w in ws]
    ys = [x @ w for w in ws]
    norm = sum(float((y * y).sum()) for y in ys)
    best = (np.ones(len(mean), np.float32), 0.0, np.inf)
    for alpha in ALPHAS:
        s = mean ** alpha
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        xs = x / s
        err = sum(float(((xs @ fake_int4(w * s[:, None], block) - y) ** 2).sum()) for w, y in zip(ws, ys)) / norm
        if err < best[2]:
            best = (s, float(alpha), err)
    return best


def awq_scales(weights, config: dict, args, seqs: list[np.ndarray], block: int, log=print) -> dict:
    """(layer, group) -> (s, alpha, error) for every decoder layer's AWQ_GROUPS."""
    out: dict = {}

    def on_layer(li: int, stats: dict[str, ActivationStats], ws: dict[str, np.ndarray]) -> None:
        for g, st in stats.items():
            out[li, g] = choose_scale(st, [ws[n] for n in GROUP_WEIGHTS[g]], block)

    layerwise_stats(weights, config, args, seqs, on_layer, AWQ_GROUPS, log=log)
    return out
