"""Nothing a user owns is deleted or overwritten, nothing half-written is published (export/atomic.py).

Each test is a way data was lost before: --force over any folder or the input itself, a publish that
replaced what appeared meanwhile, two writers, SIGKILL/SIGTERM leftovers, a full disk."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cli, tree_state
from mistral_trt.export import atomic, pipeline
from mistral_trt.export.atomic import atomic_folder
from mistral_trt.runtime import UserError


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_force_refuses_a_folder_that_is_not_an_export(tiny_full, tmp_path, capsys):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.txt").write_text("three years of work")
    before = tree_state(thesis)
    rc, _, err = cli(capsys, "export", tiny_full, "-o", thesis, "--force", "--no-verify")
    assert rc == 2 and "--force only replaces a folder mistral-trt wrote (an earlier export)" in err
    assert tree_state(thesis) == before and leftovers(tmp_path) == []


def test_force_never_replaces_the_input(tiny_full, tmp_path, capsys):
    ckpt = shutil.copytree(tiny_full, tmp_path / "ckpt")
    before = tree_state(ckpt)
    rc, _, err = cli(capsys, "export", ckpt, "-o", ckpt, "--force", "--no-verify")
    assert rc == 2 and "is (or holds) this command's input" in err
    outer = tmp_path / "outer"  # OUT holding the checkpoint: replacing OUT would delete it
    shutil.copytree(ckpt, outer / "ckpt")
    rc, _, err = cli(capsys, "export", outer / "ckpt", "-o", outer, "--force", "--no-verify")
    assert rc == 2 and "is (or holds) this command's input" in err
    assert tree_state(ckpt) == before
    contents = lambda state: {k: v[0] for k, v in state.items()}  # noqa: E731  (a copy: same bytes, other inodes)
    assert contents(tree_state(outer / "ckpt")) == contents(before)


@pytest.mark.slow
def test_force_replaces_an_export_but_not_files_added_to_it(tiny_full, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(capsys, "export", tiny_full, "-o", out, "--no-verify")[0] == 0
    (out / "notes.txt").write_text("mine")
    before = tree_state(out)
    rc, _, err = cli(capsys, "export", tiny_full, "-o", out, "--no-verify", "--force")
    assert rc == 2 and "holds files mistral-trt did not write (notes.txt)" in err
    assert tree_state(out) == before
    (out / "notes.txt").unlink()
    assert cli(capsys, "export", tiny_full, "-o", out, "--no-verify", "--force")[0] == 0
    assert leftovers(tmp_path) == []


def test_force_refuses_another_kind_and_links(tiny_exports, tiny_full, tmp_path, capsys):
    calib = tmp_path / "calib"
    assert cli(capsys, "calibrate", tiny_exports["full", "fp32"], "-o", calib, "--count", "2", "--reply-tokens", "2")[0] == 0
    before = tree_state(calib)
    rc, _, err = cli(capsys, "export", tiny_full, "-o", calib, "--force", "--no-verify")
    assert rc == 2 and "not an export folder" in err and tree_state(calib) == before
    link = tmp_path / "link"
    link.symlink_to(calib)
    rc, _, err = cli(capsys, "calibrate", tiny_exports["full", "fp32"], "-o", link, "--force", "--count", "2")
    assert rc == 2 and "is a symbolic link" in err and tree_state(calib) == before
    afile = tmp_path / "afile"
    afile.write_text("x")
    rc, _, err = cli(capsys, "export", tiny_full, "-o", afile, "--force", "--no-verify")
    assert rc == 2 and "exists and is not a folder" in err and afile.read_text() == "x"


def test_quantize_and_calibrate_never_replace_their_input(tiny_exports, tmp_path, capsys):
    src = shutil.copytree(tiny_exports["full", "fp32"], tmp_path / "src")
    before = tree_state(src)
    rc, _, err = cli(capsys, "quantize", src, "--precision", "int8-w8a16", "-o", src, "--force")
    assert rc == 2 and "this command's input" in err
    rc, _, err = cli(capsys, "calibrate", src, "-o", src, "--force", "--count", "2")
    assert rc == 2 and "this command's input" in err
    assert tree_state(src) == before


@pytest.mark.slow
def test_folder_created_during_the_export_is_kept(tiny_full, tmp_path, monkeypatch, capsys):
    """Without --force the publish is a rename that cannot replace: what appeared at OUT meanwhile stays."""
    out = tmp_path / "out"
    real = pipeline._write_manifest

    def meanwhile(*a, **k):
        out.mkdir()
        (out / "users.txt").write_text("created while the export ran")
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "_write_manifest", meanwhile)
    rc, _, err = cli(capsys, "export", tiny_full, "-o", out, "--no-verify")
    assert rc == 2 and "appeared while this run was writing it" in err
    assert sorted(p.name for p in out.iterdir()) == ["users.txt"] and leftovers(tmp_path) == []


@pytest.mark.slow
def test_force_swap_checks_the_folder_it_replaces(tiny_full, tmp_path, monkeypatch, capsys):
    """--force: a file dropped into the old export during the run makes it not ours any more: kept, swap undone."""
    out = tmp_path / "out"
    assert cli(capsys, "export", tiny_full, "-o", out, "--no-verify")[0] == 0
    real = pipeline._write_manifest

    def meanwhile(*a, **k):
        (out / "added-later.txt").write_text("mine")
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "_write_manifest", meanwhile)
    old_manifest = (out / "manifest.json").read_bytes()
    rc, _, err = cli(capsys, "export", tiny_full, "-o", out, "--no-verify", "--force")
    assert rc == 2 and "added-later.txt" in err
    assert (out / "added-later.txt").read_text() == "mine" and (out / "manifest.json").read_bytes() == old_manifest
    assert leftovers(tmp_path) == []


def test_swap_is_undone_when_the_replaced_folder_changed_at_the_last_moment(tmp_path, monkeypatch):
    """The folder actually swapped out is checked after the atomic exchange; if it is not ours, it goes back."""
    out = tmp_path / "cal"
    with atomic_folder(out, kind="calibration") as tmp:
        for name, text in (("manifest.json", json.dumps({"sha256": "x", "count": 1, "eval": {}})), ("eval.txt", "e")):
            (tmp / name).write_text(text)
    real_exchange = atomic.exchange

    def exchange_after_user_write(a, b):
        (b / "late.txt").write_text("written between the check and the swap")
        real_exchange(a, b)

    monkeypatch.setattr(atomic, "exchange", exchange_after_user_write)
    with pytest.raises(UserError, match="changed while this run was replacing it"):
        with atomic_folder(out, force=True, kind="calibration") as tmp:
            (tmp / "manifest.json").write_text(json.dumps({"sha256": "y", "count": 1, "eval": {}}))
    assert (out / "late.txt").is_file() and json.loads((out / "manifest.json").read_text())["sha256"] == "x"
    assert leftovers(tmp_path) == []


def _slow_export(ckpt: Path, out: Path, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mistral_trt.main", "export", str(ckpt), "-o", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while not cond():
        assert proc.poll() is None, f"exited early: {proc.communicate()}"
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_second_writer_is_refused_at_once(tiny_full, tmp_path, capsys):
    out = tmp_path / "out"
    first = _slow_export(tiny_full, out)  # with verification: several seconds under the lock
    try:
        _wait_for(lambda: (tmp_path / ".out.lock").exists() and list(tmp_path.glob(".out.tmp-*")), first)
        rc, _, err = cli(capsys, "export", tiny_full, "-o", out, "--no-verify")
        assert rc == 2 and f"another mistral-trt process (pid {first.pid}) is writing it" in err
    finally:
        first.wait(timeout=300)
    assert first.returncode == 0, first.stderr.read()
    assert (out / "manifest.json").is_file() and leftovers(tmp_path) == []


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
@pytest.mark.slow
def test_killed_export_leaves_nothing_or_the_next_run_cleans_it(tiny_full, tmp_path, sig):
    out = tmp_path / "out"
    proc = _slow_export(tiny_full, out)
    _wait_for(lambda: any((p / "model.onnx").exists() for p in tmp_path.glob(".out.tmp-*")), proc)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    if sig == signal.SIGTERM:  # handled like Ctrl-C: unwinds, removes its temporary folder, exit 128 + 15
        assert proc.returncode == 143, proc.stderr.read()
        assert leftovers(tmp_path) == [] and not out.exists()
        return
    stale = list(tmp_path.glob(".out.tmp-*"))
    assert stale and not out.exists()  # SIGKILL: no chance to clean up
    r = subprocess.run([sys.executable, "-m", "mistral_trt.main", "export", str(tiny_full), "-o", str(out), "--no-verify"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"removed {stale[0]}" in r.stderr and "unfinished output of an interrupted run" in r.stderr
    assert leftovers(tmp_path) == [] and (out / "manifest.json").is_file()


@pytest.fixture
def small_disk(tmp_path):
    """A real 24 MB file system (tmpfs): needs root, which CI has."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_not_enough_disk_is_refused_before_the_work(tiny_full, small_disk, capsys):
    rc, _, err = cli(capsys, "export", tiny_full, "-o", small_disk / "out", "--no-verify")
    assert rc == 2 and "MB to write" in err and "free on its file system" in err
    assert list(small_disk.iterdir()) == []


@pytest.mark.slow
def test_disk_full_during_the_export(tiny_full, small_disk, monkeypatch, capsys):
    """The up-front estimate disabled: the disk really fills while the graph is written."""
    monkeypatch.setattr(pipeline, "output_bytes", lambda c, dtype: 0)
    (small_disk / "filler").write_bytes(b"\0" * (20 << 20))  # 4 MB left, the export needs ~17 MB
    rc, _, err = cli(capsys, "export", tiny_full, "-o", small_disk / "out", "--no-verify")
    assert rc == 2 and "no space left on its file system" in err and "nothing was published" in err
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]
