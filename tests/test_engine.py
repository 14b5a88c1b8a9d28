"""TensorRT engine: profiles, the engine manifest and its compatibility checks (CPU), and the native
backend against onnxruntime (only where tensorrt imports and a GPU is present)."""
from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest

from mistral_trt.main import main
from mistral_trt.runtime import Manifest, UserError
from mistral_trt.runtime.trt import EngineManifest, check_compatible, profile_shapes


def _has_gpu_tensorrt() -> str | None:
    """None when the native backend can run here, else why not."""
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed (TensorRT wheels need an NVIDIA host: README, TensorRT)"
    try:
        from mistral_trt.runtime.trt import gpu_info

        gpu_info()
    except Exception as e:  # no driver, no device, no cuda-python
        return f"no usable CUDA device: {e}"
    return None


GPU_SKIP = _has_gpu_tensorrt()


def test_profile_shapes(tiny_exports):
    m = Manifest.load(tiny_exports["full", "fp32"])
    kv, d = m.model.num_kv_heads, m.model.head_dim
    p = profile_shapes(m, max_batch=2, max_seq=64, max_context=1024)
    assert p["prefill"]["input_ids"] == [[1, 1], [1, 32], [2, 64]]
    assert p["prefill"]["attention_mask"] == [[1, 1], [1, 32 + 480], [2, 1024]]
    assert p["prefill"]["past_key_values.0.key"] == [[1, kv, 0, d], [1, kv, 480, d], [2, kv, 960, d]]
    assert p["decode"]["input_ids"] == [[1, 1], [1, 1], [2, 1]]
    assert p["decode"]["past_key_values.1.value"] == [[1, kv, 0, d], [1, kv, 511, d], [2, kv, 1023, d]]
    assert p["decode"]["attention_mask"][2] == [2, 1024]
    assert set(p["decode"]) == set(m.input_names())


def test_profile_shapes_with_window(tiny_exports):
    """The runtime trims a windowed cache to min_keep = W - 1 positions: past never needs more."""
    m = Manifest.load(tiny_exports["window", "fp32"])
    keep = m.cache["min_keep"]
    assert keep == m.model.sliding_window - 1
    p = profile_shapes(m, max_batch=1, max_seq=16, max_context=1024)
    assert p["decode"]["past_key_values.0.key"][2][2] == keep
    assert p["prefill"]["attention_mask"][2] == [1, keep + 16]


def test_profile_limits_are_checked(tiny_exports):
    m = Manifest.load(tiny_exports["full", "fp32"])
    limit = m.cache.get("max_context") or m.model.max_position_embeddings
    with pytest.raises(UserError, match=f"the model's limit is {limit}"):
        profile_shapes(m, 1, 64, limit + 1)
    with pytest.raises(UserError, match="must be below --max-context"):
        profile_shapes(m, 1, 512, 512)
    with pytest.raises(UserError, match="expected >= 1"):
        profile_shapes(m, 0, 64, 512)


def _engine_manifest(**over) -> EngineManifest:
    fields = dict(tensorrt_version="11.4.0", gpu={"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"},
                  profiles={"prefill": {}, "decode": {}}, limits={"max_batch": 1, "max_seq": 64, "max_context": 512},
                  source={"onnx_sha256": "0" * 64}, engine_sha256="1" * 64)
    fields.update(over)
    return EngineManifest(**fields)


def test_engine_manifest_roundtrip_and_compatibility(tmp_path):
    em = _engine_manifest()
    em.save(tmp_path)
    back = EngineManifest.load(tmp_path)
    assert back == em
    assert check_compatible(back, "11.4.0", "NVIDIA H100 80GB HBM3", "9.0") == []
    with pytest.raises(UserError, match=r"built with TensorRT 11\.4\.0, this machine has TensorRT 10\.13\.3"):
        check_compatible(back, "10.13.3", "NVIDIA H100 80GB HBM3", "9.0")
    with pytest.raises(UserError, match=r"built for NVIDIA H100 80GB HBM3 \(compute capability 9\.0\), this machine "
                                        r"has NVIDIA A100-SXM4-80GB \(compute capability 8\.0\)"):
        check_compatible(back, "11.4.0", "NVIDIA A100-SXM4-80GB", "8.0")
    warnings = check_compatible(back, "11.4.0", "NVIDIA H100 PCIe", "9.0")  # same SM: loads, tuned elsewhere
    assert len(warnings) == 1 and "NVIDIA H100 PCIe" in warnings[0] and "NVIDIA H100 80GB HBM3" in warnings[0]


def test_engine_manifest_bad_input(tmp_path):
    with pytest.raises(UserError, match="engine.json: missing"):
        EngineManifest.load(tmp_path)
    raw = _as_dict(_engine_manifest())
    del raw["gpu"]
    (tmp_path / "engine.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match="field 'gpu' missing"):
        EngineManifest.load(tmp_path)
    raw = _as_dict(_engine_manifest(profiles={"prefill": {}}))
    (tmp_path / "engine.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match="must hold prefill and decode"):
        EngineManifest.load(tmp_path)
    raw = _as_dict(_engine_manifest())
    raw["schema_version"] = 99
    (tmp_path / "engine.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match="schema_version 99"):
        EngineManifest.load(tmp_path)
    (tmp_path / "engine.json").write_text("{not json")
    with pytest.raises(UserError, match="engine.json"):
        EngineManifest.load(tmp_path)


def _as_dict(em: EngineManifest) -> dict:
    from dataclasses import asdict

    return asdict(em)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_engine_command_without_tensorrt(tiny_exports, tmp_path, capsys):
    out = tmp_path / "engine"
    assert main(["engine", str(tiny_exports["full", "fp32"]), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "mistral-trt engine: error: tensorrt is not installed" in err and "Traceback" not in err
    assert not out.exists()
    # bad limits are reported before TensorRT is needed
    assert main(["engine", str(tiny_exports["full", "fp32"]), "-o", str(out), "--max-seq", "4096",
                 "--max-context", "1024"]) == 2
    assert "must be below --max-context" in capsys.readouterr().err


@pytest.mark.skipif(GPU_SKIP is not None, reason=str(GPU_SKIP))
@pytest.mark.parametrize("model", ["full", "window"])
def test_native_tensorrt_matches_onnxruntime(tiny_exports, tmp_path, model):
    """Build an engine from the fp32 export and generate with it: the same greedy tokens as onnxruntime,
    logits within fp32 kernel noise, through prefill (profile 0), decode (profile 1) and window trims."""
    from mistral_trt.export.engine import build_engine
    from mistral_trt.runtime.engine import OrtEngine
    from mistral_trt.runtime.generate import Generator, Sampling
    from mistral_trt.runtime.trt import EngineManifest as EM
    from mistral_trt.runtime.trt import TrtEngine

    src = tiny_exports[model, "fp32"]
    build_engine(src, tmp_path / "e", max_batch=2, max_seq=32, max_context=256, timing_cache=tmp_path / "t.cache")
    assert (tmp_path / "t.cache").stat().st_size > 0
    build_engine(src, tmp_path / "e2", max_batch=2, max_seq=32, max_context=256, timing_cache=tmp_path / "t.cache")
    assert EM.load(tmp_path / "e2").build["timing_cache_reused"]
    prompts = [np.random.default_rng(1).integers(3, 32000, 40), np.random.default_rng(2).integers(3, 32000, 25)]
    ref = np.stack(list(Generator(OrtEngine(src), prefill_chunk=16).generate(prompts, 40, Sampling(greedy=True), stop_on_eos=False)))
    got = np.stack(list(Generator(TrtEngine(tmp_path / "e"), prefill_chunk=16).generate(prompts, 40, Sampling(greedy=True), stop_on_eos=False)))
    assert (ref == got).mean() >= 0.97  # fp32 with TF32 off: argmax ties aside, identical
    shutil.rmtree(tmp_path / "e2")


class FakeCuda:
    """Host memory behind the three calls DeviceKVCache makes, to check its pointer arithmetic on CPU."""

    def __init__(self):
        self.mem = np.zeros(1 << 20, np.uint8)
        self.top = 64

    def malloc(self, n: int) -> int:
        ptr, self.top = self.top, self.top + n + 64
        return ptr

    def d2d_2d(self, dst, dpitch, src, spitch, width, height, stream):
        for r in range(height):
            self.mem[dst + r * dpitch: dst + r * dpitch + width] = self.mem[src + r * spitch: src + r * spitch + width].copy()

    def view(self, ptr: int, shape, dtype=np.float32) -> np.ndarray:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return self.mem[ptr:ptr + n].view(dtype).reshape(shape)


def test_device_kv_cache_trim_matches_host_cache():
    """The device cache's window trim (one strided copy per tensor) leaves exactly what runtime/cache.py's
    host cache leaves: the last `keep` positions of every (batch, head) row, in order."""
    from mistral_trt.runtime.cache import KVCache
    from mistral_trt.runtime.trt import DeviceKVCache

    cuda = FakeCuda()
    dev = DeviceKVCache(cuda, None, num_layers=2, batch=2, kv_heads=3, head_dim=4, capacity=20, dtype=np.float32, keep=7)
    host = KVCache(2, 2, 3, 4, 20, np.float32, keep=7)
    rng = np.random.default_rng(0)
    for new in (5, 1, 9, 1, 1, 12):  # under the window, crossing it, chunks longer than it
        total = dev.length + new
        assert dev.shape_for(total) == (2, 3, total, 4)
        for ptr, past_ptr, h_present, h_past in zip(dev.present(new), dev.past(), host.present(new), host.past()):
            step = rng.standard_normal((2, 3, new, 4)).astype(np.float32)
            full = np.concatenate([cuda.view(past_ptr, dev.shape_for(dev.length)), step], axis=2)  # the graph's Concat
            cuda.view(ptr, dev.shape_for(total))[...] = full
            np.copyto(h_present, np.concatenate([h_past, step], axis=2))
        assert dev.commit(new) == host.commit(new)
        assert dev.length == host.length
        for ptr, h in zip(dev.past(), host.past()):
            np.testing.assert_array_equal(cuda.view(ptr, dev.shape_for(dev.length)), h)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_engine_folder_without_tensorrt(tiny_exports, tmp_path, capsys):
    """generate/chat/bench take an engine folder (engine.json) and say plainly what is missing here."""
    folder = tmp_path / "engine"
    shutil.copytree(tiny_exports["full", "fp32"], folder)
    _engine_manifest().save(folder)
    assert main(["generate", str(folder), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "mistral-trt generate: error: tensorrt is not installed" in err and "Traceback" not in err
