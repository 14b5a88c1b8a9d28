"""The fused graph (export/fused_graph.py): onnxruntime contrib ops with an in-place KV cache. It must give
the portable graph's logits (verify ran at export, against PyTorch) and HF's greedy tokens, through the
same Generator; its cache must really be updated in place; misuse must fail with one clear line."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from mistral_trt.calib.quantize import quantize
from mistral_trt.export.pipeline import export_model
from mistral_trt.main import main
from mistral_trt.runtime import UserError
from mistral_trt.runtime.backend import open_backend
from mistral_trt.runtime.generate import ending_together
from mistral_trt.runtime.manifest import Manifest
from mistral_trt.runtime.ort import FusedBackend, PortableBackend
from conftest import score
from test_generate import hf_greedy
from test_generate import ours as greedy


def test_fused_is_fused_and_verified(tiny_fused):
    for name, folder in tiny_fused.items():
        m = Manifest.load(folder)
        assert m.graph == "fused" and m.cache["layout"] == "in-place"
        assert m.verification and all(r["passed"] for r in m.verification), m.verification
        assert any(r["name"] == "batch 2, chunked prefill, idle row" for r in m.verification)
        ops = [n.op_type for n in onnx.load(str(folder / "model.onnx")).graph.node]
        assert ops.count("GroupQueryAttention") == m.model.num_layers and "Concat" not in ops
        assert isinstance(open_backend(folder), FusedBackend)
    assert any(r["name"].startswith("window 8") for r in Manifest.load(tiny_fused["window"]).verification)


@pytest.mark.parametrize("name", ["window", "full"])
def test_fused_greedy_equals_hf_and_portable(tiny_fused, tiny_exports, tiny_window, tiny_full, name):
    """48 new tokens: with W = 8 that is 7x past the window, so the op's own eviction is exercised."""
    prompt = np.random.default_rng(3).integers(3, 32000, 13).tolist()
    got = greedy(tiny_fused[name], [prompt], 48, prefill_chunk=5)[0].tolist()
    assert got == hf_greedy(tiny_window if name == "window" else tiny_full, prompt, 48)
    assert got == greedy(tiny_exports[name, "fp32"], [prompt], 48, prefill_chunk=5)[0].tolist()


def test_fused_batch_equals_alone(tiny_fused):
    """Ragged left-padded prompts (one idle in the first chunk) give each row's own tokens."""
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, 32000, n) for n in (19, 3, 8)]
    for folder in tiny_fused.values():
        batched = greedy(folder, prompts, 12, prefill_chunk=6)
        for i, p in enumerate(prompts):
            assert batched[i].tolist() == greedy(folder, [p], 12)[0].tolist()


def test_last_is_the_last_column(tiny_fused, tiny_exports):
    """step(last=True), what generation uses, equals each row's last token of the all-tokens step, on a ragged
    batch (one row idle in the first step, one real token in the second); the fused graph runs lm_head on that
    column alone (logits_index)."""
    rng = np.random.default_rng(6)
    rows = [rng.integers(3, 32000, n) for n in (9, 1, 7)]
    for folder in (tiny_fused["window"], tiny_exports["window", "fp32"]):
        e = open_backend(folder)
        caches = [e.new_cache(3, 16) for _ in range(2)]
        for c in caches:
            for _ in rows:
                c.admit()
        for tokens in ending_together(rows, [5, 4]):
            n = [len(t) for t in tokens]
            full = e.step(caches[0], tokens, last=False).copy()
            last = e.step(caches[1], tokens, last=True)
            assert last.shape == (3, e.args.vocab_size)
            for b in range(3):
                np.testing.assert_allclose(last[b], full[b, n[b] - 1] if n[b] else 0, rtol=0, atol=1e-5)


def test_fused_export_before_logits_index_is_refused(tiny_fused, tmp_path):
    import json
    import shutil

    old = shutil.copytree(tiny_fused["full"], tmp_path / "old")
    m = json.loads((old / "manifest.json").read_text())
    m["inputs"] = [t for t in m["inputs"] if t["name"] != "logits_index"]
    (old / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="export it again"):
        open_backend(old)


def test_cache_is_updated_in_place(tiny_fused):
    e = open_backend(tiny_fused["full"])
    cache = e.new_cache(1, 16)
    slot = cache.admit()
    first = [b.ctypes.data for b in cache.buffers]
    e.step(cache, [[5, 6, 7]])
    k0 = cache.buffers[0][0, :, :3].copy()
    assert np.abs(k0).sum() > 0 and not cache.buffers[0][0, :, 3:].any()  # three positions written, no more
    e.step(cache, [[8]])
    assert [b.ctypes.data for b in cache.buffers] == first  # never reallocated, never copied
    assert cache.buffers[0][0, :, 3].any() and np.array_equal(cache.buffers[0][0, :, :3], k0)
    assert cache.next_pos.tolist() == [4] and slot == 0


def test_fused_bad_use_is_one_line(tiny_fused, tiny_exports, tmp_path):
    e = open_backend(tiny_fused["full"])
    cache = e.new_cache(1, 8)
    with pytest.raises(UserError, match="admit"):
        e.step(cache, [[5, 6]])  # no sequence in the slot
    cache.admit()
    with pytest.raises(UserError, match="overflow"):
        e.step(cache, [np.arange(3, 12)])
    with pytest.raises(UserError, match=r"ids must lie in \[0, 32000\)"):
        e.step(cache, [[5, 32000]])
    with pytest.raises(UserError, match="graph 'fused'"):
        PortableBackend(tiny_fused["full"])
    with pytest.raises(UserError, match="portable graph for TensorRT"):
        open_backend(tiny_fused["full"], "tensorrt")
    with pytest.raises(UserError, match="needs a --graph portable export"):
        quantize(tiny_fused["full"], "int8-w8a16", tmp_path / "q")
    with pytest.raises(UserError, match="needs a --graph fused export"):
        quantize(tiny_exports["full", "fp32"], "int8-w8a8-dynamic", tmp_path / "q")
    assert not (tmp_path / "q").exists()
    assert main(["export", "x", "-o", str(tmp_path / "o"), "--graph", "fused", "--provider", "tensorrt"]) != 0


def test_fused_weights_stream_to_external_data(tiny_window, tmp_path, monkeypatch):
    """Above 2 GB the weights go straight to model.onnx.data (7B): forced here with a tiny threshold."""
    import mistral_trt.export.fused_graph as fg

    monkeypatch.setattr(fg, "EXTERNAL_DATA_THRESHOLD", 1000)
    m = export_model(str(tiny_window), tmp_path / "ext", graph="fused")
    assert {"model.onnx", "model.onnx.data", *m.tokenizer_files, "config.json"} <= set(m.files)
    assert all(r["passed"] for r in m.verification)
    assert (tmp_path / "ext" / "model.onnx").stat().st_size < 100_000


def test_int8_dynamic_structure_and_closeness(tiny_fused, tmp_path):
    q = quantize(tiny_fused["window"], "int8-w8a8-dynamic", tmp_path / "q8")
    a = q.model
    assert q.graph == "fused" and q.precision["quantized_matmuls"] == 5 * a.num_layers + 1  # qkv, o, gate, up, down + lm_head
    nodes = onnx.load(str(tmp_path / "q8" / "model.onnx")).graph.node
    nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
    assert len(nbits) == 5 * a.num_layers + 1 and not [n for n in nodes if n.op_type == "MatMul"]
    assert all({x.name: x.i for x in n.attribute}["bits"] == 8 for n in nbits)
    prompt = np.random.default_rng(5).integers(3, 32000, 40)
    lr, lq = score(tiny_fused["window"], prompt), score(tmp_path / "q8", prompt)
    assert (lr.argmax(-1) == lq.argmax(-1)).mean() >= 0.9
    assert np.abs(lr - lq).max() < 0.1 * np.abs(lr).max()


def test_fused_graph_weight_bytes_by_hand(tiny_fused, tmp_path):
    """The fused graph's decode reads exactly the checkpoint's weights (the embedding and the rotary tables
    are only gathered from); int8-w8a8-dynamic: one int8 byte per weight + one fp32 scale per 32 or 64."""
    from mistral_trt.bench.latency import decode_weight_bytes, graph_decode_bytes

    a = Manifest.load(tiny_fused["full"]).model
    fp32 = graph_decode_bytes(tiny_fused["full"])
    assert fp32 == decode_weight_bytes(a, "fp32")
    norms = (2 * a.num_layers + 1) * a.hidden_size * 4
    matmul_weights = (fp32 - norms) // 4
    for block in (32, 64):
        quantize(tiny_fused["full"], "int8-w8a8-dynamic", tmp_path / f"b{block}", block_size=block)
        assert graph_decode_bytes(tmp_path / f"b{block}") == norms + matmul_weights * (1 + 4 / block)
    with pytest.raises(UserError, match="power of two"):
        quantize(tiny_fused["full"], "int8-w8a8-dynamic", tmp_path / "b48", block_size=48)


def test_bench_fused_first_and_bandwidth_probes(tiny_fused, tiny_exports, tmp_path, capsys):
    """The first folder is "ours"; the bandwidth is probed after every timed round and the floor uses the
    highest probe (a floor must not be beaten)."""
    import json

    out = tmp_path / "bench"
    assert main(["bench", str(tiny_fused["full"]), str(tiny_exports["full", "fp32"]), "--prompt-len", "8,16",
                 "--gen-len", "4", "--warmup", "1", "--repeat", "2", "-o", str(out)]) == 0
    table = capsys.readouterr().out
    fused, f32 = f"ours:{tiny_fused['full'].name}", f"ours:{tiny_exports['full', 'fp32'].name}"  # named by folder
    assert table.count(f"| {fused} |") == 2 and table.count(f"| {f32} |") == 2
    data = json.loads((out / "bench.json").read_text())
    assert len(data["bandwidth_probes_bytes_s"]) == 1 + 2 * 2  # one before, one after each timed round
    assert data["bandwidth_bytes_s"] == max(data["bandwidth_probes_bytes_s"])
    first = [r for r in data["rows"] if r["system"] == fused]
    other = [r for r in data["rows"] if r["system"] == f32]
    for f, o in zip(first, other):
        assert o["ours_speedup_decode"] == pytest.approx(o["decode_ms"]["p50"] / f["decode_ms"]["p50"])


def test_fused_generate_cli_without_torch(tiny_fused):
    """The fused engine is runtime code: generate runs with torch and transformers blocked; 40 tokens on
    the window model (W = 8) cross the op's eviction many times."""
    import json

    from conftest import run_without_torch

    r = run_without_torch(f"""
        from mistral_trt.main import main
        sys.exit(main(["generate", {str(tiny_fused["window"])!r}, "--prompt", "Hi", "--max-new-tokens", "40", "--json"]))
    """)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["ids"]) == 40


def _initializers(folder) -> dict:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(folder / "model.onnx")).graph.initializer}


def test_streamed_weights_are_hf_weights_to_the_bit(tiny_window, tmp_path):
    """The fused writer reads the safetensors files itself (no model in memory). From a bf16 checkpoint (the real
    Mistral-7B-Instruct-v0.2's dtype) its fp16 and fp32 weights equal what Hugging Face loads for that dtype, bit for
    bit, and the fp16 export still passes verify against PyTorch."""
    import torch
    from transformers import MistralForCausalLM

    bf16 = tmp_path / "bf16"
    MistralForCausalLM.from_pretrained(tiny_window, dtype=torch.bfloat16).save_pretrained(bf16)
    for f in tiny_window.glob("tokenizer*"):
        (bf16 / f.name).write_bytes(f.read_bytes())
    for dtype, tdtype in (("fp16", torch.float16), ("fp32", torch.float32)):
        m = export_model(str(bf16), tmp_path / dtype, graph="fused", dtype=dtype, run_verify=dtype == "fp16")
        got = _initializers(tmp_path / dtype)
        sd = {k: v.numpy() for k, v in MistralForCausalLM.from_pretrained(bf16, dtype=tdtype).state_dict().items()}
        p = "model.layers.1."
        pairs = {"embed_tokens": sd["model.embed_tokens.weight"], "lm_head": sd["lm_head.weight"].T,
                 f"{p}o_proj": sd[p + "self_attn.o_proj.weight"].T, f"{p}down_proj": sd[p + "mlp.down_proj.weight"].T,
                 f"{p}qkv_proj": np.concatenate([sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]).T,
                 f"{p}post_attention_layernorm": sd[p + "post_attention_layernorm.weight"]}
        for name, want in pairs.items():
            assert got[name].dtype == want.dtype and got[name].tobytes() == np.ascontiguousarray(want).tobytes(), name
        if dtype == "fp16":
            assert m.verification and all(r["passed"] for r in m.verification), m.verification


@pytest.mark.parametrize("precision", ["int8-w8a8-dynamic", "int4"])
def test_export_precision_equals_export_then_quantize(tiny_full, tiny_fused, tmp_path, precision):
    """`export --precision P` (weights quantized as they stream from the checkpoint) gives the artifact that
    `export` + `quantize` gives: every initializer equal to the bit, the same nodes, the same logits."""
    direct = tmp_path / "direct"
    assert main(["export", str(tiny_full), "-o", str(direct), "--graph", "fused", "--precision", precision]) == 0
    quantize(tiny_fused["full"], precision, tmp_path / "two-step")
    a, b = _initializers(direct), _initializers(tmp_path / "two-step")
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)
    ops = lambda f: [(n.op_type, list(n.input), list(n.output)) for n in onnx.load(str(f / "model.onnx")).graph.node]  # noqa: E731
    assert ops(direct) == ops(tmp_path / "two-step")
    m = Manifest.load(direct)
    assert m.precision["name"] == precision and m.precision["quantized_matmuls"] == 5 * m.model.num_layers + 1
    assert m.precision["weight_bytes"] == Manifest.load(tmp_path / "two-step").precision["weight_bytes"]
    m.check_files(direct, full=True)
    prompt = np.random.default_rng(8).integers(3, 32000, 24)
    np.testing.assert_array_equal(score(direct, prompt), score(tmp_path / "two-step", prompt))
    bits = {x.name: x.i for x in next(n for n in onnx.load(str(direct / "model.onnx")).graph.node
                                      if n.op_type == "MatMulNBits").attribute}["bits"]
    assert bits == {"int8-w8a8-dynamic": 8, "int4": 4}[precision]


def test_int4_fp16_activations_hold_the_fp32_blocks(tiny_full, tmp_path):
    """`export --graph fused --dtype fp16 --precision int4` (the GPU form: onnxruntime's CUDA provider runs
    GroupQueryAttention in fp16 only) writes the fp32 int4 artifact's integer blocks to the bit, its scales rounded
    to fp16, fp16 cache and logits; its logits follow the fp32 artifact's, and decoding one token a step through its
    fp16 cache picks what one prefill of the whole text ranks first."""
    f32, f16 = tmp_path / "fp32", tmp_path / "fp16"
    export_model(str(tiny_full), f32, graph="fused", precision="int4")
    assert main(["export", str(tiny_full), "-o", str(f16), "--graph", "fused", "--precision", "int4", "--dtype", "fp16"]) == 0
    a, b = _initializers(f32), _initializers(f16)
    assert a.keys() == b.keys()
    blocks = [k for k in a if k.endswith(("_Q4", "_Q8"))]
    assert len(blocks) == 5 * Manifest.load(f32).model.num_layers + 1 and a["lm_head_Q8"].size
    assert all(a[k].tobytes() == b[k].tobytes() for k in blocks)
    for k in (k for k in a if k.endswith("_scales")):
        assert b[k].dtype == np.float16 and np.array_equal(b[k], a[k].astype(np.float16)), k
    m = Manifest.load(f16)
    m.check_files(f16, full=True)
    assert m.dtype == "fp16" and m.precision["name"] == "int4" and "fp16 activations" in m.precision["method"]
    assert m.precision["weight_bytes"] < Manifest.load(f32).precision["weight_bytes"]  # 2-byte scales
    ids = np.random.default_rng(3).integers(3, 32000, 24)
    want, got = score(f32, ids), score(f16, ids)
    # both quantize activations to int8 per block on the CPU provider (accuracy_level 4), each from its own
    # rounding of them: the two differ by that noise, not by the weights
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9
    assert open_backend(f16).kv_dtype == np.float16
    # decoding through the fp16 cache, one token a step, picks what one prefill of the whole text ranks first
    new = greedy(f16, [ids[:12]], 16)[0]
    whole = score(f16, np.concatenate([ids[:12], new]))
    np.testing.assert_array_equal(whole[11:-1].argmax(-1), new)


# A step script for three slots: (tokens per slot) with 0 idle. Ragged widths beside decoding rows, an idle row
# between busy ones, a row that ends and a new one in its slot, and enough tokens to pass W = 8 many times.
SHARED_WIDTH_STEPS = [(5, 0, 3), (1, 7, 0), (1, 1, 1), (4, 1, 0), (0, 1, 6), (1, 1, 1), (1, 0, 1), (9, 1, 1),
                      (1, 1, 1), (2, 0, 5), (1, 1, 1)]


@pytest.mark.parametrize("name", ["window", "full"])
def test_fused_graph_on_onnxruntime_before_1_32(tiny_fused, name, monkeypatch):
    """onnxruntime < 1.32 (onnxruntime-gpu's newest, 1.31.1) has no GroupQueryAttention query_seqlens: the loader
    takes that input out of the graph and the cache pads every row a call spans to the call's width. Each step's
    logits equal the graph's with query_seqlens on this onnxruntime (tests/ort131 runs it on a real 1.31.1), through
    ragged steps, idle rows, a slot reused, and the op's own window eviction. The ONNX carries IR version 10, not
    onnx's newest (14), which onnxruntime < 1.32 refuses."""
    import onnxruntime as ort

    from mistral_trt.runtime.ort import SHARED_WIDTH_BELOW, ort_version

    assert onnx.load(str(tiny_fused["full"] / "model.onnx"), load_external_data=False).ir_version == 10
    assert ort_version("1.31.1") == (1, 31) and ort_version("1.32.0.dev20261101") == (1, 32)
    assert ort_version(ort.__version__) >= SHARED_WIDTH_BELOW  # this machine's runs the graph as written
    ref = open_backend(tiny_fused[name])
    monkeypatch.setattr(ort, "__version__", "1.31.1")
    old, dev = open_backend(tiny_fused[name]), open_backend(tiny_fused[name])
    assert old.shared_width and not ref.shared_width
    assert "query_seqlens" not in {i.name for i in old.session.get_inputs()}
    dev.cache_device = "cpu"  # the GPU form's code on host OrtValues: bound whole for decode, a prefill row by address
    rng = np.random.default_rng(11)
    caches = [b.new_cache(3, 64) for b in (ref, old, dev)]
    assert caches[2].whole_rows and not caches[1].whole_rows
    for c in caches:
        for _ in range(3):
            c.admit()
    padded = 0
    for i, step in enumerate(SHARED_WIDTH_STEPS):
        if i == 6:  # slot 1 ends; a new sequence takes it
            for c in caches:
                c.release(1)
                assert c.admit() == 1
        tokens = [rng.integers(3, 32000, n) for n in step]
        last = i % 2 == 0
        a = ref.step(caches[0], tokens, last=last)
        for backend, cache in ((old, caches[1]), (dev, caches[2])):
            b = backend.step(cache, tokens, last=last)
            np.testing.assert_allclose(b, a, atol=2e-5, rtol=0, err_msg=f"step {i} {step}")
        padded += len({n for n in step if n}) > 1
    assert padded >= 5 and (caches[0].lengths == caches[1].lengths).all() and (caches[2].lengths == caches[1].lengths).all()
    assert caches[1].lengths.max() > 3 * 8  # past the window many times


def test_export_precision_bad_input(tiny_full, tmp_path, capsys):
    out = str(tmp_path / "o")
    cases = [(["--precision", "int4"], "--precision int4 writes onnxruntime MatMulNBits weights: add --graph fused"),
             (["--precision", "int8-w8a8", "--calib", str(tmp_path), "--dtype", "fp16"],
              "computes in fp32; leave out --dtype fp16"),
             (["--graph", "fused", "--precision", "int4", "--block-size", "24"], "--block-size 24: expected a power of two"),
             # TensorRT's INT4 weight-only GEMM: blocks of 64 or 128 dividing K (64 and 128 here)
             (["--precision", "int4-w4a16", "--block-size", "32"], "--block-size 32: TensorRT's INT4 weight-only GEMM "
              "takes blocks of 64 or 128 input channels, dividing every MatMul's K (64, 128 here); expected 64")]
    for flags, message in cases:
        assert main(["export", str(tiny_full), "-o", out, *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
    q = tmp_path / "q8"
    export_model(str(tiny_full), q, graph="fused", precision="int8-w8a8-dynamic")
    with pytest.raises(UserError, match=f"this one is int8-w8a8-dynamic; or write it from the checkpoint: mistral-trt "
                                        f"export {tiny_full.absolute()} -o OUT --graph fused --precision int4"):
        quantize(q, "int4", tmp_path / "x")


@pytest.mark.slow
def test_awq_folds_are_exact_and_int4_calibrated_end_to_end(tiny_window, tiny_fused, tiny_exports, tmp_path, capsys):
    """Activation-aware int4 (calib/awq.py) moves scale between activations and weights: with float weights the
    scaled graph computes the same logits (1/s folded into RMSNorm gammas and up_proj's columns), and
    `export --graph fused --precision int4 --calib` writes an int4 artifact whose record and awq.json say so."""
    import json

    from mistral_trt.export import checkpoint as ck
    from mistral_trt.export.fused_graph import build_graph
    from mistral_trt.export.weights import CheckpointWeights

    c = ck.inspect_checkpoint(tiny_window)
    weights = CheckpointWeights(c.weight_files, c.args.tie_word_embeddings)
    rng = np.random.default_rng(0)
    a = c.args
    awq = {(i, g): (rng.uniform(0.3, 3.0, n).astype(np.float32), 0.5, 0.0) for i in range(a.num_layers)
           for g, n in (("qkv", a.hidden_size), ("gate_up", a.hidden_size), ("down", a.intermediate_size))}
    folder = tmp_path / "scaled"
    folder.mkdir()
    for f in tiny_fused["window"].iterdir():  # the manifest and tokenizer of the plain fused export
        if f.name != "model.onnx":
            (folder / f.name).write_bytes(f.read_bytes())
    build_graph(weights, c.config, a, "fp32", folder, awq=awq)
    m = Manifest.load(folder)
    from mistral_trt.runtime.integrity import hash_file

    m.files["model.onnx"] = hash_file(folder / "model.onnx")
    m.save(folder)
    ids = rng.integers(3, 32000, 20)
    ref, got = score(tiny_fused["window"], ids), score(folder, ids)
    assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max() and (got.argmax(-1) == ref.argmax(-1)).all()
    assert not np.array_equal(got, ref)  # the weights really changed

    cal = tmp_path / "cal"
    assert main(["calibrate", str(tiny_exports["full", "fp32"]), "-o", str(cal), "--count", "12",
                 "--reply-tokens", "4"]) == 0
    out = tmp_path / "int4-awq"
    assert main(["export", str(tiny_window), "-o", str(out), "--graph", "fused", "--precision", "int4", "--calib",
                 str(cal)]) == 0
    p = Manifest.load(out).precision
    assert p["name"] == "int4" and p["method"].startswith("activation-aware scaling") and p["block_size"] == 32
    assert p["calibration"]["sequences"] == 12 and p["quantized_matmuls"] == 5 * a.num_layers + 1
    rows = json.loads((out / "awq.json").read_text())
    # AWQ's alpha for the three inputs with a fold (qkv, gate_up, down); GPTQ's error for all four, o_proj's too
    assert len(rows) == 4 * a.num_layers and sum("alpha" in r for r in rows) == 3 * a.num_layers
    assert all(0.0 <= r["alpha"] <= 1.0 for r in rows if "alpha" in r)
    assert all(r["output_error_gptq"] < r["output_error_round_to_nearest"] for r in rows)
    bits = {x.name: x.i for x in next(n for n in onnx.load(str(out / "model.onnx")).graph.node
                                      if n.op_type == "MatMulNBits").attribute}["bits"]
    assert bits == 4 and np.isfinite(score(out, ids)).all()  # its quality on the demo: docs/precision.md


@pytest.mark.parametrize("shared_width", [False, True])
def test_static_decode_equals_the_bound_step(tiny_fused, shared_width, monkeypatch):
    """The GPU form of a decode step (runtime/ort.py's StaticDecode: the cache bound whole once, the small inputs and
    the logits in buffers bound once and written in place, total_sequence_length fixed at the capacity, so a CUDA
    graph can replay it), run on host OrtValues: each step's logits equal the usual bound step's to the bit, through
    prefills beside decoding rows and rows ending and starting; one IOBinding serves every decode step. On
    onnxruntime < 1.32's graph too (no query_seqlens)."""
    import onnxruntime as ort

    if shared_width:
        monkeypatch.setattr(ort, "__version__", "1.31.1")
    ref, dev = open_backend(tiny_fused["window"]), open_backend(tiny_fused["window"])
    dev.cache_device, dev.static_decode = "cpu", True  # what a CUDA provider sets, on host memory
    made = []
    real = dev.session.io_binding
    monkeypatch.setattr(dev.session, "io_binding", lambda: made.append(1) or real(), raising=False)
    caches = [ref.new_cache(3, 64), dev.new_cache(3, 64)]
    rng = np.random.default_rng(2)
    for c in caches:
        for _ in range(3):
            c.admit()
    decode = 0
    for i, step in enumerate(SHARED_WIDTH_STEPS + [(1, 1, 1)] * 12):
        if i == 6:
            for c in caches:
                c.release(1)
                assert c.admit() == 1
        tokens = [rng.integers(3, 32000, n) for n in step]
        a, b = ref.step(caches[0], tokens), dev.step(caches[1], tokens)
        np.testing.assert_array_equal(b, a, err_msg=f"step {i} {step}")
        decode += max(step) == 1
        if i == len(SHARED_WIDTH_STEPS):
            before = len(made)
    assert dev._static is not None and dev._static.cache is caches[1] and decode >= 15
    assert len(made) == before  # 11 more decode steps, no new binding
    assert not ref.cuda_graph and ref._eager is None  # the CPU provider: no graph, no run options
    with pytest.raises(UserError, match="CUDA graphs need onnxruntime's CUDA provider"):
        FusedBackend(tiny_fused["window"], providers=["CPUExecutionProvider"], cuda_graph=True)
