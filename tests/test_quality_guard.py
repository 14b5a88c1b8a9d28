"""When the quality tier runs (scripts/quality_guard.py): a change to what it guards is seen, item by item; a change
elsewhere is not; the record of a pass is what `check` compares with."""
from __future__ import annotations

import json
import shutil

import quality_guard as qg


def copy_guarded(tmp_path):
    root = tmp_path / "repo"
    for p in qg.guarded_files():
        rel = p.relative_to(qg.ROOT)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, root / rel)
    return root


def test_every_guarded_item_is_seen_and_nothing_else(tmp_path, monkeypatch):
    root = copy_guarded(tmp_path)
    record = {"guarded": qg.state(root)}
    assert qg.differences(record, qg.state(root)) == []
    assert record["guarded"] == {k: v for k, v in qg.state().items()}  # the copy hashes as the tree does
    (root / "runtime").mkdir()
    (root / "runtime" / "cache.py").write_text("# not guarded\n")
    assert qg.differences(record, qg.state(root)) == []
    for rel in ("calib/tune.py", "export/weights.py", "export/fused_graph.py", "tests/test_quality.py"):
        (root / rel).write_text((root / rel).read_text() + "\n# changed\n")
        assert qg.differences(record, qg.state(root)) == [f"{rel}: changed"]
        record = {"guarded": qg.state(root)}
    (root / "calib" / "new_recipe.py").write_text("X = 1\n")
    assert qg.differences(record, qg.state(root)) == ["calib/new_recipe.py: new"]


def test_recipe_defaults_and_library_versions_are_guarded(tmp_path, monkeypatch):
    root = copy_guarded(tmp_path)
    record = {"guarded": qg.state(root)}
    defaults = qg.recipe_defaults()
    assert defaults["export"]["block_size"] == "None" and "int4_method" in defaults["export"]
    defaults["export"]["block_size"] = "64"
    monkeypatch.setattr(qg, "recipe_defaults", lambda: defaults)
    assert qg.differences(record, qg.state(root)) == ["defaults of export/quantize/calibrate: changed"]
    monkeypatch.undo()
    monkeypatch.setattr(qg, "library_versions", lambda names: {n: "0.0.1" for n in names})
    assert "version of onnxruntime: changed" in qg.differences(record, qg.state(root))


def test_check_compares_with_the_committed_record(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(qg, "RECORD", tmp_path / "docs" / "results" / "quality.json")
    monkeypatch.setattr(qg, "ROOT", tmp_path)
    assert qg.main(["check"]) == 1 and "no record" in capsys.readouterr().out
    (tmp_path / "r.json").write_text(json.dumps({"int4": {"numpy": []}}))
    assert qg.main(["record", str(tmp_path / "r.json"), "61"]) == 0
    saved = json.loads(qg.RECORD.read_text())
    assert saved["results"] == {"int4": {"numpy": []}} and saved["seconds"] == 61 and saved["cpu"]
    assert qg.main(["check"]) == 0 and "not run again" in capsys.readouterr().out
    saved["guarded"]["calib/tune.py"] = "0" * 16
    qg.RECORD.write_text(json.dumps(saved))
    assert qg.main(["check"]) == 1 and "calib/tune.py: changed" in capsys.readouterr().out
