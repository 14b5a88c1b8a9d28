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
scales are kept. The whole model is held three times in float32 (teacher, student, the student's weights kept for
the backward pass): minutes on a CPU for the demo model, a GPU-sized job for Mistral-7B (`memory_needed` says how
much; export refuses before calibrating where it is not available).

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
from mistral_trt.runtime.errors import check_interrupted

from .data import digest, packed
from .layerwise import GROUP_WEIGHTS

TUNE_BATCH = 4  # sequences per step
TUNE_EPOCHS = 1  # passes over the calibration set
TUNE_LR = 2e-3  # Adam on log-scales: a step moves a scale by ~0.2 %
PROBE_SEQUENCES = 8


def memory_needed(args) -> int:
    """Bytes the tuning holds: the teacher's weights in float32, the student's int4 levels in float32 and its
    weights q * s as the forward builds and keeps them for the backward pass (so 12 bytes a parameter), and a
    backward pass's activations (TUNE_BATCH sequences of ~512 tokens); Adam's state per block scale is small."""
    h, i, v = args.hidden_size, args.intermediate_size, args.vocab_size
    kv = args.num_kv_heads * args.head_dim
    layer = h * (h + 2 * kv) + h * h + 3 * h * i
    params = args.num_layers * layer + 2 * v * h
    acts = TUNE_BATCH * 512 * (args.num_layers * (8 * h + 4 * i) + 3 * v) * 4
    return 3 * 4 * params + acts


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
        self.register_buffer("q", torch.from_numpy(q.astype(np.float32)))
        self.register_buffer("s0", torch.from_numpy(np.ascontiguousarray(s0, np.float32)))
        self.t = torch.nn.Parameter(torch.zeros_like(self.s0))

    def scales(self) -> torch.Tensor:
        return self.s0 * torch.exp(self.t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., K]
        return x @ (self.q * torch.repeat_interleave(self.scales(), self.block, 0)[:self.k])


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
    on the probe before and after, kept."""
    from transformers import MistralForCausalLM
    from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding

    from .layerwise import torch_config

    torch.manual_seed(0)
    cfg = torch_config(config, "sdpa")

    with torch.device("meta"):
        teacher, student = MistralForCausalLM(cfg), MistralForCausalLM(cfg)
    # one float copy of the checkpoint, read once: the student replaces (never edits in place) what it changes
    state = {k: torch.from_numpy(weights.get(k, "float32")) for k in teacher.state_dict()}
    for model in (teacher, student):
        model.load_state_dict(state, assign=True)
        model.model.rotary_emb = MistralRotaryEmbedding(config=cfg)  # its buffers are not in the state dict
        model.requires_grad_(False).eval()
    del state
    student.lm_head.weight = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(lm_head.T)), requires_grad=False)
    tuned: dict[str, Int4Linear] = {}
    for li, layer in enumerate(student.model.layers):
        tuned.update(as_artifact(layer, li, scales, int4, block))
    params = [m.t for m in tuned.values()]

    def kl(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean KL(teacher || student) over the real tokens of a right-padded batch (lm_head on those rows only)."""
        keep = mask.bool()
        with torch.no_grad():
            h = teacher.model(input_ids=ids, attention_mask=mask).last_hidden_state[keep]
            ref = torch.log_softmax(teacher.lm_head(h), -1)
        h = student.model(input_ids=ids, attention_mask=mask).last_hidden_state[keep]
        out = torch.log_softmax(student.lm_head(h), -1)
        return (ref.exp() * (ref - out)).sum(-1).mean()

    def batch_of(idx) -> tuple[torch.Tensor, torch.Tensor]:
        longest = max(len(seqs[i]) for i in idx)
        ids = torch.zeros(len(idx), longest, dtype=torch.long)
        mask = torch.zeros(len(idx), longest, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, :len(seqs[i])] = torch.from_numpy(seqs[i].astype(np.int64))
            mask[r, :len(seqs[i])] = 1
        return ids, mask

    probe = [batch_of(range(a, min(a + TUNE_BATCH, PROBE_SEQUENCES, len(seqs))))
             for a in range(0, min(PROBE_SEQUENCES, len(seqs)), TUNE_BATCH)]

    def probe_kl() -> float:
        with torch.no_grad():
            return float(np.mean([kl(*b).item() for b in probe]))

    before = probe_kl()
    log(f"  probe KL {before:.4f} (int4 levels and scales from GPTQ), tuning the block scales end to end")
    rng = np.random.default_rng(0)
    order = np.concatenate([rng.permutation(len(seqs)) for _ in range(epochs)])
    steps = -(-len(order) // TUNE_BATCH)
    opt = torch.optim.Adam(params, lr=lr)
    t0, running = time.perf_counter(), []
    for step in range(steps):
        check_interrupted()
        loss = kl(*batch_of(order[step * TUNE_BATCH:(step + 1) * TUNE_BATCH]))
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
    if kept:
        for name, m in tuned.items():
            int4[name] = pack_nbits4(m.q.numpy().astype(np.int8), m.scales().detach().numpy(), block)
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
                int4[name] = pack_nbits4(m.q.numpy().astype(np.int8), m.scales().detach().numpy(), block)
            else:
                m.t.data.zero_()  # GPTQ's scales, also for what the next layer reads
        x_int4 = outs if kept else outputs()[0]
        x_float = target
        layers.append({"layer": li, "mse_before": before, "mse_after": after, "kept": kept})
        log(f"  block scales tuned layer by layer: {li + 1}/{args.num_layers} layers, output MSE {before:.4g} -> "
            f"{after:.4g}{'' if kept else ' (not lower: GPTQ scales kept)'} ({time.perf_counter() - t0:.0f}s)")
    return {"steps": len(batches) * args.num_layers, "batch": TUNE_BATCH, "learning_rate": lr,
            "kept": any(r["kept"] for r in layers), "layers": layers, "seconds": round(time.perf_counter() - t0, 1)}
