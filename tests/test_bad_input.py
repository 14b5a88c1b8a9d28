"""Bad input gets one clear error line naming the file and field, exit code 2, and leaves nothing behind."""
from __future__ import annotations

import json
import shutil

import pytest

from mistral_trt.export.pipeline import export_model
from mistral_trt.main import main
from mistral_trt.runtime import Manifest, UserError


def run_export(capsys, model, out) -> str:
    assert main(["export", str(model), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mistral-trt export: error: ") and err.count("\n") == 1, err  # one line, no traceback
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name], "temporary folder left behind"
    return err


@pytest.fixture
def broken(tmp_path, tiny_full):
    """A fresh copy of a valid checkpoint to break."""
    return shutil.copytree(tiny_full, tmp_path / "ckpt")


def test_missing_folder(tmp_path, capsys):
    err = run_export(capsys, tmp_path / "nope", tmp_path / "out")
    assert "nope: no such folder" in err


def test_file_instead_of_folder(tmp_path, capsys):
    (tmp_path / "f.bin").write_bytes(b"x")
    assert "f.bin: not a folder" in run_export(capsys, tmp_path / "f.bin", tmp_path / "out")


def test_missing_config(broken, tmp_path, capsys):
    (broken / "config.json").unlink()
    assert "config.json: missing" in run_export(capsys, broken, tmp_path / "out")


def test_config_not_json(broken, tmp_path, capsys):
    (broken / "config.json").write_text("{ not json")
    assert "config.json: not valid JSON" in run_export(capsys, broken, tmp_path / "out")


def test_unsupported_architecture(broken, tmp_path, capsys):
    cfg = json.loads((broken / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (broken / "config.json").write_text(json.dumps(cfg))
    err = run_export(capsys, broken, tmp_path / "out")
    assert "model_type 'gpt2'" in err and "supported: MistralForCausalLM (model_type 'mistral')" in err


def test_bad_config_field(broken, tmp_path, capsys):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["sliding_window"] = "4096"
    (broken / "config.json").write_text(json.dumps(cfg))
    assert "field 'sliding_window' must be null or a positive integer" in run_export(capsys, broken, tmp_path / "out")


def test_missing_tokenizer(broken, tmp_path, capsys):
    (broken / "tokenizer.model").unlink()
    assert "no tokenizer: expected tokenizer.model or tokenizer.json" in run_export(capsys, broken, tmp_path / "out")


def test_missing_weights(broken, tmp_path, capsys):
    (broken / "model.safetensors").unlink()
    assert "no weights: expected *.safetensors" in run_export(capsys, broken, tmp_path / "out")


def test_weights_do_not_match_config(broken, tmp_path, capsys):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["intermediate_size"] = 96  # the weights were saved with 128
    (broken / "config.json").write_text(json.dumps(cfg))
    err = run_export(capsys, broken, tmp_path / "out")
    assert "weights do not match config.json" in err
    assert "model.layers.0.mlp.gate_proj.weight has shape [128, 64] in model.safetensors, config.json expects [96, 64]" in err


def test_corrupt_weights_file(broken, tmp_path, capsys):
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    assert "model.safetensors: not a readable safetensors file" in run_export(capsys, broken, tmp_path / "out")


def test_output_not_writable(tiny_full, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["export", str(tiny_full), "-o", str(tmp_path / "afile" / "out")]) == 2
    assert "output path is not writable" in capsys.readouterr().err


def test_failed_verification_leaves_nothing(tiny_full, tmp_path, monkeypatch):
    import mistral_trt.export.verify as vf

    monkeypatch.setattr(vf, "FP32_MAX_ABS", -1.0)  # nothing can pass
    with pytest.raises(UserError, match="verification failed"):
        export_model(str(tiny_full), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_manifest_errors(tmp_path):
    with pytest.raises(UserError, match="no manifest"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(UserError, match="schema_version 99, this runtime reads 1"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 1, "model": {"num_layers": 2}}))
    with pytest.raises(UserError, match="missing field"):
        Manifest.load(tmp_path)


def test_graph_failing_at_run_time_is_named(tiny_exports):
    """A failure inside onnxruntime while running (inputs already checked against the manifest, so the graph
    is at fault) becomes one line naming the file, from forward() and from the IOBinding step()."""
    import numpy as np
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    from mistral_trt.runtime.engine import OrtEngine

    src = tiny_exports["full", "fp32"]
    e = OrtEngine(src)

    def broken(*a, **k):
        raise Fail("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Cast node. "
                   "Status Message: Shape mismatch attempting to re-use buffer.")

    e.session.run = broken
    e.session.run_with_iobinding = broken
    with pytest.raises(UserError, match=r"model\.onnx: onnxruntime failed running the graph \(Shape mismatch"):
        e.forward(np.ones((1, 3), np.int64), np.ones((1, 3)), np.arange(3)[None], e.empty_past(1))
    with pytest.raises(UserError, match="onnxruntime failed running the graph"):
        e.step(np.ones((1, 3), np.int64), np.ones((1, 3)), np.arange(3)[None], e.new_cache(1, 8, None))
