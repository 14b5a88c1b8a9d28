"""Reduced-precision artifacts from an fp32 export, each a new export folder with its own manifest.

    fp16        the export's strongly typed fp16 mode (re-exported from the source checkpoint): weights,
                activations and KV cache in fp16, with RMSNorm statistics, RoPE and softmax computed in fp32
                inside the graph (HF's own modelling code does the upcasts)
    int8-w8a16  per-output-channel symmetric int8 weights for every MatMul, as explicit
                DequantizeLinear(int8 weight, fp32 scale, zero point 0, axis=1) in front of the MatMul;
                activations, norms, softmax, masks and the residual stream stay float32

    int8-w8a8   int8-w8a16's weights plus int8 activations into the layers' weight MatMuls: SmoothQuant migration
                (alpha chosen per activation by measured output error), then one per-tensor symmetric
                QuantizeLinear/DequantizeLinear pair (zero point 0) per MatMul input, its scale calibrated on
                the calibration set. Masks, softmax, norms and the residual stream stay float; activations
                with "massive" outlier channels (max > outlier_ratio x their 99.99th percentile) stay float too,
                and so does lm_head's input (its weights are int8).

    int8-w8a8-dynamic   (fused graph only, export --graph fused) onnxruntime's MatMulNBits with 8-bit weights:
                symmetric int8 per block of 32 input channels, and activations quantized to int8 per block at
                run time (accuracy_level 4: integer dot products). One fused kernel per MatMul, lm_head included;
                the embedding table stays float for its Gather. Quantized by onnxruntime's own
                MatMulNBitsQuantizer. Needs no calibration set.
    int4        (fused graph only) the same with 4-bit weights (round to nearest, symmetric, block 32).
    int4-w4a16  (portable graph) the same int4 weights for TensorRT: blockwise DequantizeLinear(int4, scale per
                block of 32 input channels, zero point 0, axis 0; opset 21), which TensorRT runs as weight-only
                int4 GEMM and onnxruntime's CPU provider fuses back into MatMulNBits. Activations stay float.

The fused precisions also come straight from the checkpoint, tensor by tensor and to the same bits:
`mistral-trt export CHECKPOINT -o OUT --graph fused --precision P` (export/fused_graph.py); that is the road
for models whose fp32 export does not fit (Mistral-7B).

The first three are what TensorRT 10/11 wants (strongly typed fp16; explicit symmetric Q/DQ) and run on onnxruntime's
CPU provider, so CI checks them.

Where each lives: the recipes and the command here; Q/DQ insertion in calib/qdq.py; SmoothQuant (int8-w8a8)
in calib/smoothquant.py.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from mistral_trt.runtime.errors import UserError
from mistral_trt.runtime.manifest import NBITS_PRECISIONS, ONNX_NAME, Manifest

from mistral_trt.export.fused_graph import LM_HEAD_BITS, activations, nbits_record
from mistral_trt.export.pipeline import Calibration
from mistral_trt.export.weights import NBITS_BLOCK, WeightQdq, block_size_for, weight_only_record

from .layerwise import projection_weights
from .qdq import save_model, weight_only
from .smoothquant import ACTIVATION_GROUPS, CALIB_METHODS, GROUPS, Recipe, int8_w8a8

PRECISIONS = ("fp16", "int8-w8a16", "int8-w8a8", "int4-w4a16", "int8-w8a8-dynamic", "int4")
FUSED_PRECISIONS = ("fp16", "int8-w8a8-dynamic", "int4")  # what a --graph fused export takes; the others are Q/DQ graphs


def quantize(export_dir: str | Path, precision: str, out: str | Path, force: bool = False, calib: str | Path | None = None,
             calib_method: str = "max", alpha: str | float = "auto", outlier_ratio: float = 20.0,
             block_size: int | None = None, lm_head_bits: int = LM_HEAD_BITS,
             log=lambda s: print(s, file=sys.stderr, flush=True)) -> Manifest:
    from mistral_trt.export.atomic import atomic_folder, check_target
    from mistral_trt.export.pipeline import save_with_files

    export_dir = Path(export_dir)
    m = Manifest.load(export_dir)
    check_target(out, "export", force, inputs=[export_dir, calib])  # before any work
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if m.dtype != "fp32" or m.precision:
        fp16 = "--dtype fp16 " if precision in NBITS_PRECISIONS and m.dtype == "fp16" else ""
        flags = ("--graph fused " if precision in NBITS_PRECISIONS else "") + fp16 + f"--precision {precision}" + (
            " --calib CALIB" if precision == "int8-w8a8" else "")
        hint = f"; or write it from the checkpoint: mistral-trt export {m.source.get('path', 'CHECKPOINT')} -o OUT {flags}"
        raise UserError(f"{export_dir}: quantize starts from an fp32 export, this one is "
                        f"{m.precision.get('name', m.dtype)}{hint}")
    block_size = block_size_for(precision, block_size, m.model)
    if (m.graph == "fused") != (precision in FUSED_PRECISIONS) and precision != "fp16":
        need = "a --graph fused export" if precision in FUSED_PRECISIONS else "a --graph portable export (Q/DQ for TensorRT)"
        raise UserError(f"{export_dir}: --precision {precision} needs {need}; this one is graph {m.graph!r}")
    if precision == "int8-w8a8":
        recipe = w8a8_recipe(calib, calib_method, alpha, outlier_ratio)
        calib_manifest, seqs = load_calibration(calib, m.model.vocab_size)
    m.check_files(export_dir)  # quantizing weights that changed after export would publish garbage with a new hash
    if precision == "fp16":
        from mistral_trt.export.pipeline import export_model

        new = export_model(m.source["path"], out, dtype="fp16", force=force, graph=m.graph)
        new.precision = {"name": "fp16", "method": "export --dtype fp16 (HF modelling code, fp32 norms/RoPE/softmax)",
                         "from": str(export_dir.absolute())}
        new.save(out)
        return new
    need = sum((export_dir / n).stat().st_size for n in m.files)
    with atomic_folder(out, force, kind="export", inputs=[export_dir, calib], need_bytes=need) as tmp:
        if precision in NBITS_PRECISIONS:
            bits = NBITS_PRECISIONS[precision]
            head = lm_head_bits if bits == 4 else None
            stats = nbits(export_dir / ONNX_NAME, tmp / ONNX_NAME, bits, block_size, head)
            m.precision = nbits_record(precision, block_size, head)
        elif precision in ("int8-w8a16", "int4-w4a16"):
            stats = weight_only(export_dir / ONNX_NAME, tmp / ONNX_NAME, WeightQdq.of(precision, block_size, lm_head_bits))
            m.precision = weight_only_record(precision, block_size, lm_head_bits)
        else:
            stats = int8_w8a8(export_dir, tmp / ONNX_NAME, seqs, recipe, log=log)
            acts = stats.pop("activations")
            (tmp / "quantization.json").write_text(json.dumps(acts, indent=1) + "\n")
            m.precision = w8a8_record(recipe, alpha, calib, calib_manifest, len(seqs), acts, ONNX_STATISTICS)
        for name in m.tokenizer_files:
            shutil.copy2(export_dir / name, tmp / name)
        m.precision.update({"from": str(export_dir.absolute()), "quantized_matmuls": stats["matmuls"], "weight_bytes": stats["bytes"]})
        m.verification = []
        save_with_files(m, tmp)
    return Manifest.load(out)


ONNX_STATISTICS = "an fp32 export, run by onnxruntime"
CHECKPOINT_STATISTICS = "the checkpoint, one decoder layer at a time, run by torch"


def w8a8_recipe(calib, calib_method: str, alpha, outlier_ratio: float) -> Recipe:
    """int8-w8a8's settings from the command's flags, checked (both roads: `quantize` and `export`)."""
    if calib is None:
        raise UserError("--precision int8-w8a8 calibrates activations: pass --calib CALIB (from `mistral-trt calibrate`)")
    if calib_method not in CALIB_METHODS:
        raise UserError(f"--calib-method {calib_method!r}: expected one of {', '.join(CALIB_METHODS)}")
    if not (outlier_ratio > 1 and outlier_ratio != float("inf")):
        raise UserError(f"--outlier-ratio {outlier_ratio}: expected a finite number > 1")
    alphas = {} if alpha == "auto" else {g: float(alpha) for g in GROUPS}
    return Recipe(alpha=alphas, method=calib_method, groups=ACTIVATION_GROUPS, outlier_ratio=outlier_ratio)


def load_calibration(calib, vocab_size: int) -> tuple[dict, list]:
    """The calibration folder's manifest and sequences (hash-checked), refused if its ids do not fit this model."""
    from mistral_trt.calib.data import load, load_manifest

    calib_manifest = load_manifest(calib)
    seqs = load(calib)
    top = max((int(x.max()) for x in seqs if len(x)), default=0)
    if top >= vocab_size:
        raise UserError(f"{calib}: token id {top} is outside this model's vocabulary ({vocab_size}); calibrate with an "
                        "export of this model")
    return calib_manifest, seqs


def w8a8_record(recipe: Recipe, alpha, calib, calib_manifest: dict, sequences: int, acts: list[dict],
                statistics: str) -> dict:
    """The manifest's precision record of an int8-w8a8 artifact (`quantize` and `export` alike)."""
    kept = [r["activation"] for r in acts if r.get("kept_float")]
    return {
        "name": "int8-w8a8",
        "method": (f"SmoothQuant (alpha {alpha}{' per activation, by output error' if alpha == 'auto' else ''}) + "
                   f"per-tensor symmetric int8 activations ({recipe.method} calibration, QuantizeLinear/"
                   "DequantizeLinear, zero point 0) + per-channel symmetric int8 weights"),
        "calibration": {"path": str(Path(calib).absolute()), "sha256": calib_manifest["sha256"],
                        "sequences": sequences, "method": recipe.method, "statistics": statistics},
        "quantized_activations": len(acts) - len(kept),
        "float_activations": kept, "outlier_ratio": recipe.outlier_ratio, "details": "quantization.json",
    }


class CheckpointW8a8(Calibration):
    """int8-w8a8 straight from the checkpoint (`export --precision int8-w8a8 --calib CALIB`): the statistics come
    from the checkpoint one decoder layer at a time (calib/layerwise.py), the edits are applied to each weight as
    export/onnx_export.py streams it. export_model runs it as its first stage; the edits carry the manifest's
    precision record and quantization.json."""

    def __init__(self, calib, calib_method: str = "max", alpha="auto", outlier_ratio: float = 20.0):
        self.calib, self.alpha = calib, alpha
        self.recipe = w8a8_recipe(calib, calib_method, alpha, outlier_ratio)

    def run(self, weights, c, target, log):
        from .layerwise import layerwise_plans
        from .smoothquant import SmoothQuantEdits

        calib, alpha, recipe = self.calib, self.alpha, self.recipe
        calib_manifest, seqs = load_calibration(calib, c.args.vocab_size)
        log(f"  {len(seqs)} calibration sequences, {sum(len(x) for x in seqs)} tokens, {c.args.num_layers} layers")
        plans = layerwise_plans(weights, c.config, c.args, seqs, recipe, log=log)
        return SmoothQuantEdits(c.args, plans, describe=lambda report: w8a8_record(
            recipe, alpha, calib, calib_manifest, len(seqs), report, CHECKPOINT_STATISTICS))


# --int4-method with --calib (without --calib int4 rounds to nearest): awq-gptq-layerwise then tunes GPTQ's block scales
# on each decoder layer's output, awq-gptq-e2e on the whole model's (calib/tune.py); auto (the default) chooses by the
# model's size (auto_int4_method)
INT4_METHODS = ("auto", "awq-gptq", "awq-gptq-layerwise", "awq-gptq-e2e", "awq")
TUNED_INT4_METHODS = ("awq-gptq-layerwise", "awq-gptq-e2e")
AUTO_E2E_BELOW = 10**9  # parameters


def parameters(args) -> int:
    """Every weight of a MistralForCausalLM of these numbers: the embedding, each decoder layer's seven projections
    and two norms, the final norm, and lm_head unless it is tied to the embedding. Mistral-7B: 7,241,732,096."""
    h = args.hidden_size
    return args.num_layers * (projection_weights(args) + 2 * h) + h + \
        args.vocab_size * h * (1 if args.tie_word_embeddings else 2)


def auto_int4_method(args) -> tuple[str, str]:
    """`--int4-method auto`: awq-gptq-e2e below a billion parameters, awq-gptq from there; returns (method, why).

    4-bit weights cost a small model far more than a large one (the demo's 135M: AWQ + GPTQ +6.4 % perplexity, tuned
    end to end +2.2 %; 7B models lose a few percent with AWQ or GPTQ alone, docs/precision.md), and the end-to-end
    tuning's time grows with the parameters: minutes to an hour below a billion on a CPU, hours for Mistral-7B. The
    choice depends on the checkpoint alone, so the same command gives the same artifact on every machine.

    >>> from mistral_trt.runtime.manifest import ModelArgs
    >>> auto_int4_method(ModelArgs("MistralForCausalLM", 32, 32, 8, 128, 4096, 14336, 32000, 1e6, 32768, None, 1e-5,
    ...                            False))[0]
    'awq-gptq'
    """
    p = parameters(args)
    if p < AUTO_E2E_BELOW:
        return "awq-gptq-e2e", (f"{p / 1e6:,.0f}M parameters, below 1B: the block scales tuned end to end, about 5x "
                                "awq-gptq's time; --int4-method awq-gptq for the faster recipe")
    return "awq-gptq", (f"{p / 1e9:.1f}B parameters, 1B or more: AWQ + GPTQ; --int4-method awq-gptq-e2e tunes the "
                        "block scales end to end too (hours on a CPU at this size)")


class Int4Calibration:
    """int4 calibrated on the checkpoint (calib/awq.py, calib/gptq.py): AWQ's scales, and with method awq-gptq every
    decoder-layer weight quantized by GPTQ in AWQ's scaled space; the manifest's precision record and awq.json (per
    layer and input: AWQ's alpha and output error, and the output error of round to nearest and of GPTQ).

    The fused writer reads `scales` (folds) and `int4` (the quantized weights, by checkpoint name); the portable one
    (int4-w4a16) streams its weights through prepare/weight/finish, SmoothQuant's folding without its activation
    Q/DQ (calib/smoothquant.py): 1/s lands in the same RMSNorm gammas and up_proj columns, and `int4_weight` gives
    the quantized weights (TensorRT's positive scales: calibrated for int4-w4a16, not shared with the fused graph)."""

    def __init__(self, scales: dict, int4: dict, errors: dict, method: str, calib, calib_manifest: dict, sequences: int,
                 precision: str = "int4", args=None, tuning: dict | None = None, dtype: str = "fp32",
                 requested: str | None = None):
        self.scales, self.int4, self.errors, self.method, self.tuning = scales, int4, errors, method, tuning
        self.requested = requested or method
        self.calib, self.calib_manifest, self.sequences = calib, calib_manifest, sequences
        self.precision, self.args, self.dtype, self._edits = precision, args, dtype, None

    def record(self) -> dict:
        weights = ("onnxruntime MatMulNBits: symmetric int4 weights per block, " + activations(self.dtype)
                   ) if self.precision == "int4" else (
                   "symmetric int4 weights per block (blockwise DequantizeLinear, zero point 0, opset 21); float "
                   "activations")
        rounding = ("GPTQ (each block's scale searched by output error, H from every calibration token; "
                    "o_proj included)" if self.method != "awq" else "round to nearest (o_proj unscaled)")
        if self.tuning and self.tuning["kept"]:
            how = ("layer by layer (each decoder layer's output MSE to the float model's"
                   if self.method == "awq-gptq-layerwise" else "end to end (KL to the float model")
            rounding += f", then the block scales tuned {how} on calibration chat and plain text, int4 levels fixed)"
        return {"name": self.precision, "int4_method": self.method,
                **({"int4_method_requested": self.requested} if self.requested != self.method else {}),
                "method": ("activation-aware scaling (AWQ: s = mean|x|^alpha, alpha per activation by output error, "
                           f"folded into RMSNorm gammas and up_proj columns), then {rounding} + {weights}"),
                **({"tuning": self.tuning} if self.tuning else {}),
                "calibration": {"path": str(Path(self.calib).absolute()), "sha256": self.calib_manifest["sha256"],
                                "sequences": self.sequences, "statistics": CHECKPOINT_STATISTICS},
                "details": "awq.json"}

    def files(self) -> dict[str, str]:
        rows = []
        for li, g in sorted(set(self.scales) | set(self.errors)):
            row = {"layer": li, "group": g}
            if (li, g) in self.scales:
                _, alpha, err = self.scales[li, g]
                row.update(alpha=alpha, output_error=err)
            if (li, g) in self.errors:
                row.update({f"output_error_{k}": v for k, v in self.errors[li, g].items()})
            rows.append(row)
        return {"awq.json": json.dumps(rows, indent=1) + "\n"}

    def int4_weight(self, name: str):
        """The quantized weight of checkpoint tensor `name` ("model.layers.0.self_attn.q_proj.weight") as
        MatMulNBits-packed (uint8 [N, blocks, block/2], scales [N, blocks]), or None (round to nearest)."""
        return self.int4.get(name)

    # the portable writer's edits (export/onnx_export.py export_streaming)
    def prepare(self, nodes, shapes):
        from .smoothquant import SmoothQuantEdits, Smoothing

        plans = {key: Smoothing(s, None, alpha, {"alpha": alpha, "output_error": err})
                 for key, (s, alpha, err) in self.scales.items()}
        self._edits = SmoothQuantEdits(self.args, plans, quantize=False).prepare(nodes, shapes)
        return self

    def weight(self, name, w):
        return self._edits.weight(name, w)

    def finish(self, g, add) -> None:
        self._edits.finish(g, add)


class CheckpointInt4(Calibration):
    """int4 calibrated straight from the checkpoint (`export --graph fused --precision int4 --calib CALIB`, or
    `--precision int4-w4a16 --calib CALIB` for TensorRT), by `method` (INT4_METHODS). The precision, block and
    lm_head's bits (which awq-gptq-e2e's tuning computes through) are the export's: export_model hands them to run."""

    def __init__(self, calib, method: str = "auto"):
        if calib is None:
            raise UserError("calibrated int4 calibrates on a set: pass --calib CALIB (from `mistral-trt calibrate`)")
        if method not in INT4_METHODS:
            raise UserError(f"--int4-method {method!r}: expected one of {', '.join(INT4_METHODS)}")
        self.calib, self.requested = calib, method

    def method(self, args) -> tuple[str, str | None]:
        """The method this export runs, and why where auto chose it (auto_int4_method)."""
        return auto_int4_method(args) if self.requested == "auto" else (self.requested, None)

    def preflight(self, c) -> None:
        if self.method(c.args)[0] == "awq-gptq-e2e":
            check_tuning_memory(c.args, self.calib, self.requested)

    def run(self, weights, c, target, log):
        from .awq import int4_calibration

        (method, why), calib = self.method(c.args), self.calib
        precision, block_size = target.precision, target.block_size
        calib_manifest, seqs = load_calibration(calib, c.args.vocab_size)
        log(f"  {len(seqs)} calibration sequences, {sum(len(x) for x in seqs)} tokens, {c.args.num_layers} layers, "
            f"{method}" + (f" (--int4-method auto: {why})" if why else ""))
        scales, int4, errors = int4_calibration(weights, c.config, c.args, seqs, block_size, gptq=method != "awq",
                                                positive=precision == "int4-w4a16", log=log)
        tuning = None
        if method in TUNED_INT4_METHODS:
            from mistral_trt.runtime.tokenizer import Tokenizer

            from .data import tuning_text
            from .tune import lm_head_as_written, tune_block_scales, tune_layerwise, tuning_set

            text = [t for t in tuning_text(Tokenizer.load(c.path)) if int(t.max()) < c.args.vocab_size]
            mixed, trained_on = tuning_set(seqs, text)
            log(f"  tuning set: {trained_on['chat_sequences']} calibration sequences (chat) and "
                f"{trained_on['text_windows']} plain-text windows")
            if method == "awq-gptq-layerwise":
                tuned = tune_layerwise(weights, c.config, c.args, mixed, scales, int4, block_size, log=log)
            else:
                head = lm_head_as_written(weights.get("lm_head.weight", "float32").T, precision, block_size,
                                          target.lm_head_bits)
                tuned = tune_block_scales(weights, c.config, c.args, mixed, scales, int4, block_size, head, log=log)
            tuning = {**tuned, **trained_on}
        return Int4Calibration(scales, int4, errors, method, calib, calib_manifest, len(seqs), precision, c.args,
                               tuning, target.dtype, self.requested)


def check_tuning_memory(args, calib, requested: str = "awq-gptq-e2e") -> None:
    """awq-gptq-e2e holds the int4 levels, the scales' training state, the float model's final hidden states and a
    step's backward pass (calib/tune.py memory_needed): refused up front (before hours of layer-by-layer calibration)
    where the memory is not there. The tuning set's size comes from the calibration manifest: its chat tokens, the
    probe's sequences again, and a plain-text window per chat sequence (calib/tune.py tuning_set)."""
    from mistral_trt.export.pipeline import available_gib

    from .data import TUNING_TEXT_TOKENS, TUNING_TEXT_WINDOWS, load_manifest
    from .tune import PROBE_SEQUENCES, memory_needed

    m = load_manifest(calib)
    t = m.get("tokens") if isinstance(m.get("tokens"), dict) else {}
    if isinstance(t.get("total"), int) and isinstance(t.get("max"), int) and isinstance(m["count"], int):
        tokens = t["total"] + PROBE_SEQUENCES * t["max"] + min(m["count"], TUNING_TEXT_WINDOWS) * TUNING_TEXT_TOKENS
        need = memory_needed(args, tokens, longest=max(t["max"], TUNING_TEXT_TOKENS)) / 2**30
    else:  # a manifest without token counts: the default set's bound
        need = memory_needed(args) / 2**30
    have = available_gib()
    if need > have:
        chose = "--int4-method auto chose awq-gptq-e2e (below 1B parameters)" if requested == "auto" else \
            "--int4-method awq-gptq-e2e"
        raise UserError(f"{chose}: tuning this model's block scales end to end needs about "
                        f"{need:.1f} GiB (the int4 model, its scales' training state and a backward pass), {have:.1f} "
                        "GiB available: use --int4-method awq-gptq (no tuning), awq-gptq-layerwise (the scales tuned "
                        "one layer at a time, one layer in memory), or a larger machine")


def nbits(src: Path, dst: Path, bits: int = 8, block_size: int = NBITS_BLOCK, lm_head_bits: int | None = None) -> dict:
    """MatMulNBitsQuantizer over every MatMul; with lm_head_bits, lm_head (the MatMul giving `logits`) in a second
    pass with its own bits."""
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # a line per node
    model = onnx.load(str(src))
    head = [n.name for n in model.graph.node if n.op_type == "MatMul" and "logits" in n.output]
    passes = [(bits, head, None)] + [(lm_head_bits, None, head)] if lm_head_bits and lm_head_bits != bits else \
        [(bits, None, None)]
    for b, exclude, include in passes:
        q = MatMulNBitsQuantizer(model, bits=b, block_size=block_size, is_symmetric=True, accuracy_level=4,
                                 nodes_to_exclude=exclude, nodes_to_include=include)
        q.process()
        model = q.model.model
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    packed = {i for n in nodes for i in n.input[1:3]}
    nbytes = sum(len(t.raw_data) for t in model.graph.initializer if t.name in packed)
    save_model(model, dst)
    return {"matmuls": len(nodes), "bytes": nbytes}


