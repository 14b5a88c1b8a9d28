"""The artifact store (scripts/store.py): a stale entry can never be returned, a miss rebuilds, an entry changed after
it was published is rebuilt, a failed build publishes nothing, concurrent builders build once."""
from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

import store as st


def writer(log: list, fail: bool = False):
    """A recipe's build: writes its inputs' contents and its own mark, and counts its calls."""
    def build(out: Path, inputs: dict) -> None:
        log.append(out.name)
        out.mkdir()
        (out / "data").write_text("".join((p / "data").read_text() for p in inputs.values()) + "x")
        if fail:
            raise RuntimeError("the build failed half way")
    return build


def recipes(log: list, a_args=("1",), fail=False) -> dict:
    return {"a": st.Recipe("a", writer(log, fail), args=a_args),
            "b": st.Recipe("b", writer(log), inputs=("a",), args=("2",))}


def test_key_covers_code_inputs_and_versions(tmp_path, monkeypatch):
    log = []
    base = st.Store(tmp_path, recipes(log), code="c1")
    assert base.key("b") == st.Store(tmp_path, recipes(log), code="c1").key("b")  # the same inputs, the same key
    assert base.key("a") != st.Store(tmp_path, recipes(log), code="c2").key("a")  # new code
    # a changed input changes every entry built from it
    assert base.key("b") != st.Store(tmp_path, recipes(log, a_args=("9",)), code="c1").key("b")
    monkeypatch.setattr(st, "library_versions", lambda: {"onnxruntime": "9.9"})
    assert base.key("a") != st.Store(tmp_path, recipes(log), code="c1").key("a")  # another library version


def test_code_digest_sees_every_source_file(tmp_path):
    src = tmp_path / "src"
    for d in st.CODE_DIRS:
        shutil.copytree(st.ROOT / d, src / d, ignore=shutil.ignore_patterns("__pycache__"))
    before = st.code_digest(src)
    assert before == st.code_digest(st.ROOT)
    for changed in (src / "runtime" / "cache.py", src / "calib" / "quantize.py", src / "cli" / "main.py"):
        changed.write_text(changed.read_text() + "\n# one more line\n")
        after = st.code_digest(src)
        assert after != before, changed
        before = after
    (src / "export" / "new_module.py").write_text("X = 1\n")  # a new file counts too
    assert st.code_digest(src) != before


def test_a_miss_builds_once_and_new_code_rebuilds(tmp_path):
    log = []
    s = st.Store(tmp_path, recipes(log), code="c1")
    b = s.get("b")
    assert (b / "data").read_text() == "xx" and len(log) == 2
    assert s.get("b") == b and len(log) == 2  # a hit builds nothing
    s2 = st.Store(tmp_path, recipes(log), code="c2")
    assert s2.get("b") != b and len(log) == 4  # new code: both rebuilt, never the old entries


def test_an_entry_changed_after_publishing_is_rebuilt(tmp_path):
    log = []
    s = st.Store(tmp_path, recipes(log), code="c1")
    a = s.get("a")
    (a / "data").write_text("written by a test")
    assert (s.get("a") / "data").read_text() == "x" and len(log) == 2
    (a / "extra").write_text("a new file")
    s.get("a")
    assert len(log) == 3 and not (a / "extra").exists()


def test_a_failed_build_publishes_nothing(tmp_path):
    log = []
    s = st.Store(tmp_path, recipes(log, fail=True), code="c1")
    with pytest.raises(RuntimeError, match="half way"):
        s.get("a")
    assert not s.path("a").exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_concurrent_builders_build_once(tmp_path):
    log = []
    s = st.Store(tmp_path, recipes(log), code="c1")
    got = []
    threads = [threading.Thread(target=lambda: got.append(st.Store(tmp_path, recipes(log), code="c1").get("b")))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 1 and len(got) == 4 and len(log) == 2 and got[0] == s.path("b")


def test_each_name_keeps_its_two_latest_entries_and_any_in_use(tmp_path, monkeypatch):
    log = []
    paths = [st.Store(tmp_path, recipes(log), code=f"c{i}").get("a") for i in range(4)]
    assert len(list(tmp_path.glob("a-*"))) == 4  # all used within the hour: another run may be reading them
    monkeypatch.setattr(st, "IN_USE_S", 0)
    paths.append(st.Store(tmp_path, recipes(log), code="c4").get("a"))  # a build evicts
    assert sorted(p.name for p in tmp_path.glob("a-*")) == sorted(p.name for p in paths[-2:])
