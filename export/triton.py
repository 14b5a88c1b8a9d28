"""`mistral-trt triton-repo EXPORT_DIR -o REPO`: an export as a standard NVIDIA Triton model repository
(`mistral-trt triton-serve REPO` serves it: serve/triton.py; docs/triton.md).

    REPO/mistral-trt-repo.json  what wrote it (so --force replaces only a repository of ours)
    REPO/NAME/config.pbtxt      python backend, decoupled (streamed responses); the inputs of Triton's generate
                                extension and TensorRT-LLM's ensemble: text_input, max_tokens, temperature, top_p,
                                top_k, min_p, seed, stop, stream (+ messages, raw, input_ids, ignore_eos); output
                                text_output
    REPO/NAME/1/model.py        serve/triton_model.py, copied: the runtime and serve's continuous-batching
                                scheduler, one per model instance
    REPO/NAME/1/export/         the export itself (hard links where the file system allows, else copies), so the
                                repository moves to another machine or into a container as one folder
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from mistral_trt.runtime.errors import UserError

CONFIG = """\
# Written by `mistral-trt triton-repo` from {export}.
name: "{name}"
backend: "python"
max_batch_size: 0  # batching is the model's own: continuous, between decode steps (serve/scheduler.py)
model_transaction_policy {{ decoupled: true }}
input [
  {{ name: "text_input", data_type: TYPE_STRING, dims: [ 1 ], optional: true }},
  {{ name: "messages", data_type: TYPE_STRING, dims: [ 1 ], optional: true }},
  {{ name: "max_tokens", data_type: TYPE_INT32, dims: [ 1 ], optional: true }},
  {{ name: "temperature", data_type: TYPE_FP32, dims: [ 1 ], optional: true }},
  {{ name: "top_p", data_type: TYPE_FP32, dims: [ 1 ], optional: true }},
  {{ name: "top_k", data_type: TYPE_INT32, dims: [ 1 ], optional: true }},
  {{ name: "min_p", data_type: TYPE_FP32, dims: [ 1 ], optional: true }},
  {{ name: "seed", data_type: TYPE_UINT64, dims: [ 1 ], optional: true }},
  {{ name: "repetition_penalty", data_type: TYPE_FP32, dims: [ 1 ], optional: true }},
  {{ name: "frequency_penalty", data_type: TYPE_FP32, dims: [ 1 ], optional: true }},
  {{ name: "presence_penalty", data_type: TYPE_FP32, dims: [ 1 ], optional: true }},
  {{ name: "stop", data_type: TYPE_STRING, dims: [ -1 ], optional: true }},
  {{ name: "stream", data_type: TYPE_BOOL, dims: [ 1 ], optional: true }},
  {{ name: "raw", data_type: TYPE_BOOL, dims: [ 1 ], optional: true }},
  {{ name: "input_ids", data_type: TYPE_INT64, dims: [ -1 ], optional: true }},
  {{ name: "ignore_eos", data_type: TYPE_BOOL, dims: [ 1 ], optional: true }},
  {{ name: "json_schema", data_type: TYPE_STRING, dims: [ 1 ], optional: true }}
]
output [
  {{ name: "text_output", data_type: TYPE_STRING, dims: [ -1 ] }}
]
instance_group [ {{ count: {instances}, kind: KIND_CPU }} ]
parameters [
  {{ key: "export_dir", value: {{ string_value: "export" }} }},
  {{ key: "max_batch", value: {{ string_value: "{max_batch}" }} }},
  {{ key: "max_queue", value: {{ string_value: "{max_queue}" }} }},
  {{ key: "max_context", value: {{ string_value: "{max_context}" }} }},
  {{ key: "provider", value: {{ string_value: "{provider}" }} }},
  {{ key: "speculate", value: {{ string_value: "{speculate}" }} }}
]
"""


# The python backend's model: a file of the serving package, copied into the repository (not imported here).
def model_py() -> Path:
    import importlib.util

    return Path(importlib.util.find_spec("mistral_trt.serve").origin).parent / "triton_model.py"


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_repo(export_dir: str | Path, out: str | Path, name: str | None = None, instances: int = 1,
               max_batch: int = 8, max_queue: int = 64, max_context: int | None = None, provider: str = "cpu",
               force: bool = False, speculate=None) -> Path:
    """`speculate`: a runtime/speculative.py Speculation every request gets (fused graph), or None."""
    from mistral_trt.runtime.engine import ENGINE_MANIFEST
    from mistral_trt.runtime.manifest import MANIFEST_NAME, Manifest

    from .atomic import TRITON_REPO_NAME, atomic_folder, check_target

    export_dir = Path(export_dir)
    m = Manifest.load(export_dir)
    m.check_files(export_dir)  # a repository of a damaged export would fail on every node it is deployed to
    name = name or export_dir.resolve().name
    if not name or any(c in name for c in "/\\ \0") or name.startswith("."):
        raise UserError(f"--name {name!r}: expected a model name without spaces or slashes")
    for flag, v in (("--instances", instances), ("--max-batch", max_batch), ("--max-context", max_context or 2)):
        if v < 1:
            raise UserError(f"{flag} {v}: expected an integer >= 1")
    if max_context and max_context > m.max_context:
        raise UserError(f"--max-context {max_context}: the model's context limit is {m.max_context}")
    if speculate is not None and m.graph != "fused":
        raise UserError("--speculate rolls rejected drafts back per sequence, which needs the fused graph "
                        "(export --graph fused)")
    if provider not in ("cpu", "cuda"):
        raise UserError(f"--provider {provider!r}: expected cpu or cuda (the python backend runs onnxruntime)")
    check_target(out, "triton-repo", force, inputs=[export_dir])
    need = sum((export_dir / f).stat().st_size for f in m.files)
    with atomic_folder(out, force, kind="triton-repo", inputs=[export_dir], need_bytes=need) as tmp:
        version = tmp / name / "1"
        (version / "export").mkdir(parents=True)
        extra = [ENGINE_MANIFEST] if (export_dir / ENGINE_MANIFEST).is_file() else []  # a TensorRT engine folder
        for f in list(m.files) + [MANIFEST_NAME] + extra:
            _link_or_copy(export_dir / f, version / "export" / f)
        shutil.copy2(model_py(), version / "model.py")
        (tmp / name / "config.pbtxt").write_text(CONFIG.format(
            name=name, export=export_dir.resolve(), instances=instances, max_batch=max_batch, max_queue=max_queue,
            max_context=max_context or "", provider=provider,
            speculate=f"ngram:{speculate.k}" if speculate is not None else ""))
        (tmp / TRITON_REPO_NAME).write_text(json.dumps({"written_by": "mistral-trt triton-repo", "models": [name],
                                                        "export": str(export_dir.resolve())}, indent=1) + "\n")
    return Path(out) / name


