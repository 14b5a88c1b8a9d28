"""Export of tiny random Mistral checkpoints (with and without a sliding window, fp32 and fp16):
the graph, the manifest, verification against PyTorch, and the runtime's independence from torch."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from transformers import MistralForCausalLM

from conftest import make_tiny_mistral, run_without_torch
from mistral_trt.export import checkpoint as ck
from mistral_trt.export import pipeline
from mistral_trt.main import main
from mistral_trt.runtime import Manifest, UserError
from mistral_trt.runtime.backend import open_backend

CASES = [("window", "fp32"), ("window", "fp16"), ("full", "fp32"), ("full", "fp16")]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c))
def test_manifest_describes_the_export(tiny_exports, tiny_window, tiny_full, case):
    folder = tiny_exports[case]
    src = tiny_window if case[0] == "window" else tiny_full
    m = Manifest.load(folder)
    cfg = json.loads((src / "config.json").read_text())
    assert m.schema_version == 2 and m.dtype == case[1]
    assert (m.model.num_layers, m.model.num_heads, m.model.num_kv_heads, m.model.head_dim) == (
        cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"])
    theta = cfg["rope_parameters"]["rope_theta"]  # transformers 5 writes rope_theta here
    assert (m.model.hidden_size, m.model.vocab_size, m.model.rope_theta) == (cfg["hidden_size"], cfg["vocab_size"], theta)
    assert m.model.sliding_window == cfg["sliding_window"]
    assert m.cache["keep"] == (None if cfg["sliding_window"] is None else cfg["sliding_window"] - 1)
    assert m.cache["position_ids"] == "absolute" and m.cache["max_context"] == cfg["max_position_embeddings"]
    assert (m.bos_token_id, m.eos_token_id, m.pad_token_id) == (1, [2], None)
    assert m.chat_format == "mistral-v1" and m.chat_template is None  # Mistral's v1 sentencepiece tokenizer
    assert m.tokenizer_files[0] == "tokenizer.model"
    for name in m.tokenizer_files:  # copied as they are, but tokenizer_config.json: written for other clients (interop)
        if name != "tokenizer_config.json":
            assert (folder / name).read_bytes() == (src / name).read_bytes()
    names = ["model.onnx", *m.tokenizer_files, "config.json", "generation_config.json", "genai_config.json"]
    assert m.files == {n: ck.sha256(folder / n) for n in names}
    assert m.tokenizer == {"file": "tokenizer.model", "vocab_size": 32000, "add_bos": True}  # sentencepiece: BOS
    assert m.source["weights"] == {"model.safetensors": ck.sha256(src / "model.safetensors")}
    assert {"torch", "transformers", "onnx", "onnxruntime", "mistral_trt"} <= set(m.versions)
    assert m.verification and all(r["passed"] for r in m.verification)
    assert len(m.verification) == (5 if cfg["sliding_window"] else 4) + (case[1] == "fp16")  # + pooled fp16 row


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c))
def test_graph_io_matches_manifest(tiny_exports, case):
    folder = tiny_exports[case]
    m = Manifest.load(folder)
    g = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    elem = {"int64": onnx.TensorProto.INT64, "float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16}
    for values, specs in ((g.input, m.inputs), (g.output, m.outputs)):
        assert [v.name for v in values] == [s.name for s in specs]
        for v, s in zip(values, specs):
            dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            assert dims == s.dims, v.name
            assert v.type.tensor_type.elem_type == elem[s.dtype], v.name
    assert len(m.inputs) == 3 + 2 * m.model.num_layers and len(m.outputs) == 1 + 2 * m.model.num_layers


def test_window_mask_is_in_the_graph(tiny_exports, tiny_window):
    """Untrimmed cache, 4x the window in one prefill and then decode steps: only an in-graph sliding-window
    mask gives HF's logits (a trace that baked the window away would attend to every key)."""
    backend = open_backend(tiny_exports["window", "fp32"])
    ids = np.random.default_rng(3).integers(3, 32000, 40)
    model = MistralForCausalLM.from_pretrained(tiny_window, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)[None]).logits[0].numpy()
    cache = backend.new_cache(1, 40, trim=False)
    cache.admit()
    got = [backend.step(cache, [ids[:32]], last=False)[0].copy()]
    for t in range(32, 40):
        got.append(backend.step(cache, [ids[t:t + 1]], last=False)[0].copy())
    assert cache.columns == 40  # nothing trimmed: the graph's mask did the window
    np.testing.assert_allclose(np.concatenate(got), ref, atol=1e-4)


def test_step_contract_refuses_bad_use_by_name(tiny_exports):
    backend = open_backend(tiny_exports["full", "fp32"])
    cache = backend.new_cache(2, 16)
    with pytest.raises(UserError, match=r"tokens for slot\(s\) \[0\], which hold no sequence: admit\(\) first"):
        backend.step(cache, [[5], []])
    a = cache.admit()
    with pytest.raises(UserError, match="expected 2 counts >= 0, one per slot"):
        backend.step(cache, [[5]])
    with pytest.raises(UserError, match=r"tokens for slot 0: ids must lie in \[0, 32000\), got 5..32000"):
        backend.step(cache, [[5, 32000], []])
    with pytest.raises(UserError, match="tokens for slot 0: expected a 1-D list of integer ids"):
        backend.step(cache, [[[5]], []])
    backend.step(cache, [[5, 6], []])
    with pytest.raises(UserError, match="starts a batch together"):  # a ColumnCache: no joining a running batch
        cache.admit()
    with pytest.raises(UserError, match="overflow"):
        backend.step(cache, [np.arange(3, 18), []])
    cache.release(a)
    assert cache.admit() == 0 and cache.columns == 0  # the batch ended: the cache starts empty


def test_verify_fails_against_other_weights(tiny_exports, tmp_path, capsys):
    """`verify` can fail: the same config with other random weights must not pass."""
    other = make_tiny_mistral(tmp_path / "other", sliding_window=8, seed=7)
    assert main(["verify", str(tiny_exports["window", "fp32"]), "--model", str(other)]) == 2
    out = capsys.readouterr()
    assert "FAIL" in out.out and "verification failed" in out.err
    assert main(["verify", str(tiny_exports["window", "fp32"])]) == 0  # the recorded source passes


@pytest.mark.slow
def test_external_data_in_one_file(tiny_full, tmp_path, monkeypatch):
    """Above the 2 GB threshold the weights go to one model.onnx.data (threshold lowered to exercise it)."""
    from mistral_trt.export.interop import INTEROP_FILES
    import mistral_trt.export.onnx_export as ox

    monkeypatch.setattr(ox, "EXTERNAL_DATA_THRESHOLD", 0)
    out = tmp_path / "ext"
    m = pipeline.export_model(str(tiny_full), out, dtype="fp16")
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("model")) == ["model.onnx", "model.onnx.data"]
    assert (out / "model.onnx").stat().st_size < 1e6 < (out / "model.onnx.data").stat().st_size
    assert set(m.files) == {"model.onnx", "model.onnx.data", *m.tokenizer_files, *INTEROP_FILES}
    assert m.files["model.onnx.data"] == ck.sha256(out / "model.onnx.data")
    assert all(r["passed"] for r in m.verification)


def test_runtime_runs_without_torch(tiny_exports):
    """mistral_trt.runtime imports and runs the exported model with torch and transformers unimportable."""
    r = run_without_torch(f"""
        import sys
        import numpy as np
        from mistral_trt.runtime.backend import open_backend
        e = open_backend({str(tiny_exports["window", "fp16"])!r})
        cache = e.new_cache(1, 8)
        cache.admit()
        logits = e.step(cache, [[1, 415, 2936]], last=False)
        assert logits.shape == (1, 3, 32000) and cache.past()[0].shape == (1, 2, 3, 16), (logits.shape, cache.columns)
        assert not any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules)
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.mark.slow
def test_existing_output_needs_force(tiny_full, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", str(tiny_full), "-o", str(out), "--no-verify"]) == 0
    before = (out / "manifest.json").stat().st_ino
    assert main(["export", str(tiny_full), "-o", str(out), "--no-verify"]) == 2
    assert "already exists (pass --force" in capsys.readouterr().err
    assert (out / "manifest.json").stat().st_ino == before
    assert main(["export", str(tiny_full), "-o", str(out), "--no-verify", "--force"]) == 0  # an export: replaced
    assert (out / "manifest.json").stat().st_ino != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders or lock left


def test_files_for_other_clients(tiny_exports, tiny_fused, tmp_path):
    """config.json, generation_config.json, tokenizer_config.json and (portable graph) genai_config.json are derived
    from the manifest and covered by its hashes; transformers loads the config, and our own tokenizer rules
    (BOS) read the same from tokenizer_config.json. Clients themselves: tests/interop (make test-interop)."""
    from transformers import AutoConfig

    from mistral_trt.calib.quantize import quantize

    folder = tiny_exports["window", "fp32"]
    m = Manifest.load(folder)
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "genai_config.json"):
        assert m.files[name] == ck.sha256(folder / name), name
    cfg = AutoConfig.from_pretrained(folder)
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.sliding_window, cfg.num_key_value_heads) == (
        "mistral", m.model.num_layers, m.model.sliding_window, m.model.num_kv_heads)
    tcfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert tcfg["tokenizer_class"] == "LlamaTokenizer" and tcfg["add_bos_token"] is True and tcfg["bos_token"] == "<s>"
    genai = json.loads((folder / "genai_config.json").read_text())["model"]
    assert genai["decoder"]["inputs"]["past_key_names"] == "past_key_values.%d.key" and genai["context_length"] == m.max_context
    fused = Manifest.load(tiny_fused["full"])
    assert "genai_config.json" not in fused.files and not (tiny_fused["full"] / "genai_config.json").exists()
    q = quantize(tiny_exports["full", "fp32"], "int8-w8a16", tmp_path / "w8")
    assert {"config.json", "genai_config.json", "tokenizer_config.json"} <= set(q.files)
