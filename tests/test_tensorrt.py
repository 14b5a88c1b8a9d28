"""TensorRT engine: profiles, the engine manifest and its compatibility checks (CPU), and the native
backend against onnxruntime (only where tensorrt imports and a GPU is present)."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import tomllib
from pathlib import Path

import numpy as np
import pytest

from mistral_trt.main import main
from mistral_trt.runtime import Manifest, UserError
from mistral_trt.runtime.engine import EngineManifest, check_compatible, profile_shapes


def _has_gpu() -> bool:
    """An NVIDIA GPU with its driver on this host (whatever Python packages are installed)."""
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _has_gpu_tensorrt() -> str | None:
    """None when the native backend can run here, else why not."""
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed (TensorRT wheels need an NVIDIA host: docs/tensorrt.md)"
    try:
        from mistral_trt.runtime.cuda import gpu_info

        gpu_info()
    except Exception as e:  # no driver, no device, no cuda-python
        return f"no usable CUDA device: {e}"
    return None


GPU_SKIP = _has_gpu_tensorrt()
HAS_GPU = _has_gpu()


@pytest.mark.skipif(not HAS_GPU, reason="no NVIDIA GPU on this host (nvidia-smi -L)")
def test_gpu_host_can_run_the_native_backend():
    """On a host with a GPU a broken TensorRT install (a CUDA 13 wheel on an r5xx driver, no cuda-python, ...)
    fails here loudly instead of turning every GPU test into a skip."""
    assert GPU_SKIP is None, f"this host has a GPU but the native TensorRT backend cannot run: {GPU_SKIP}"


def test_profile_shapes(tiny_exports):
    m = Manifest.load(tiny_exports["full", "fp32"])
    kv, d = m.model.num_kv_heads, m.model.head_dim
    p = profile_shapes(m, max_batch=2, max_step_tokens=64, max_context=1024)
    assert p["prefill"]["input_ids"] == [[1, 1], [1, 32], [2, 64]]
    assert p["prefill"]["attention_mask"] == [[1, 1], [1, 32 + 480], [2, 1024]]
    assert p["prefill"]["past_key_values.0.key"] == [[1, kv, 0, d], [1, kv, 480, d], [2, kv, 960, d]]
    assert p["decode"]["input_ids"] == [[1, 1], [1, 1], [2, 1]]
    assert p["decode"]["past_key_values.1.value"] == [[1, kv, 0, d], [1, kv, 511, d], [2, kv, 1023, d]]
    assert p["decode"]["attention_mask"][2] == [2, 1024]
    assert set(p["decode"]) == set(m.input_names())


def test_profile_shapes_with_window(tiny_exports):
    """The runtime trims a windowed cache to keep = W - 1 positions: past never needs more."""
    m = Manifest.load(tiny_exports["window", "fp32"])
    keep = m.cache["keep"]
    assert keep == m.model.sliding_window - 1
    p = profile_shapes(m, max_batch=1, max_step_tokens=16, max_context=1024)
    assert p["decode"]["past_key_values.0.key"][2][2] == keep
    assert p["prefill"]["attention_mask"][2] == [1, keep + 16]


def test_profile_limits_are_checked(tiny_exports):
    m = Manifest.load(tiny_exports["full", "fp32"])
    limit = m.max_context
    with pytest.raises(UserError, match=rf"the model's limit \(cache.max_context\) is {limit}"):
        profile_shapes(m, 1, 64, limit + 1)
    with pytest.raises(UserError, match="must be below --max-context"):
        profile_shapes(m, 1, 512, 512)
    with pytest.raises(UserError, match="expected >= 1"):
        profile_shapes(m, 0, 64, 512)


def _engine_manifest(**over) -> EngineManifest:
    fields = dict(tensorrt_version="11.4.0", gpu={"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"},
                  profiles={"prefill": {}, "decode": {}}, limits={"max_batch": 1, "max_step_tokens": 64, "max_context": 512},
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
    # schema 2 named the limits max_seq and max_total: an engine built then still loads, under today's names
    raw = _as_dict(_engine_manifest())
    old = {"max_batch": raw["limits"]["max_batch"], "max_seq": raw["limits"]["max_step_tokens"],
           "max_total": raw["limits"]["max_context"]}
    (tmp_path / "engine.json").write_text(json.dumps({**raw, "schema_version": 2, "limits": old}))
    assert EngineManifest.load(tmp_path).limits == raw["limits"]


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
    assert main(["engine", str(tiny_exports["full", "fp32"]), "-o", str(out), "--max-step-tokens", "4096",
                 "--max-context", "1024"]) == 2
    assert "must be below --max-context" in capsys.readouterr().err


@pytest.mark.skipif(GPU_SKIP is not None, reason=str(GPU_SKIP))
@pytest.mark.parametrize("model", ["full", "window"])
def test_native_tensorrt_matches_onnxruntime(tiny_exports, tmp_path, model):
    """Build an engine from the fp32 export and generate with it: the same greedy tokens as onnxruntime,
    logits within fp32 kernel noise, through prefill (profile 0), decode (profile 1) and window trims."""
    from mistral_trt.export.tensorrt import build_engine
    from mistral_trt.runtime.engine import EngineManifest as EM
    from mistral_trt.runtime.generate import Generator
    from mistral_trt.runtime.sampling import Sampling
    from mistral_trt.runtime.ort import PortableBackend
    from mistral_trt.runtime.tensorrt_backend import TensorRTBackend

    src = tiny_exports[model, "fp32"]
    build_engine(src, tmp_path / "e", max_batch=2, max_step_tokens=32, max_context=256, timing_cache=tmp_path / "t.cache")
    assert (tmp_path / "t.cache").stat().st_size > 0
    build_engine(src, tmp_path / "e2", max_batch=2, max_step_tokens=32, max_context=256, timing_cache=tmp_path / "t.cache")
    assert EM.load(tmp_path / "e2").build["timing_cache_reused"]
    prompts = [np.random.default_rng(1).integers(3, 32000, 40), np.random.default_rng(2).integers(3, 32000, 25)]
    ref = np.stack(list(Generator(PortableBackend(src), prefill_chunk=16).generate(prompts, 40, Sampling(), stop_on_eos=False)))
    got = np.stack(list(Generator(TensorRTBackend(tmp_path / "e"), prefill_chunk=16).generate(prompts, 40, Sampling(), stop_on_eos=False)))
    assert (ref == got).mean() >= 0.97  # fp32 with TF32 off: argmax ties aside, identical
    shutil.rmtree(tmp_path / "e2")


class FakeCuda:
    """Host memory behind the calls DeviceColumns makes, to check its pointer arithmetic on CPU."""

    def __init__(self):
        self.mem = np.zeros(1 << 20, np.uint8)
        self.top = 64

    def malloc(self, n: int) -> int:
        ptr, self.top = self.top, self.top + n + 64
        return ptr

    def d2h(self, arr, src, stream):
        arr.reshape(-1).view(np.uint8)[:] = self.mem[src:src + arr.nbytes]

    def d2h_2d(self, arr, src, spitch, stream):
        width = arr.nbytes // arr.shape[0]
        for r in range(arr.shape[0]):
            arr[r].reshape(-1).view(np.uint8)[:] = self.mem[src + r * spitch: src + r * spitch + width]

    def d2d_2d(self, dst, dpitch, src, spitch, width, height, stream):
        for r in range(height):
            self.mem[dst + r * dpitch: dst + r * dpitch + width] = self.mem[src + r * spitch: src + r * spitch + width].copy()

    def view(self, ptr: int, shape, dtype=np.float32) -> np.ndarray:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return self.mem[ptr:ptr + n].view(dtype).reshape(shape)


def test_device_columns_trim_like_host_columns():
    """The same ColumnCache over device memory (one strided copy per tensor for the window trim) holds exactly
    what it holds over host memory: the last `keep` positions of every (batch, head) row, in order."""
    from mistral_trt.runtime.cache import ColumnCache, ColumnStorage
    from mistral_trt.runtime.cuda import DeviceColumns

    cuda = FakeCuda()
    dev_store = DeviceColumns(cuda, None, tensors=4, shape=(2, 3, 4), capacity=20, dtype=np.float32)
    dev = ColumnCache(dev_store, slots=2, capacity=20, keep=7)
    host = ColumnCache(ColumnStorage(4, (2, 3, 4), 20, np.float32), slots=2, capacity=20, keep=7)
    for c in (dev, host):
        c.admit(), c.admit()
    rng = np.random.default_rng(0)
    for new in (5, 1, 9, 1, 1, 12):  # under the window, crossing it, chunks longer than it
        plans = [c.metadata(np.array([new, new])) for c in (dev, host)]
        total = dev.columns + new
        for ptr, past_ptr, h_present, h_past in zip(dev.present(plans[0]), dev.past(), host.present(plans[1]), host.past()):
            step = rng.standard_normal((2, 3, new, 4)).astype(np.float32)
            full = np.concatenate([cuda.view(past_ptr, dev_store.shape_for(dev.columns)), step], axis=2)  # the Concat
            cuda.view(ptr, dev_store.shape_for(total))[...] = full
            np.copyto(h_present, np.concatenate([h_past, step], axis=2))
        dev.commit(plans[0])
        host.commit(plans[1])
        assert dev.columns == host.columns == min(total, 7) and (dev.mask == host.mask).all()
        for ptr, h in zip(dev.past(), host.past()):
            np.testing.assert_array_equal(cuda.view(ptr, dev_store.shape_for(dev.columns)), h)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_engine_folder_without_tensorrt(tiny_exports, tmp_path, capsys):
    """generate/chat/bench take an engine folder (engine.json) and say plainly what is missing here."""
    folder = tmp_path / "engine"
    shutil.copytree(tiny_exports["full", "fp32"], folder)
    _engine_manifest().save(folder)
    assert main(["generate", str(folder), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "mistral-trt generate: error: tensorrt is not installed" in err and "Traceback" not in err


# -- the TensorRT path's checks, on CPU (TensorRT itself cannot run here; stand-ins play its part) --------------
def test_tensorrt_pins_are_pairs_per_cuda_major():
    """tensorrt and cuda-python unpinned let pip pair a CUDA 13 TensorRT with a CUDA 12 driver/cuda-python."""
    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for major in (12, 13):
        deps = extras[f"tensorrt-cu{major}"]
        assert any(d.startswith(f"tensorrt-cu{major}>=") for d in deps), deps
        assert f"<{major + 1}" in next(d for d in deps if d.startswith("cuda-python")), deps
        assert not any(d.startswith("tensorrt>") for d in deps)
    assert extras["tensorrt"] == ["mistral-trt[tensorrt-cu12]"]


def test_cuda_driver_too_old_for_the_build():
    from mistral_trt.runtime.cuda import check_cuda_versions

    check_cuda_versions(12080, 12060)
    check_cuda_versions(13000, 12080)  # a newer driver runs older builds
    with pytest.raises(UserError, match=r"driver supports CUDA 12\.4, the installed TensorRT/cuda-python are built for "
                                        r"CUDA 13\.0: pip install 'mistral-trt\[tensorrt-cu12\]'"):
        check_cuda_versions(12040, 13000)
    with pytest.raises(UserError, match="no NVIDIA driver"):
        check_cuda_versions(0, 12080)


def _plan_of(m: Manifest, em: EngineManifest):
    """What a plan built from `m` with `em`'s profiles reports, as check_plan_io reads it from TensorRT."""
    names = {"int64": "INT64", "int32": "INT32", "float32": "FLOAT", "float16": "HALF"}
    io = {t.name: ("INPUT", names[t.dtype]) for t in m.inputs} | {t.name: ("OUTPUT", names[t.dtype]) for t in m.outputs}
    profiles = [{k: [tuple(x) for x in v] for k, v in em.profiles[p].items()} for p in ("prefill", "decode")]
    return io, profiles


def test_plan_io_checked_against_both_manifests(tiny_exports):
    from mistral_trt.runtime.engine import check_plan_io, prefill_past_max

    m = Manifest.load(tiny_exports["full", "fp32"])
    em = _engine_manifest(profiles=profile_shapes(m, 2, 64, 512))
    io, profiles = _plan_of(m, em)
    check_plan_io(io, profiles, m, em, "e")
    assert prefill_past_max(em) == 512 - 64
    bad = dict(io, logits=("OUTPUT", "HALF"))  # a plan of the fp16 export beside the fp32 manifest
    with pytest.raises(UserError, match="output 'logits' is HALF in the plan, manifest.json says float32"):
        check_plan_io(bad, profiles, m, em, "e")
    with pytest.raises(UserError, match="1 optimization profiles, engine.json describes 2"):
        check_plan_io(io, profiles[:1], m, em, "e")
    other = [profiles[0], dict(profiles[1], input_ids=[(1, 1), (1, 1), (4, 1)])]
    with pytest.raises(UserError, match="profile 'decode' input 'input_ids'"):
        check_plan_io(io, other, m, em, "e")
    with pytest.raises(UserError, match="no input 'position_ids'"):
        check_plan_io({k: v for k, v in io.items() if k != "position_ids"}, profiles, m, em, "e")


def test_timing_cache_damaged_or_foreign_starts_fresh():
    from mistral_trt.export.tensorrt import use_timing_cache

    class Config:  # TensorRT's IBuilderConfig as far as the timing cache goes
        def __init__(self):
            self.set = []

        def create_timing_cache(self, blob):
            return None if blob == b"garbage" else ("cache", blob)

        def set_timing_cache(self, cache, ignore_mismatch):
            if cache is None:
                raise TypeError("set_timing_cache(): incompatible function arguments")  # what TensorRT does
            self.set.append(cache)
            return cache[1] != b"other gpu"

    c = Config()
    assert use_timing_cache(c, b"good") == "reused" and c.set == [("cache", b"good")]
    for blob, state in ((b"garbage", "damaged"), (b"other gpu", "foreign"), (b"", "new")):
        c = Config()
        assert use_timing_cache(c, blob) == state and c.set[-1] == ("cache", b"")


def test_gpu_info_reads_the_device_asked_for(monkeypatch):
    import mistral_trt.runtime.cuda as trt_mod

    asked = []

    class Props:
        name, major, minor = b"NVIDIA H200", 9, 0

    class Runtime:
        def cudaGetDeviceProperties(self, device):
            asked.append(device)
            return (0, Props())

        class cudaError_t:
            cudaSuccess = 0

    class FakeCuda(trt_mod.Cuda):
        def __init__(self):
            self.rt = Runtime()

    monkeypatch.setattr(trt_mod, "Cuda", FakeCuda)
    assert trt_mod.gpu_info(3) == ("NVIDIA H200", "9.0") and asked == [3]


def test_trt_step_checks_profile_limits_before_running(tiny_exports):
    """A prefill step past the prefill profile's past limit, and any shape TensorRT refuses (set_input_shape
    returns False), get one line naming the limit instead of an unclear error later."""
    from mistral_trt.runtime.cache import ColumnCache
    from mistral_trt.runtime.cuda import DeviceColumns
    from mistral_trt.runtime.engine import PROFILES
    from mistral_trt.runtime.tensorrt_backend import TensorRTBackend

    m = Manifest.load(tiny_exports["full", "fp32"])
    em = _engine_manifest(profiles=profile_shapes(m, 1, 16, 64), limits={"max_batch": 1, "max_step_tokens": 16, "max_context": 64})

    class Context:
        def __init__(self, limit):
            self.limit = limit

        def set_input_shape(self, name, dims):
            return dims[0] <= self.limit

        def set_tensor_address(self, name, ptr):
            pass

    class NoCopy(FakeCuda):
        def h2d(self, *a):
            pass

    e = object.__new__(TensorRTBackend)  # everything TensorRT would have set up, without TensorRT
    e.args, e.manifest, e.engine_manifest, e.kv_dtype = m.model, m, em, np.dtype(np.float32)
    e.max_batch, e.max_step_tokens, e.max_context, e.prefill_past_max = 1, 16, 64, 48
    e.past_names, e.present_names = m.input_names()[3:], m.output_names()[1:]
    e.cuda, e.stream, e.buf = NoCopy(), None, {"input_ids": 0, "attention_mask": 0, "position_ids": 0, "logits": 0}
    e.contexts = [Context(limit=0), Context(limit=0)]  # refuses every shape
    a = m.model
    cache = ColumnCache(DeviceColumns(e.cuda, None, 2 * a.num_layers, (1, a.num_kv_heads, a.head_dim), 64, np.float32),
                        slots=1, capacity=64, keep=None)
    cache.admit()
    cache.columns, cache.mask = 50, np.ones((1, 50), np.int64)  # as after 50 positions
    with pytest.raises(UserError, match="prefill profile takes at most 48 past positions"):
        e.step(cache, [np.ones(4, np.int64)])
    cache.columns, cache.mask = 10, np.ones((1, 10), np.int64)
    with pytest.raises(UserError, match=r"input input_ids \[1, 4\]: outside this engine's prefill profile"):
        e.step(cache, [np.ones(4, np.int64)])
    assert PROFILES == ("prefill", "decode")


def test_generator_feeds_one_token_per_step_past_the_prefill_profile(tiny_exports):
    """With a plan whose prefill profile ends at 5 past positions, a long prompt still generates the same tokens:
    past that, the prompt goes through the decode profile one token per step."""
    from mistral_trt.runtime.backend import open_backend
    from mistral_trt.runtime.generate import Generator
    from mistral_trt.runtime.sampling import Sampling

    prompt = np.random.default_rng(4).integers(3, 32000, 23)
    ref = np.stack(list(Generator(open_backend(tiny_exports["window", "fp32"]), prefill_chunk=4).generate(
        [prompt], 10, Sampling(), stop_on_eos=False)))
    e = open_backend(tiny_exports["window", "fp32"])
    steps = []
    real = e.step

    def step(cache, tokens, last=True):
        steps.append((max(len(t) for t in tokens), cache.columns))  # (tokens fed, cached positions before)
        return real(cache, tokens, last)

    e.step, e.prefill_past_max = step, 5
    got = np.stack(list(Generator(e, prefill_chunk=4).generate([prompt], 10, Sampling(), stop_on_eos=False)))
    assert (got == ref).all()
    assert all(past <= 5 for n, past in steps if n > 1) and any(n == 1 for n, _ in steps[:10])


def test_bench_refuses_shapes_an_engine_was_not_built_for(tiny_exports, tmp_path, capsys):
    folder = shutil.copytree(tiny_exports["full", "fp32"], tmp_path / "engine")
    _engine_manifest().save(folder)  # max_batch 1, max_context 512
    assert main(["bench", str(folder), "--batch", "1,4", "--prompt-len", "16", "--gen-len", "4"]) == 2
    err = capsys.readouterr().err
    assert "--batch 4:" in err and "was built with --max-batch 1" in err
    assert main(["bench", str(folder), "--prompt-len", "600", "--gen-len", "4"]) == 2
    assert "--max-context 512" in capsys.readouterr().err


@pytest.mark.parametrize("s", [1, 5])
def test_logits_to_host_copies_each_rows_last_column(s):
    """With `last`, the engine's logits come to the host one column per row (a 2048-token prefill: 98 KB, not 201
    MB); what arrives is the full copy's last column, and ColumnCache.unpack reads it as before."""
    from mistral_trt.runtime.cache import ColumnCache, ColumnStorage, StepMetadata
    from mistral_trt.runtime.cuda import logits_to_host

    cache = ColumnCache(ColumnStorage(2, (3, 1, 4), 8, np.float16), slots=3, capacity=8, keep=None)

    def left_padded_logits(logits, seqlens, last):
        return cache.unpack(logits, StepMetadata(seqlens, int(seqlens.max()), last))

    cuda, shape = FakeCuda(), (3, s, 37)
    src = cuda.malloc(int(np.prod(shape)) * 2)
    cuda.view(src, shape, np.float16)[...] = np.random.default_rng(3).standard_normal(shape)
    full = logits_to_host(cuda, src, shape, np.float16, False, None)
    np.testing.assert_array_equal(full, cuda.view(src, shape, np.float16))
    last = logits_to_host(cuda, src, shape, np.float16, True, None)
    assert last.shape == (3, 1, 37)
    seqlens = np.array([s, 1, 0])
    np.testing.assert_array_equal(left_padded_logits(last, seqlens, True), left_padded_logits(full.copy(), seqlens, True))
    assert left_padded_logits(last, seqlens, True)[0].any() and not left_padded_logits(last, seqlens, True)[2].any()


def test_ort_tensorrt_provider_gets_both_profiles(tiny_exports):
    """onnxruntime's TensorRT provider is given the prefill and decode profiles `engine` builds, over the model's whole
    context (without them it builds for the shapes it has seen, and again each time the past grows past them)."""
    from mistral_trt.runtime.engine import PROFILES
    from mistral_trt.runtime.ort import ORT_TRT_LIMITS, provider_list

    m = Manifest.load(tiny_exports["full", "fp32"])
    (name, opts), *rest = provider_list("tensorrt", "F", m)
    assert name == "TensorrtExecutionProvider" and rest == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    want = profile_shapes(m, *ORT_TRT_LIMITS, m.max_context)
    for k, key in enumerate(("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")):
        entries = [e.split(":") for e in opts[key].split(",")]
        names = [spec.name for spec in m.inputs]
        assert [n for n, _ in entries] == names * len(PROFILES)  # each input once per profile, in profile order
        got = [[int(d) for d in dims.split("x")] for _, dims in entries]
        assert got == [list(want[p][n][k]) for p in PROFILES for n in names]
    assert "trt_profile_min_shapes" not in dict([provider_list("tensorrt", "F")[0]])["TensorrtExecutionProvider"]


class CountingCuda(FakeCuda):
    def __init__(self):
        super().__init__()
        self.live = {}

    def malloc(self, n: int) -> int:
        ptr = super().malloc(n)
        self.live[ptr] = n
        return ptr

    def free(self, ptr: int) -> None:
        assert self.live.pop(ptr, None) is not None, f"free of {ptr}: not allocated, or freed twice"


def test_tensorrt_device_memory_is_shared_and_freed():
    """The two execution contexts (prefill, decode) share one scratch allocation of the engine's largest profile
    size; the device cache (2 x 2L tensors) and the backend's staging buffers and scratch are all freed by close
    (counted on a fake CUDA)."""
    from mistral_trt.runtime.cuda import DeviceColumns
    from mistral_trt.runtime.tensorrt_backend import TensorRTBackend, shared_contexts

    class Context:
        def __init__(self):
            self.memory, self.profile = None, None

        def set_device_memory(self, ptr, size):
            self.memory = (ptr, size)

        def set_optimization_profile_async(self, i, stream):
            self.profile = i

    class Engine:
        device_memory_size_v2 = 5000

        def create_execution_context(self, strategy):
            assert strategy == "USER_MANAGED"  # no scratch of its own
            return Context()

    class Trt:
        class ExecutionContextAllocationStrategy:
            USER_MANAGED = "USER_MANAGED"

    cuda = CountingCuda()
    contexts, scratch = shared_contexts(Trt, Engine(), cuda, 2, 0)
    assert cuda.live == {scratch: 5000} and [c.memory for c in contexts] == [(scratch, 5000)] * 2
    assert [c.profile for c in contexts] == [0, 1]
    e = object.__new__(TensorRTBackend)
    e.cuda, e.contexts, e.scratch = cuda, contexts, scratch
    e.buf = {name: cuda.malloc(64) for name in ("input_ids", "position_ids", "attention_mask", "logits")}
    cache = DeviceColumns(cuda, None, tensors=8, shape=(2, 2, 4), capacity=16, dtype=np.float16)
    assert len(cuda.live) == 5 + 16
    cache.close()
    e.close()
    assert cuda.live == {} and e.contexts == []


def test_generator_closes_the_cache_it_made(tiny_exports, monkeypatch):
    """A run's own cache is closed when the run ends, or when its consumer stops early (a client gone): a device
    cache is 0.5-1 GiB for a 7B model, and TensorRT's is not the garbage collector's. A cache passed in (a session's)
    stays open."""
    from mistral_trt.runtime.backend import open_backend
    from mistral_trt.runtime.generate import Generator
    from mistral_trt.runtime.ort import OrtColumns
    from mistral_trt.runtime.sampling import Sampling

    closed = []
    real = OrtColumns.close
    monkeypatch.setattr(OrtColumns, "close", lambda self: (closed.append(self), real(self)))
    backend = open_backend(tiny_exports["full", "fp32"])
    backend.cache_device = "cpu"  # the GPU form's storage (OrtColumns) on host OrtValues
    gen = Generator(backend)
    prompt = np.arange(5, 17)
    assert len(list(gen.generate([prompt], 6, Sampling(), stop_on_eos=False))) == 6 and len(closed) == 1
    steps = gen.generate([prompt], 50, Sampling(), stop_on_eos=False)
    next(steps), next(steps)
    steps.close()  # the consumer stopped after two tokens
    assert len(closed) == 2 and closed[1].values == [[], []]


def test_plan_written_and_read_without_a_second_host_copy(tmp_path):
    """`engine` writes TensorRT's plan buffer straight to the file (and hashes it there), and loading maps the file
    read-only for TensorRT: neither holds a copy of the plan in the process (tracemalloc: no allocation near its size;
    bytes(plan) and read_bytes() each made one, 14.5 GB for a 7B plan)."""
    import hashlib
    import tracemalloc

    from mistral_trt.export.tensorrt import write_plan
    from mistral_trt.runtime.tensorrt_backend import load_plan

    plan = np.random.default_rng(0).integers(0, 255, 32 << 20, dtype=np.uint8)  # a buffer, as IHostMemory is
    want = hashlib.sha256(plan.tobytes()).hexdigest()

    class Runtime:
        def deserialize_cuda_engine(self, buf):
            view = memoryview(buf)
            assert view.readonly and view.nbytes == plan.nbytes
            return hashlib.sha256(view).hexdigest()

    tracemalloc.start()
    try:
        assert write_plan(plan, tmp_path / "model.engine") == want
        assert load_plan(Runtime(), tmp_path / "model.engine") == want
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < plan.nbytes // 16, peak


def test_engine_refuses_blocks_tensorrt_cannot_run(tiny_full, tmp_path, capsys):
    """An int4-w4a16 artifact in blocks TensorRT's INT4 GEMM does not take (one written before the block rule) is
    refused by `engine` in one line before TensorRT is needed; an fp32 weight-only artifact builds with a warning
    that its GEMMs would run in fp32."""
    import json

    from mistral_trt.export.tensorrt import build_engine

    art = tmp_path / "w4"
    assert main(["export", str(tiny_full), "-o", str(art), "--precision", "int4-w4a16", "--dtype", "fp32"]) == 0
    capsys.readouterr()
    m = json.loads((art / "manifest.json").read_text())
    m["precision"]["block_size"] = 32  # as an older export recorded it
    (art / "manifest.json").write_text(json.dumps(m))
    assert main(["engine", str(art), "-o", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "int4-w4a16 in blocks of 32; TensorRT's INT4 weight-only GEMM takes blocks of 64 or 128" in err[0]
    m["precision"]["block_size"] = 64
    (art / "manifest.json").write_text(json.dumps(m))
    said = []
    with pytest.raises(UserError):  # no TensorRT here: after the checks
        build_engine(art, tmp_path / "e", log=said.append)
    assert any("every GEMM runs in fp32; export with --dtype fp16" in s for s in said)
    assert not (tmp_path / "e").exists()
