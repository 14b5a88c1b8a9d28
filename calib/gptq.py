"""int4 weights by GPTQ (Frantar et al. 2023), after AWQ's scaling (calib/awq.py), on the checkpoint one decoder
layer at a time (calib/layerwise.py).

Round to nearest quantizes each weight on its own. GPTQ quantizes one input channel (a row of W [K, N]) at a time and
spreads its rounding error over the rows not yet quantized, in the proportions that least change the layer's output
on the calibration set. That output error is a quadratic form in H = E[x x^T], the input's second moment:

    ||x @ (Q - W)||^2 averaged over calibration rows  =  tr((Q - W)^T H (Q - W))

so H [K, K], accumulated over every calibration token, is all it needs (no activations are kept). Each block of
`block` rows gets its scale when GPTQ reaches it, from the rows as GPTQ has updated them: the scale of least
squared error among export/weights.py's INT4_SCALE_GRID, each row's error weighted by H's diagonal (a clipping search,
as AWQ's and llama.cpp's quantizers do), in the runtime's convention: signed scales for onnxruntime's MatMulNBits,
positive ones for TensorRT (int4-w4a16).

    q, s = gptq_int4(w, h, block=32)        # w [K, N] float32 (x @ w), h [K, K]: q int8 [K, N] in -8..7, s [blocks, N]

Measured on the demo model (docs/precision.md): round to nearest +21.8 % perplexity, AWQ +13.5 %, AWQ + GPTQ
with the scale search +6.45 %, all int4 (block 32) with an 8-bit lm_head.
"""
from __future__ import annotations

import numpy as np

from mistral_trt.export.weights import int4_block_scales, int4_dequantize

DAMP = 0.01  # H + DAMP * mean(diag H) * I: a calibration set never spans every direction of a 14336-wide input
LAZY = 128  # rows quantized between two updates of the rest of W (the algorithm's lazy batch; exact, only faster)
ERROR_FLOPS = 1 << 33  # an output error through H costs K^2 per output column: at most this much (K = 14336: 512)
ERROR_COLUMNS = (512, 2048)  # ... but never fewer output columns than the first, never more than the second


def error_columns(w: np.ndarray, seed: int = 0) -> np.ndarray:
    """The output columns of W [K, N] that an error through H is measured on: all of them where N is at most
    ERROR_COLUMNS' bound for this K (the demo model: always), else a fixed random sample (Mistral-7B: 512)."""
    k, n = w.shape
    count = int(np.clip(ERROR_FLOPS // (k * k), *ERROR_COLUMNS))
    if n <= count:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, count, replace=False))


def quadratic_error(h: np.ndarray, d: np.ndarray) -> float:
    """tr(D^T H D): the squared output error x @ D summed over output columns, averaged over calibration rows."""
    return float(((h @ d) * d).sum(dtype=np.float64))


def gptq_int4(w: np.ndarray, h: np.ndarray, block: int, positive: bool = False,
              damp: float = DAMP) -> tuple[np.ndarray, np.ndarray]:
    """W [K, N] float32 (the graph's x @ W layout), H [K, K] -> (q int8 [K, N] in -8..7, scales float32
    [ceil(K / block), N]; `positive`: scales > 0 for TensorRT, else onnxruntime's signed convention). Rows of W whose
    input is always zero (H's diagonal 0) quantize to 0. With H = I every weight is rounded to nearest at the scale
    the search chose (nothing spreads)."""
    import torch

    k, n = w.shape
    W = torch.from_numpy(np.array(w, np.float32))  # [K, N], a copy: row i is input channel i, GPTQ's unit
    H = torch.from_numpy(np.asarray(h, np.float32)).clone()  # float32 as in the paper's code: damping keeps it sound
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[dead] = 0.0
    importance = torch.diag(H).numpy().copy()
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k)
    # The upper Cholesky factor of H^-1: row i holds how the error of channel i spreads over channels i+1..K-1.
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    del H
    Q = torch.empty(k, n, dtype=torch.int8)
    scales = torch.empty(-(-k // block), n)
    lazy = block * max(1, LAZY // block)  # whole blocks per lazy batch: a block's scale sees all its updates
    for a in range(0, k, lazy):
        b = min(a + lazy, k)
        W1, E1, Hi = W[a:b], torch.empty(b - a, n), Hinv[a:b, a:b]  # W1 a view: updated in place
        for i in range(b - a):
            col = a + i
            if col % block == 0:  # a new block: its scale from its rows as they stand now
                rows = W1[i:i + block]  # [block, N]
                s = torch.from_numpy(int4_block_scales(rows.T.numpy(), positive, importance[col:col + len(rows)]))[:, 0]
                scales[col // block] = s
            x = W1[i]
            qi = torch.clamp(torch.round(x / s), -8, 7)
            Q[col] = qi.to(torch.int8)
            err = E1[i]
            torch.div(x - qi * s, Hi[i, i], out=err)
            W1[i + 1:].addr_(Hi[i, i + 1:], err, alpha=-1)  # spread over this batch's later rows
        W[b:].addmm_(Hinv[a:b, b:].T, E1, alpha=-1)  # ... and, once per batch, over the rest
    return np.ascontiguousarray(Q.numpy()), np.ascontiguousarray(scales.numpy())


def output_error(w: np.ndarray, q: np.ndarray, scales: np.ndarray, h: np.ndarray, block: int) -> float:
    """tr(D^T H D) / tr(W^T H W), D = Q - W: the calibration rows' output error relative to the output, on
    error_columns(w)."""
    cols = error_columns(w)
    w = w[:, cols].astype(np.float32)
    d = int4_dequantize(q[:, cols].astype(np.float32), scales[:, cols], block) - w
    h = np.asarray(h, np.float32)
    return quadratic_error(h, d) / max(quadratic_error(h, w), 1e-30)
