"""A TensorRT engine folder (written by `mistral-trt engine`, export/tensorrt.py): what engine.json says and
the checks it allows before TensorRT is even imported.

An engine folder holds the export's manifest.json and tokenizer files (so it is a complete artifact on its
own), model.engine (the serialized plan), timing.cache, and engine.json:

    {"tensorrt_version": "11.4.0", "gpu": {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"},
     "profiles": {"prefill": {"input_ids": [[1, 1], [1, 256], [1, 512]], ...}, "decode": {...}},
     "limits": {"max_batch": 1, "max_step_tokens": 512, "max_context": 4096}, "source": {"onnx_sha256": ...}, ...}

The limits use the runtime's names (docs/architecture.md's glossary): max_batch (sequences at once),
max_step_tokens (tokens one sequence takes in one step: the graph's `seq` dim) and max_context (positions a sequence
may reach on this engine, past + seq: at most the model's own max_context).
A plan only deserializes on the TensorRT version that built it and on GPUs of the same compute capability,
so both are checked against engine.json first, and a mismatch names both sides.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import UserError, read_json
from .manifest import Manifest

ENGINE_MANIFEST = "engine.json"
TIMING_CACHE = "timing.cache"
ENGINE_SCHEMA_VERSION = 3  # 3: limits.max_step_tokens, max_context (2 named them max_seq, max_total)
V2_LIMITS = {"max_seq": "max_step_tokens", "max_total": "max_context"}
PROFILES = ("prefill", "decode")  # optimization profile i is PROFILES[i]


@dataclass
class EngineManifest:
    tensorrt_version: str
    gpu: dict  # {"name": str, "compute_capability": "9.0"}
    profiles: dict  # profile -> input name -> [min, opt, max] shapes
    limits: dict  # max_batch, max_step_tokens, max_context (past positions the decode profile accepts + 1)
    source: dict  # onnx_sha256, export folder, precision
    engine_sha256: str
    build: dict = field(default_factory=dict)  # seconds, timing cache hit, builder settings
    schema_version: int = ENGINE_SCHEMA_VERSION

    def save(self, folder: Path) -> None:
        (Path(folder) / ENGINE_MANIFEST).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "EngineManifest":
        path = Path(folder) / ENGINE_MANIFEST
        if not path.is_file():
            raise UserError(f"{path}: missing (is {folder} a folder written by `mistral-trt engine`?)")
        raw = read_json(path)
        if isinstance(raw, dict) and raw.get("schema_version") == 2 and isinstance(raw.get("limits"), dict):
            # the same limits under their old names: an engine built by the previous release still loads
            raw = {**raw, "schema_version": ENGINE_SCHEMA_VERSION,
                   "limits": {V2_LIMITS.get(k, k): v for k, v in raw["limits"].items()}}
        if raw.get("schema_version") != ENGINE_SCHEMA_VERSION:
            raise UserError(f"{path}: schema_version {raw.get('schema_version')!r}, this runtime reads "
                            f"{ENGINE_SCHEMA_VERSION}: rebuild the engine")
        names = set(cls.__dataclass_fields__)
        missing = [k for k in names - {"build", "schema_version"} if k not in raw]
        if missing:
            raise UserError(f"{path}: field {missing[0]!r} missing")
        em = cls(**{k: v for k, v in raw.items() if k in names})
        for key in ("name", "compute_capability"):
            if not isinstance(em.gpu, dict) or not isinstance(em.gpu.get(key), str):
                raise UserError(f"{path}: field 'gpu.{key}' must be a string")
        if not isinstance(em.limits, dict) or not all(
                type(em.limits.get(k)) is int and em.limits[k] > 0 for k in ("max_batch", "max_step_tokens", "max_context")):
            raise UserError(f"{path}: field 'limits' must hold positive integers max_batch, max_step_tokens, max_context")
        if set(em.profiles) != set(PROFILES):
            raise UserError(f"{path}: field 'profiles' must hold {' and '.join(PROFILES)}, got {sorted(em.profiles)}")
        return em


def check_compatible(em: EngineManifest, tensorrt_version: str, gpu_name: str, compute_capability: str,
                     where: str = "engine") -> list[str]:
    """Refuse a plan TensorRT would refuse (or crash on), naming both sides. Returns warnings: the same
    compute capability under another GPU name loads and runs correctly, but was tuned for the other card."""
    if em.tensorrt_version != tensorrt_version:
        raise UserError(f"{where}: built with TensorRT {em.tensorrt_version}, this machine has TensorRT "
                        f"{tensorrt_version}; a plan only loads on the version that built it: rebuild it here "
                        f"(`mistral-trt engine`) or install TensorRT {em.tensorrt_version}")
    if em.gpu["compute_capability"] != compute_capability:
        raise UserError(f"{where}: built for {em.gpu['name']} (compute capability {em.gpu['compute_capability']}), "
                        f"this machine has {gpu_name} (compute capability {compute_capability}): rebuild it here")
    if em.gpu["name"] != gpu_name:
        return [f"{where}: built on {em.gpu['name']}, running on {gpu_name} (same compute capability "
                f"{compute_capability}: it runs, but kernels were timed on the other card)"]
    return []


def profile_shapes(m: Manifest, max_batch: int, max_step_tokens: int, max_context: int) -> dict:
    """min/opt/max shapes per input for the two optimization profiles.

    max_context bounds past + seq. With a sliding window the runtime trims the cache to `cache.keep`
    positions after every step, so past never exceeds keep however long the conversation runs.

    Worked example (max_batch 2, max_step_tokens 64, max_context 1024, no window):
      prefill input_ids [1, 1] .. [1, 64] .. [2, 64], past [1, KV, 0, D] .. [2, KV, 960, D]
      decode  input_ids [1, 1] .. [1, 1]  .. [2, 1],  past [1, KV, 0, D] .. [2, KV, 1023, D]
    """
    if max_batch < 1 or max_step_tokens < 1 or max_context < 2:
        raise UserError(f"--max-batch {max_batch} / --max-step-tokens {max_step_tokens} / --max-context {max_context}: "
                        "expected >= 1 / >= 1 / >= 2")
    if max_context > m.max_context:
        raise UserError(f"--max-context {max_context}: the model's limit (cache.max_context) is {m.max_context} positions")
    if max_step_tokens >= max_context:
        raise UserError(f"--max-step-tokens {max_step_tokens}: must be below --max-context {max_context}")
    keep = m.cache["keep"]
    out = {}
    for name, seq in (("prefill", (1, max(1, max_step_tokens // 2), max_step_tokens)), ("decode", (1, 1, 1))):
        past_max = max_context - seq[2]
        if keep is not None:
            past_max = min(past_max, keep)
        past = (0, past_max // 2, past_max)
        shapes = {}
        for spec in m.inputs:
            dims = []
            for k in range(3):  # min, opt, max
                b = (1, 1, max_batch)[k]
                size = {"batch": b, "seq": seq[k], "past": past[k], "total": past[k] + seq[k]}
                dims.append([size.get(d, d) if isinstance(d, str) else d for d in spec.dims])
            for d in spec.dims:
                if isinstance(d, str) and d not in ("batch", "seq", "past", "total"):
                    raise UserError(f"input {spec.name}: unknown dynamic dimension {d!r}")
            shapes[spec.name] = dims
        out[name] = shapes
    return out


TRT_DTYPES = {"INT64": "int64", "INT32": "int32", "FLOAT": "float32", "HALF": "float16"}


def check_plan_io(io: dict[str, tuple[str, str]], profiles: list[dict[str, list]], m: Manifest,
                  em: "EngineManifest", where: str) -> None:
    """A plan must have the manifest's tensors with the manifest's dtypes, and exactly engine.json's
    profiles with its shapes; a mismatch would run and give wrong results. `io`: name -> (mode, dtype) as
    the plan reports them ("INPUT"/"OUTPUT", TensorRT's DataType name); `profiles`: per profile, input
    name -> [min, opt, max]."""
    for kind, specs in (("INPUT", m.inputs), ("OUTPUT", m.outputs)):
        for spec in specs:
            got = io.get(spec.name)
            if got is None or got[0] != kind:
                raise UserError(f"{where}: the plan has no {kind.lower()} {spec.name!r} that manifest.json lists; "
                                "rebuild it from this export")
            if TRT_DTYPES.get(got[1], got[1]) != spec.dtype:
                raise UserError(f"{where}: {kind.lower()} {spec.name!r} is {got[1]} in the plan, manifest.json says "
                                f"{spec.dtype}; rebuild it from this export")
    extra = sorted(set(io) - set(m.input_names()) - set(m.output_names()))
    if extra:
        raise UserError(f"{where}: the plan has tensors manifest.json does not list ({', '.join(extra[:3])})")
    if len(profiles) != len(PROFILES):
        raise UserError(f"{where}: the plan has {len(profiles)} optimization profiles, engine.json describes "
                        f"{len(PROFILES)} ({', '.join(PROFILES)})")
    for i, name in enumerate(PROFILES):
        want = em.profiles[name]
        for tensor, shapes in profiles[i].items():
            if [list(x) for x in shapes] != want.get(tensor):
                raise UserError(f"{where}: profile {name!r} input {tensor!r} is {[list(x) for x in shapes]} in the plan, "
                                f"engine.json says {want.get(tensor)}")


def prefill_past_max(em: "EngineManifest") -> int:
    """Past positions the prefill profile accepts (a prefill chunk after more than this many cached
    positions must go through the decode profile, one token per step)."""
    return em.profiles["prefill"]["past_key_values.0.key"][2][2]
