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

    scales, int4, errors = int4_calibration(weights, config, args, seqs, block=32)   # (layer, group) -> (s, ...)
    build_graph(..., nbits=NBits(4, 32), awq=scales, int4=int4)                      # export/fused_graph.py

Then GPTQ (calib/gptq.py) quantizes every decoder-layer weight in that scaled space, o_proj included
(`int4_calibration`, the default of `--calib`): AWQ moves the scale, GPTQ rounds, each with the calibration set.
"""
from __future__ import annotations

import numpy as np

from mistral_trt.export.weights import int4_blocks, int4_dequantize, pack_nbits4

from .layerwise import GROUP_WEIGHTS, layerwise_stats
from .smoothquant import SEARCH_COLUMNS, ActivationStats

AWQ_GROUPS = ("qkv", "gate_up", "down")  # the activations whose 1/s folds into a producer in the fused graph
ALPHAS = np.linspace(0.0, 1.0, 11)
SEARCH_ROWS = 512


def fake_int4(w: np.ndarray, block: int, positive: bool = False) -> np.ndarray:
    """W [K, N] through the int4 quantizer (export/weights.py's int4_blocks) and back."""
    return int4_dequantize(*int4_blocks(w, block, positive), block)


def choose_scale(st: ActivationStats, ws: list[np.ndarray], block: int,
                 positive: bool = False) -> tuple[np.ndarray, float, float]:
    """(s, alpha, relative output error) for one activation read by MatMuls with weights ws [K, N]. The error is
    measured through st.hessian (E[x x^T] over every calibration token: tr(D^T H D) / tr(W^T H W), on
    calib/gptq.py's error_columns) where the statistics carry it (int4 with GPTQ), else on the first SEARCH_ROWS
    sampled rows (outlier rows first)."""
    from .gptq import error_columns, quadratic_error

    mean = np.abs(st.rows).mean(0).astype(np.float64) + 1e-8
    best = (np.ones(len(mean), np.float32), 0.0, np.inf)
    if st.hessian is not None:
        h = np.asarray(st.hessian, np.float32)  # no copy: layerwise stores it in float32
        ws = [w[:, error_columns(w)] for w in ws]
        norm = sum(quadratic_error(h, w) for w in ws)
    else:
        x = st.rows[:SEARCH_ROWS].astype(np.float32)
        rng = np.random.default_rng(0)
        ws = [w if w.shape[1] <= SEARCH_COLUMNS else
              w[:, np.sort(rng.choice(w.shape[1], SEARCH_COLUMNS, replace=False))] for w in ws]
        ys = [x @ w for w in ws]
        norm = sum(float((y * y).sum()) for y in ys)
    for alpha in ALPHAS:
        s = mean ** alpha
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        if st.hessian is not None:  # (x / s) @ (Q(s W) - s W) = x @ D with D = Q(s W) / s - W
            err = sum(quadratic_error(h, fake_int4(w * s[:, None], block, positive) / s[:, None] - w) for w in ws)
        else:
            xs = x / s
            err = sum(float(((xs @ fake_int4(w * s[:, None], block, positive) - y) ** 2).sum())
                      for w, y in zip(ws, ys))
        if err / norm < best[2]:
            best = (s, float(alpha), err / norm)
    return best


def int4_calibration(weights, config: dict, args, seqs: list[np.ndarray], block: int, gptq: bool = True,
                     positive: bool = False, log=print) -> tuple[dict, dict, dict]:
    """AWQ's scales, then (gptq) every decoder-layer weight quantized by GPTQ (calib/gptq.py) in AWQ's scaled space,
    one layer at a time. Returns (scales: (layer, group) -> (s, alpha, error); int4: checkpoint weight name ->
    MatMulNBits-packed (uint8 [N, blocks, block/2], scales [N, blocks]), the weights as the graph writes them;
    errors: (layer, group) -> {"round_to_nearest": e, "gptq": e}, output errors relative to the output through H).
    `positive`: TensorRT's int4 (int4-w4a16), scales > 0; else onnxruntime's signed convention (export/weights.py)."""
    from .gptq import error_columns, gptq_int4, output_error

    scales: dict = {}
    packed: dict = {}
    errors: dict = {}

    def on_layer(li: int, stats: dict, ws: dict[str, np.ndarray]) -> None:
        for g in AWQ_GROUPS:
            scales[li, g] = choose_scale(stats[g], [ws[n] for n in GROUP_WEIGHTS[g]], block, positive)
        if not gptq:
            return
        s = {g: scales[li, g][0] if g in AWQ_GROUPS else np.ones(len(ws[names[0]]), np.float32)
             for g, names in GROUP_WEIGHTS.items()}
        # The weights as the graphs hold them after AWQ's folds (export/fused_graph.py): rows times s of the input
        # they read; up_proj's columns over down's s (its output is down's input, times silu(gate)).
        scaled = {name: ws[name] * s[g][:, None] for g in GROUP_WEIGHTS for name in GROUP_WEIGHTS[g]}
        scaled["mlp.up_proj"] = scaled["mlp.up_proj"] / s["down"][None, :]
        for g, names in GROUP_WEIGHTS.items():
            h = stats[g].hessian  # -> the scaled input x / s's, in place (a 7B's down_proj H is 0.8 GB)
            if g in AWQ_GROUPS:
                h /= s[g][:, None]
                h /= s[g][None, :]
            w = np.concatenate([scaled[n] for n in names], 1)  # one GPTQ pass: rows of W share H
            q, sc = gptq_int4(w, h, block, positive)
            sample = w[:, error_columns(w)]  # round to nearest is per column: quantize only the columns measured
            errors[li, g] = {"round_to_nearest": output_error(sample, *int4_blocks(sample, block, positive), h, block),
                             "gptq": output_error(w, q, sc, h, block)}
            at = 0
            for n in names:
                width = scaled[n].shape[1]
                packed[f"model.layers.{li}.{n}.weight"] = pack_nbits4(q[:, at:at + width], sc[:, at:at + width], block)
                at += width

    layerwise_stats(weights, config, args, seqs, on_layer, tuple(GROUP_WEIGHTS) if gptq else AWQ_GROUPS, log=log,
                    hessians=gptq)
    return scales, packed, errors
