"""Tuning of int4 block scales after AWQ + GPTQ, the int4 levels kept: on each decoder layer's output, one layer at a
time (`--int4-method awq-gptq-layerwise`, tune_layerwise), or on the whole model's next-token distribution
(`--int4-method awq-gptq-e2e`, tune_block_scales).

GPTQ rounds each layer to keep that layer's output close to float on the calibration set; what users see is the
model's output, where the layers' errors meet and compound. So, as OmniQuant and AutoRound tune clipping against
the float model, with GPTQ's integer levels q fixed every block scale becomes a parameter,

    W = q * s0 * exp(t)            t [blocks, N] per weight, 0 at the start (GPTQ's scales exactly)

and t is trained by Adam on KL(float model || int4 model) at every real token of its training set: calibration
(chat) sequences and as many windows of plain text (calib/data.py's tuning_text: documentation and source code of
the modules calibration reads), alternately (tuning_set). The target is the float model's own distribution, so
any text serves without replies; on chat alone the tuning fit chat (docs/precision.md). The student is the model
as the artifact computes it (calib/awq.py's folds: RMSNorm gammas over AWQ's s, up_proj's columns over down's;
lm_head as the artifact quantizes it, fixed), with float activations. Only scales move: the
artifact keeps its bytes and layout, and a tuned scale keeps its sign (TensorRT's positive ones stay positive).

    seqs, trained_on = tuning_set(chat, text)
    tuned = tune_block_scales(weights, config, args, seqs, scales, int4, block, lm_head=...)

The KL on a fixed probe of calibration sequences is measured before and after; if tuning did not lower it, GPTQ's
scales are kept. Neither model is held whole in float32: the float model runs once, a layer at a time, for its
final hidden states; the student keeps its levels as int8 and its layers are checkpointed (`memory_needed`: about
20 GiB for Mistral-7B, 3 GiB on the demo; export refuses before calibrating where it is not available). Minutes on a
CPU for the demo model, a GPU-sized job in time for Mistral-7B.

    tuned = tune_layerwise(weights, config, args, seqs, scales, int4, block)

trains the same scales one decoder layer at a time, on the layer's output against the float layer's (mean squared
error), the int4 layer reading the int4 model's hidden states: one layer in memory, as AWQ + GPTQ. On the demo it
brings the int4 model closer to the float one than end-to-end tuning does (KL, top-1), end to end lowers perplexity
more (docs/precision.md).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from mistral_trt.export.weights import int4_dequantize, pack_nbits4, unpack_nbits4
from mistral_trt.runtime.cache import pack_rows
from mistral_trt.runtime.errors import check_interrupted

from .data import digest, packed
from .layerwise import GROUP_WEIGHTS, projection_weights

TUNE_BATCH = 4  # sequences per step
TUNE_EPOCHS = 1  # passes over the calibration set
TUNE_LR = 2e-3  # Adam on log-scales: a step moves a scale by ~0.2 %
PROBE_SEQUENCES = 8


TUNING_TOKENS = 256 * 512 + 256 * 256  # what memory_needed assumes before the set is read: 256 chat sequences of up
# to 512 tokens and as many plain-text windows of 256 (calib/data.py; the demo's set is 69k tokens)


def memory_needed(args, tokens: int = TUNING_TOKENS, longest: int = 512) -> int:
    """Bytes tune_block_scales holds at its peak: the student's int4 levels (a byte a weight) and, per block of 32
    weights, a scale, a log-scale, its gradient and Adam's two moments (20 bytes); the embedding and two lm_heads
    (the float model's, the artifact's) in float32; the float model's final hidden states at every token of the set;
    and in a step each decoder layer's input (checkpointed), one layer's float weights rebuilt for the backward pass
    with their activations, and four [rows, V] tensors (the teacher's probabilities, the student's log-probabilities,
    their gradient and the logits' gradient; TUNE_BATCH sequences of `longest`);
    and 1 GiB for the process itself (torch, onnxruntime, the checkpoint's reader). Mistral-7B: about 20 GiB (three
    float32 copies of the model before 2026-12-05: about 100 GiB); measured on two of its layers, docs/precision.md."""

    h, i, v, n = args.hidden_size, args.intermediate_size, args.vocab_size, args.num_layers
    layer = projection_weights(args)
    rows = TUNE_BATCH * longest
    weights = n * layer * (1 + 20 / 32) + 3 * v * h * 4
    step = (n * h + 8 * h + 4 * i + 4 * v) * rows * 4 + 2 * layer * 4
    return int(weights + tokens * h * 4 + step) + 2**30


def lm_head_as_written(w: np.ndarray, precision: str, block: int, bits: int) -> np.ndarray:
    """lm_head W [K, N] float32 -> the float weights the artifact's lm_head computes with (fused: MatMulNBits of
    `bits`, zero point 8 or 128; int4-w4a16: DequantizeLinear, int8 per channel or int4 per block)."""
    if precision == "int4":
        from mistral_trt.export.fused_graph import NBits

        packed, scales = NBits(bits, block).quantize(w)
        if bits == 4:
            return int4_dequantize(*unpack_nbits4(packed, scales, len(w)), block)
        q = packed.reshape(len(scales), -1)[:, :len(w)].T.astype(np.float32) - 128  # [K, N]
        return q * np.repeat(scales.T, block, 0)[:len(w)]
    from mistral_trt.export.weights import WeightQdq

    qdq = WeightQdq.of(precision, block, bits).for_weight("lm_head.weight")
    q, scale, _ = qdq.quantize(w)
    q = q.astype(np.float32)
    return q * scale[None] if qdq.bits == 8 else int4_dequantize(q, scale, block)


class Int4Linear(torch.nn.Module):
    """x @ (q * s0 * exp(t)) for q [K, N] in -8..7, s0 [blocks, N]: the int4 weight with its trained log-scale t.
    Inputs stay float: simulating MatMulNBits' int8 inputs (accuracy level 4) in training gave a worse artifact
    (docs/precision.md)."""

    def __init__(self, q: np.ndarray, s0: np.ndarray, block: int):
        super().__init__()
        self.block, self.k = block, q.shape[0]
        self.register_buffer("q", torch.from_numpy(q.astype(np.int8)))  # a byte a weight; float only inside forward
        self.register_buffer("s0", torch.from_numpy(np.ascontiguousarray(s0, np.float32)))
        self.t = torch.nn.Parameter(torch.zeros_like(self.s0))

    def scales(self) -> torch.Tensor:
        return self.s0 * torch.exp(self.t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., K]
        return x @ (self.q.to(x.dtype) * torch.repeat_interleave(self.scales(), self.block, 0)[:self.k])


def as_artifact(layer, li: int, scales: dict, int4: dict, block: int) -> dict[str, Int4Linear]:
    """Decoder layer `li` (a float MistralDecoderLayer) -> the layer as the artifact computes it, in place: the
    RMSNorm gammas over AWQ's s (calib/awq.py's folds; up_proj's columns over down's s are in its int4 weights
    already), every linear an Int4Linear of GPTQ's levels and scales. Returns them by checkpoint weight name."""
    for norm, g in ((layer.input_layernorm, "qkv"), (layer.post_attention_layernorm, "gate_up")):
        if (li, g) in scales:
            norm.weight = torch.nn.Parameter(norm.weight / torch.from_numpy(scales[li, g][0]), requires_grad=False)
    out = {}
    for names in GROUP_WEIGHTS.values():
        for n in names:
            name = f"model.layers.{li}.{n}.weight"
            parent, attr = n.split(".")
            k = getattr(layer.get_submodule(parent), attr).in_features
            out[name] = Int4Linear(*unpack_nbits4(*int4[name], k), block)
            setattr(layer.get_submodule(parent), attr, out[name])
    return out


def tuning_set(chat: list[np.ndarray], text: list[np.ndarray]) -> tuple[list[np.ndarray], dict]:
    """What the tuning trains on, and its record: the probe (the first PROBE_SEQUENCES chat sequences, as before
    plain text was added), then as many chat sequences (drawn at random) as plain-text windows (at most one per chat
    sequence), alternately. On the demo all 256 calibration sequences and 256 windows: twice the steps of chat
    alone (docs/precision.md)."""
    text = text[:len(chat)]
    if not text:
        return chat, {"chat_sequences": len(chat), "text_windows": 0, "text_sha256": None}
    pick = np.random.default_rng(1).permutation(len(chat))[:len(text)]
    seqs = list(chat[:PROBE_SEQUENCES]) + [x for pair in zip((chat[i] for i in pick), text) for x in pair]
    return seqs, {"chat_sequences": len(seqs) - len(text), "text_windows": len(text),
                  "text_sha256": digest(*packed(text))}


def tune_block_scales(weights, config: dict, args, seqs: list[np.ndarray], scales: dict, int4: dict, block: int,
                      lm_head: np.ndarray, epochs: int = TUNE_EPOCHS, lr: float = TUNE_LR, log=print) -> dict:
    """Tune int4's block scales in place (`int4`: checkpoint weight name -> MatMulNBits-packed, as
    calib/awq.py's int4_calibration returns it); `scales`: AWQ's (layer, group) -> (s, ...); `lm_head` [K, N]: the
    artifact's lm_head (lm_head_as_written); `seqs`: the probe first (tuning_set's). Returns the record: steps, KL
    on the probe before and after, kept.

    Neither model is held whole in float32. The float model (the teacher) runs once, before any step, one decoder
    layer at a time over the whole set, as calibration does; what the steps need of it is its final hidden state at
    every token ([tokens, H]: Mistral-7B, 200k tokens, 3 GB), from which its log-probabilities come through its
    lm_head in each step. The student keeps its int4 levels as int8 (a byte a weight) and rebuilds each layer's
    float weights q * s inside its forward; its layers are checkpointed, so the backward pass recomputes a layer's
    weights and activations from the layer's input instead of keeping them (a second student forward, in place of
    the teacher's forward that each step used to run). memory_needed adds it up."""
    from torch.utils.checkpoint import checkpoint
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm, MistralRotaryEmbedding

    from .layerwise import attention_mask, decoder_layers, torch_config

    torch.manual_seed(0)
    cfg = torch_config(config, "sdpa")
    emb = torch.from_numpy(weights.get("model.embed_tokens.weight", "float32"))  # [V, H]
    norm = MistralRMSNorm(args.hidden_size, eps=args.rms_norm_eps).requires_grad_(False)
    norm.weight = torch.nn.Parameter(torch.from_numpy(weights.get("model.norm.weight", "float32")), requires_grad=False)
    rope = MistralRotaryEmbedding(config=cfg)

    def inputs(idx) -> tuple[torch.Tensor, torch.Tensor, tuple, torch.Tensor]:
        """Sequences idx as a right-padded batch: the embedding rows [b, s, H], and what every layer reads beside
        them: the additive mask [b, 1, s, s], rotary (cos, sin), real [b, s] (which tokens are not padding)."""
        ids = pack_rows([seqs[i] for i in idx], align="right")
        lengths = np.array([len(seqs[i]) for i in idx])
        b, n = ids.shape
        x = emb[torch.from_numpy(ids)]
        with torch.no_grad():
            rot = rope(x, torch.arange(n)[None].expand(b, n))
        real = torch.from_numpy(np.arange(n)[None] < lengths[:, None])
        return x, attention_mask(lengths, n, args.sliding_window), rot, real

    # the teacher: every sequence's final hidden states [len, H], its layers read one at a time, batches of similar
    # lengths (little padding)
    by_length = np.argsort([len(x) for x in seqs], kind="stable")
    groups = [by_length[a:a + TUNE_BATCH] for a in range(0, len(seqs), TUNE_BATCH)]
    batches = [inputs(g) for g in groups]
    t0 = time.perf_counter()
    with torch.no_grad():
        for li in range(args.num_layers):
            check_interrupted()
            layer, = decoder_layers(weights, cfg, li)
            for k, (x, mask, rot, real) in enumerate(batches):
                batches[k] = (layer(x, attention_mask=mask, position_embeddings=rot), mask, rot, real)
            del layer
            if (li + 1) % max(1, args.num_layers // 4) == 0 or li + 1 == args.num_layers:
                log(f"  the float model's final hidden states, layer by layer: {li + 1}/{args.num_layers} layers "
                    f"({time.perf_counter() - t0:.0f}s)")
        final: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
        for g, (x, *_) in zip(groups, batches):
            x = norm(x)
            for r, i in enumerate(g):
                final[i] = x[r, :len(seqs[i])].clone()
    del batches
    teacher_head = torch.from_numpy(weights.get("lm_head.weight", "float32"))  # [V, H]

    student = []
    tuned: dict[str, Int4Linear] = {}
    for li in range(args.num_layers):
        layer, = decoder_layers(weights, cfg, li)
        built = as_artifact(layer, li, scales, int4, block)  # its float linears dropped, one layer at a time
        for name in built:
            int4[name] = None  # the student holds the levels and GPTQ's scales; packed again at the end
        tuned.update(built)
        student.append(layer)
    student_head = torch.from_numpy(np.ascontiguousarray(lm_head, np.float32))  # [H, V]: the artifact's
    params = [m.t for m in tuned.values()]

    def kl(idx, train: bool) -> torch.Tensor:
        """Mean KL(teacher || student) over the real tokens of sequences idx (lm_head on those rows only)."""
        x, mask, rot, real = inputs(idx)
        for layer in student:
            if train:  # keep only x; the backward pass reruns the layer
                x = checkpoint(layer, x, attention_mask=mask, position_embeddings=rot, use_reentrant=False)
            else:
                x = layer(x, attention_mask=mask, position_embeddings=rot)
        with torch.no_grad():  # sum p log p per row, then p alone: [rows, V] tensors are the step's largest
            ref = torch.log_softmax(torch.cat([final[i] for i in idx]) @ teacher_head.T, -1)
            p_log_p = (ref.exp() * ref).sum(-1)
            p = ref.exp_()
        out = torch.log_softmax(norm(x)[real] @ student_head, -1)  # real rows, sequence by sequence
        return (p_log_p - (p * out).sum(-1)).mean()

    first = min(PROBE_SEQUENCES, len(seqs))
    probe = [range(a, min(a + TUNE_BATCH, first)) for a in range(0, first, TUNE_BATCH)]

    def probe_kl() -> float:
        with torch.no_grad():
            return float(np.mean([kl(idx, train=False).item() for idx in probe]))

    before = probe_kl()
    log(f"  probe KL {before:.4f} (int4 levels and scales from GPTQ), tuning the block scales end to end")
    rng = np.random.default_rng(0)
    order = np.concatenate([rng.permutation(len(seqs)) for _ in range(epochs)])
    steps = -(-len(order) // TUNE_BATCH)
    opt = torch.optim.Adam(params, lr=lr)
    t0, running = time.perf_counter(), []
    for step in range(steps):
        check_interrupted()
        loss = kl(order[step * TUNE_BATCH:(step + 1) * TUNE_BATCH], train=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        running.append(loss.item())
        if (step + 1) % max(1, steps // 8) == 0 or step + 1 == steps:
            log(f"  block scales tuned end to end: step {step + 1}/{steps}, KL {np.mean(running):.4f} "
                f"({time.perf_counter() - t0:.0f}s)")
            running.clear()
    after = probe_kl()
    kept = after < before
    for name, m in tuned.items():
        int4[name] = pack_nbits4(m.q.numpy(), (m.scales().detach() if kept else m.s0).numpy(), block)
    log(f"  probe KL {before:.4f} -> {after:.4f} ({'tuned scales kept' if kept else 'not lower: GPTQ scales kept'})")
    return {"steps": steps, "batch": TUNE_BATCH, "learning_rate": lr, "probe_sequences": PROBE_SEQUENCES,
            "probe_kl_before": before, "probe_kl_after": after, "kept": kept,
            "seconds": round(time.perf_counter() - t0, 1)}


LAYERWISE_LR = 2e-3  # Adam on log-scales, as end to end; one pass over the set per layer


def tune_layerwise(weights, config: dict, args, seqs: list[np.ndarray], scales: dict, int4: dict, block: int,
                   lr: float = LAYERWISE_LR, log=print) -> dict:
    """`--int4-method awq-gptq-layerwise`: the block scales tuned one decoder layer at a time, each layer's output
    against the float model's (mean squared error over every real token of `seqs`), int4 levels kept.

    Layer i of the int4 model reads what the int4 layers before it produced, and is trained to output what float
    layer i outputs on the float model's own hidden states (OmniQuant's and AutoRound's block-wise reconstruction):
    so it learns to undo part of the error it inherits, which GPTQ (one linear at a time, float inputs) cannot see.
    Holds one layer (float and int4) and three copies of the set's hidden states (float in, float out, int4 in; a
    fourth while the int4 outputs replace the int4 inputs): export's memory, not the whole model's. Per layer the MSE
    over the whole set is measured before and after; where it did not fall, that layer keeps GPTQ's scales. Returns
    the record."""
    from .layerwise import decoder_layers, layer_inputs, torch_config
    from .smoothquant import calibration_batches

    torch.manual_seed(0)
    cfg = torch_config(config, "sdpa")
    batches = calibration_batches(seqs, TUNE_BATCH)  # similar lengths together: little padding
    x_float, extras = layer_inputs(weights, cfg, args, batches)  # [b, s, H]: the float model's input to layer i
    x_int4 = [x.clone() for x in x_float]  # ... and the int4 model's
    rng = np.random.default_rng(0)
    t0, layers = time.perf_counter(), []
    for li in range(args.num_layers):
        teacher, student = decoder_layers(weights, cfg, li, copies=2)
        tuned = as_artifact(student, li, scales, int4, block)

        def run(layer, xs, i):
            mask, rot, _ = extras[i]
            return layer(xs[i], attention_mask=mask, position_embeddings=rot)

        with torch.no_grad():
            target = [run(teacher, x_float, i) for i in range(len(batches))]

        def mse(i: int, out: torch.Tensor) -> torch.Tensor:
            d = (out - target[i])[extras[i][2]]  # real tokens only
            return (d * d).mean()

        def outputs() -> tuple[list[torch.Tensor], float]:
            """The int4 layer's outputs on every batch, and their MSE (mean over batches) to the float layer's."""
            with torch.no_grad():
                outs = [run(student, x_int4, i) for i in range(len(batches))]
            return outs, float(np.mean([mse(i, o).item() for i, o in enumerate(outs)]))

        # every batch, not a sample: on the demo one layer's error sits in a few batches (massive activations)
        before = outputs()[1]
        opt = torch.optim.Adam([m.t for m in tuned.values()], lr=lr)
        for i in rng.permutation(len(batches)):
            check_interrupted()
            loss = mse(i, run(student, x_int4, i))
            opt.zero_grad()
            loss.backward()
            opt.step()
        outs, after = outputs()
        kept = after < before
        for name, m in tuned.items():
            if kept:
                int4[name] = pack_nbits4(m.q.numpy(), m.scales().detach().numpy(), block)
            else:
                m.t.data.zero_()  # GPTQ's scales, also for what the next layer reads
        x_int4 = outs if kept else outputs()[0]
        x_float = target
        layers.append({"layer": li, "mse_before": before, "mse_after": after, "kept": kept})
        log(f"  block scales tuned layer by layer: {li + 1}/{args.num_layers} layers, output MSE {before:.4g} -> "
            f"{after:.4g}{'' if kept else ' (not lower: GPTQ scales kept)'} ({time.perf_counter() - t0:.0f}s)")
    return {"steps": len(batches) * args.num_layers, "batch": TUNE_BATCH, "learning_rate": lr,
            "kept": any(r["kept"] for r in layers), "layers": layers, "seconds": round(time.perf_counter() - t0, 1)}
