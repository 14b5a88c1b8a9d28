"""The fused graph: Mistral written directly with onnxruntime's fused contrib ops.

`mistral-trt export --graph fused` writes this instead of the traced portable graph. Same weights,
same logits (verify checks it against PyTorch), about a sixth of the nodes, and a KV cache the graph
updates *in place*: one preallocated buffer per layer is bound as both `past` and `present`, so a decode
step reads the cache once and copies nothing (the portable graph's Concat re-writes the whole cache every
step: 5.8 of ~30 ms at 2048 positions on the demo model, scripts/profile_decode.py).

Per layer (x: [B, S, H]):

    x, residual = SkipSimplifiedLayerNormalization(down_prev, residual)    # layer 0: SimplifiedLayerNormalization
    qkv    = MatMul(x, Wqkv)                                                # [B, S, (N + 2 KV) D], q|k|v packed
    attn   = GroupQueryAttention(qkv, past_k, past_v, seqlens_k, ...)      # rotary inside; writes K/V in place
    o      = MatMul(attn, Wo)
    x, residual = SkipSimplifiedLayerNormalization(o, residual)
    gate   = MatMul(x, Wgate); up = MatMul(x, Wup)                         # [B, S, I] each
    down   = MatMul(gate * Sigmoid(gate) * up, Wdown)                       # onnxruntime fuses the SiLU (QuickGelu)

then logits = MatMul(GatherND(norm(x), logits_index), Wlm): only the columns asked for reach lm_head.

The batch is right-padded: row b holds `query_seqlens[b]` real tokens of this step at columns
[0, query_seqlens[b]), and `seqlens_k[b] + 1` is its token count after the step. Positions are implicit
(row b's column s is at absolute position seqlens_k[b] + 1 - query_seqlens[b] + s), which is exactly
what the portable graph computes from attention_mask and position_ids. With a sliding window W the op
keeps the window itself (`sliding_window_cache=1`): the buffer holds C >= W positions and the op evicts
in blocks; queries see keys i-W+1..i, as in Hugging Face.

Only onnxruntime runs this (CPU and CUDA providers); TensorRT takes the portable graph.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mistral_trt.runtime.manifest import NUMPY_DTYPE, ONNX_DATA_NAME, ONNX_NAME, ModelArgs, fused_io_specs

from .onnx_export import EXTERNAL_DATA_THRESHOLD

OPSET = 18
MS = "com.microsoft"


def rotary_tables(model, args: ModelArgs, length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [length, D/2] from the model's own rotary module, so the values are Hugging Face's to the bit."""
    import torch

    pos = torch.arange(length)[None]
    x = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = model.model.rotary_emb(x, pos)
    half = args.head_dim // 2
    return cos[0, :, :half].numpy(), sin[0, :, :half].numpy()


def build_graph(model, args: ModelArgs, dtype: str, folder: Path) -> Path:
    """Write folder/model.onnx from a loaded MistralForCausalLM (torch, any dtype).

    Weights are converted one tensor at a time; above protobuf's 2 GB limit they stream straight into
    folder/model.onnx.data, so peak memory stays near the torch model itself (7B in fp16 fits in 24 GiB)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    np_dtype = np.dtype(NUMPY_DTYPE[dtype])
    sd = model.state_dict()  # references, no copies
    big = sum(t.numel() * np_dtype.itemsize for t in sd.values()) >= EXTERNAL_DATA_THRESHOLD
    data = open(folder / ONNX_DATA_NAME, "wb") if big else None  # closed below; on an error the export folder goes
    inits: list = []
    nodes: list = []

    def init(name: str, arr: np.ndarray) -> str:
        arr = np.ascontiguousarray(arr)
        if data is None or arr.nbytes < 1024:  # shape constants stay inline: shape inference reads them
            inits.append(numpy_helper.from_array(arr, name))
            return name
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(arr.dtype), dims=arr.shape)
        offset = data.tell()
        data.write(arr.tobytes())
        data.write(b"\0" * (-data.tell() % 64))  # keep every tensor 64-byte aligned for mmap
        for key, value in (("location", ONNX_DATA_NAME), ("offset", offset), ("length", arr.nbytes)):
            t.external_data.add(key=key, value=str(value))
        t.data_location = TensorProto.EXTERNAL
        inits.append(t)
        return name

    def w(name: str) -> np.ndarray:
        return sd[name].detach().numpy().astype(np_dtype, copy=False)  # fp16 stays fp16: no fp32 detour

    def node(op: str, ins: list[str], outs: list[str], domain: str = "", **attrs) -> list[str]:
        nodes.append(helper.make_node(op, ins, outs, name=f"{op}_{len(nodes)}", domain=domain, **attrs))
        return outs

    a = args
    eps = float(a.rms_norm_eps)
    cos, sin = rotary_tables(model, a, a.max_position_embeddings)
    init("cos_cache", cos.astype(np_dtype))
    init("sin_cache", sin.astype(np_dtype))
    init("embed_tokens", w("model.embed_tokens.weight"))
    node("Gather", ["embed_tokens", "input_ids"], ["embeds"])

    gqa = dict(num_heads=a.num_heads, kv_num_heads=a.num_kv_heads, do_rotary=1, rotary_interleaved=0)
    if a.sliding_window is not None:
        gqa.update(local_window_size=a.sliding_window, sliding_window_cache=1)  # W keys, itself included

    down, residual = None, "embeds"
    for i in range(a.num_layers):
        p = f"model.layers.{i}."
        g_in = init(f"{p}input_layernorm", w(p + "input_layernorm.weight"))
        if i == 0:
            x = node("SimplifiedLayerNormalization", ["embeds", g_in], [f"l{i}.x"], axis=-1, epsilon=eps)[0]
        else:
            x, _, _, residual = node("SkipSimplifiedLayerNormalization", [down, residual, g_in],
                                     [f"l{i}.x", "", "", f"l{i}.res_attn"], domain=MS, epsilon=eps)
        wqkv = np.concatenate([w(p + f"self_attn.{n}_proj.weight") for n in "qkv"], axis=0).T  # [H, (N+2KV)D]
        qkv = node("MatMul", [x, init(f"{p}qkv_proj", wqkv)], [f"l{i}.qkv"])[0]
        attn = node("GroupQueryAttention",
                    [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k",
                     "total_sequence_length", "cos_cache", "sin_cache"] + [""] * 7 + ["query_seqlens"],
                    [f"l{i}.attn", f"present.{i}.key", f"present.{i}.value"], domain=MS, **gqa)[0]
        o = node("MatMul", [attn, init(f"{p}o_proj", w(p + "self_attn.o_proj.weight").T)], [f"l{i}.o"])[0]
        g_post = init(f"{p}post_attention_layernorm", w(p + "post_attention_layernorm.weight"))
        x, _, _, residual = node("SkipSimplifiedLayerNormalization", [o, residual, g_post],
                                 [f"l{i}.x2", "", "", f"l{i}.res_mlp"], domain=MS, epsilon=eps)
        # gate and up as two MatMuls, not one packed MatMul + Split: the Split's copy cost more than it saved
        gate = node("MatMul", [x, init(f"{p}gate_proj", w(p + "mlp.gate_proj.weight").T)], [f"l{i}.gate"])[0]
        up = node("MatMul", [x, init(f"{p}up_proj", w(p + "mlp.up_proj.weight").T)], [f"l{i}.up"])[0]
        sig = node("Sigmoid", [gate], [f"l{i}.sig"])[0]
        silu = node("Mul", [gate, sig], [f"l{i}.silu"])[0]
        act = node("Mul", [silu, up], [f"l{i}.act"])[0]
        down = node("MatMul", [act, init(f"{p}down_proj", w(p + "mlp.down_proj.weight").T)], [f"l{i}.down"])[0]

    g = init("model.norm", w("model.norm.weight"))
    x = node("SkipSimplifiedLayerNormalization", [down, residual, g], ["final_norm"], domain=MS, epsilon=eps)[0]
    # Only the columns in logits_index reach lm_head: generation needs one per row, and lm_head over a
    # whole prompt is a fifth of a prefill's work (576 x 49152 per token on the demo model).
    idx = node("Unsqueeze", ["logits_index", init("axis_2", np.array([2], np.int64))], ["logits_index_3d"])[0]
    x = node("GatherND", [x, idx], ["final_norm_kept"], batch_dims=1)[0]  # [B, logits_len, H]
    lm = w("model.embed_tokens.weight" if a.tie_word_embeddings else "lm_head.weight")
    node("MatMul", [x, init("lm_head", lm.T)], ["logits"])

    inputs, outputs = fused_io_specs(a, dtype)
    elem = {"int64": TensorProto.INT64, "int32": TensorProto.INT32, "float32": TensorProto.FLOAT,
            "float16": TensorProto.FLOAT16}
    vi = lambda t: helper.make_tensor_value_info(t.name, elem[t.dtype], t.dims)  # noqa: E731
    graph = helper.make_graph(nodes, "mistral", [vi(t) for t in inputs], [vi(t) for t in outputs], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                              producer_name="mistral-trt")
    if data is not None:
        data.close()
    path = folder / ONNX_NAME
    onnx.save_model(proto, str(path))
    return path
