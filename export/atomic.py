"""Publishing output folders: never half-written, never over something a user owns.

    with atomic_folder(out, kind="export", force=force, inputs=[checkpoint]) as tmp:
        write everything into tmp
    # out now holds the finished folder; after an error, SIGINT or SIGTERM nothing is left behind

The rules, each because of a way data was lost before:

* OUT is built as a temporary folder `.OUT.tmp-*` beside it and published with one rename, so a reader
  sees the old folder or the new one, never half of either.
* One mistral-trt process writes OUT at a time: the lock file `.OUT.lock` beside it (flock; the kernel
  drops it when the process dies, however it dies). A second writer stops at once with one line.
* Without --force nothing is ever replaced: the rename is `renameat2(RENAME_NOREPLACE)`, so a folder that
  appeared at OUT during the run (another tool, the user) is kept and this run's result is discarded.
* --force replaces OUT only when it is a folder mistral-trt wrote, of the same kind (an export's manifest,
  an engine's engine.json, ...), that holds nothing else, and that is not (and does not hold) one of the
  command's inputs. It is checked before the work starts and again at the swap: `RENAME_EXCHANGE` swaps
  the new folder in, and the folder actually swapped out is checked once more before it is deleted (if it
  changed in between, the swap is undone and nothing is deleted).
* A run killed without a chance to clean up (SIGKILL, power loss) leaves its temporary folder behind; it
  carries a marker file, and the next run on the same OUT, holding the lock (so no live process owns it),
  removes it and says so.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from mistral_trt.runtime.errors import UserError, check_interrupted

PARTIAL_MARKER = ".mistral-trt-partial"  # inside a temporary folder until it is published
KIND_WORDS = {"export": "an earlier export", "engine": "an earlier engine build",
              "calibration": "an earlier calibration set", "checkpoint": "an earlier GGUF conversion",
              "triton-repo": "an earlier Triton model repository"}
# Written into an export folder by the runtime itself, not by `export` (onnxruntime's TensorRT EP caches).
RUNTIME_WRITTEN = ("ort-trt-cache",)
CONVERSION_NAME = "conversion.json"  # what convert-gguf writes beside the checkpoint it made
TRITON_REPO_NAME = "mistral-trt-repo.json"  # what triton-repo writes at the top of a model repository


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- what is ours ----------------------------------------------------------------------------------
def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _names(value) -> set[str]:
    if isinstance(value, dict):
        value = list(value)
    return {v for v in value if isinstance(v, str)} if isinstance(value, list) else set()


def owned_entries(folder: Path, kind: str) -> set[str] | str:
    """The top-level names a folder of `kind` written by mistral-trt holds, or why `folder` is not one."""
    if kind == "export":
        raw = _json(folder / "manifest.json")
        if not (isinstance(raw, dict) and isinstance(raw.get("versions"), dict) and "mistral_trt" in raw["versions"]
                and "model" in raw and "files" in raw):
            return "it is not an export folder written by mistral-trt (no export manifest.json)"
        return ({"manifest.json", "quantization.json", *RUNTIME_WRITTEN} | _names(raw.get("files"))
                | _names(raw.get("tokenizer_files")))
    if kind == "engine":
        raw = _json(folder / "engine.json")
        if not (isinstance(raw, dict) and "engine_sha256" in raw and "tensorrt_version" in raw):
            return "it is not an engine folder written by `mistral-trt engine` (no engine.json)"
        m = _json(folder / "manifest.json")
        m = m if isinstance(m, dict) else {}
        return {"engine.json", "manifest.json", "model.engine", "timing.cache"} | _names(m.get("tokenizer_files")) \
            | _names(m.get("files")) - {"model.onnx", "model.onnx.data"}
    if kind == "calibration":
        raw = _json(folder / "manifest.json")
        if not (isinstance(raw, dict) and {"sha256", "count", "eval"} <= set(raw)):
            return "it is not a calibration folder written by `mistral-trt calibrate`"
        return {"manifest.json", "calib.npz", "eval.txt", "eval_chat.npz"}
    if kind == "checkpoint":
        raw = _json(folder / CONVERSION_NAME)
        if not (isinstance(raw, dict) and raw.get("converted_by") == "mistral-trt convert-gguf"):
            return f"it is not a checkpoint written by `mistral-trt convert-gguf` (no {CONVERSION_NAME})"
        return {CONVERSION_NAME} | _names(raw.get("files"))
    if kind == "triton-repo":
        raw = _json(folder / TRITON_REPO_NAME)
        if not (isinstance(raw, dict) and raw.get("written_by") == "mistral-trt triton-repo"):
            return f"it is not a model repository written by `mistral-trt triton-repo` (no {TRITON_REPO_NAME})"
        return {TRITON_REPO_NAME} | _names(raw.get("models"))
    raise ValueError(f"unknown output kind {kind!r}")


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_target(out: str | Path, kind: str, force: bool = False, inputs=()) -> Path:
    """Refuse an output path that would lose data, before any work. Returns OUT as an absolute path."""
    out = Path(out).expanduser().absolute()
    if out.is_symlink():
        raise UserError(f"{out}: is a symbolic link; give the folder it points to, or another -o")
    real = out.resolve()
    for inp in inputs:
        if inp is not None and _inside(Path(inp).expanduser().resolve(), real):
            raise UserError(f"{out}: is (or holds) this command's input {inp}; choose another -o")
    if not out.exists():
        return out
    if not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another -o")
    if not force:
        raise UserError(f"{out}: already exists (pass --force to replace it)")
    owned = owned_entries(out, kind)
    if isinstance(owned, str):
        raise UserError(f"{out}: --force only replaces a folder mistral-trt wrote ({KIND_WORDS[kind]}), and {owned}; "
                        "nothing was changed")
    extra = sorted(p.name for p in out.iterdir() if p.name not in owned)
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise UserError(f"{out}: holds files mistral-trt did not write ({shown}); --force will not delete them: "
                        "move them out or choose another -o")
    return out


# -- renames that cannot replace by accident -------------------------------------------------------
_AT_FDCWD, _RENAME_NOREPLACE, _RENAME_EXCHANGE = -100, 1, 2


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """True when done; False when this kernel/file system has no renameat2 (caller falls back)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    e = ctypes.get_errno()
    if e in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(e, os.strerror(e), str(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename, failing with FileExistsError if dst exists (atomically where the kernel allows)."""
    if not _renameat2(src, dst, _RENAME_NOREPLACE):
        if os.path.lexists(dst):  # fallback: only other mistral-trt processes are excluded (by the lock)
            raise FileExistsError(errno.EEXIST, "File exists", str(dst))
        os.rename(src, dst)


def exchange(a: Path, b: Path) -> None:
    """Swap two paths (atomically where the kernel allows)."""
    if not _renameat2(a, b, _RENAME_EXCHANGE):
        aside = a.with_name(a.name + ".swap")
        os.rename(b, aside)
        os.rename(a, b)
        os.rename(aside, a)


# -- the lock and stale temporary folders ----------------------------------------------------------
@contextmanager
def locked(out: Path):
    """Hold `.OUT.lock` beside OUT for the duration; a second writer gets one line naming the first."""
    lock = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"{out}: another mistral-trt process (pid {holder}) is writing it; "
                            "wait for it to finish or choose another -o") from None
        try:  # the previous holder may have unlinked the file between our open and our flock
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    try:
        yield
    finally:
        try:
            os.unlink(lock)
        finally:
            os.close(fd)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def clean_stale(out: Path) -> None:
    """Remove temporary folders of earlier runs on OUT that died without cleaning up (caller holds the lock)."""
    for p in sorted(out.parent.glob(f".{out.name}.tmp-*")):
        if not p.is_dir() or p.is_symlink():
            continue
        if (p / PARTIAL_MARKER).is_file():
            mb = _size(p) / 1e6
            shutil.rmtree(p, ignore_errors=True)
            log(f"removed {p} ({mb:.0f} MB): the unfinished output of an interrupted run")
        else:
            log(f"note: {p} looks like the leftover of an interrupted run (no marker, so it is kept); "
                "delete it if you do not need it")


def _free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


@contextmanager
def atomic_folder(out: str | Path, force: bool = False, *, kind: str, inputs=(), need_bytes: int = 0):
    """Yield a temporary folder beside OUT; publish it as OUT when the body returns (module docstring).

    need_bytes: what the body will write, checked against the free space first (a 7B export fills
    14 GB; finding out at the end is too late)."""
    out = check_target(out, kind, force, inputs)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out}: output path is not writable: {e.strerror} ({e.filename or out.parent})") from None
    try:
        lock = locked(out)
        lock.__enter__()
    except PermissionError as e:
        raise UserError(f"{out}: output path is not writable: {e.strerror} ({out.parent})") from None
    tmp = None
    try:
        clean_stale(out)
        check_target(out, kind, force, inputs)  # again: the folder may have changed while we waited
        free = _free_bytes(out.parent)
        if need_bytes and need_bytes > free:
            raise UserError(f"{out}: about {_gb(need_bytes)} to write, {_gb(free)} free on its file system; "
                            "free some space or choose another -o")
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        except OSError as e:
            raise UserError(f"{out}: output path is not writable: {e.strerror} ({out.parent})") from None
        tmp.chmod(0o755)  # mkdtemp makes it private; the published folder should not be
        (tmp / PARTIAL_MARKER).write_text(f"pid {os.getpid()}\n")
        try:
            yield tmp
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise UserError(f"{out}: no space left on its file system while writing {Path(e.filename or '').name or 'it'} "
                                f"({_gb(_free_bytes(out.parent))} free now); nothing was published") from None
            raise
        check_interrupted()  # a SIGTERM whose exception was swallowed somewhere must not publish
        (tmp / PARTIAL_MARKER).unlink()
        tmp = _publish(tmp, out, kind, force, inputs)  # None, or where the replaced folder now is
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        lock.__exit__(None, None, None)


def _publish(tmp: Path, out: Path, kind: str, force: bool, inputs) -> Path | None:
    """Rename tmp to OUT. Returns None, or (with --force) the path the replaced folder was moved to."""
    try:
        rename_noreplace(tmp, out)
        return None
    except FileExistsError:
        pass
    if not force:
        raise UserError(f"{out}: appeared while this run was writing it; it was left as it is and this run's "
                        "result was discarded (pass --force to replace a folder mistral-trt wrote)")
    check_target(out, kind, force, inputs)
    exchange(tmp, out)  # now `tmp` holds what was at OUT
    try:
        check_target(tmp, kind, force, ())
    except UserError:
        exchange(tmp, out)  # undo: OUT changed between the check and the swap
        raise UserError(f"{out}: changed while this run was replacing it; it was left as it is and this run's "
                        "result was discarded") from None
    (tmp / PARTIAL_MARKER).write_text("replaced by a newer run\n")  # a kill during rmtree leaves a marked folder
    return tmp


def plotted_report_folder(out: str | Path, command: str, stem: str, key: str) -> Path:
    """check_report_folder() for a command writing STEM.md, STEM.json and STEM.png, after checking that matplotlib
    (for the PNG) is there: both before minutes of measuring, not after."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError(f"{command} draws {stem}.png with matplotlib: pip install 'mistral-trt[bench]'") from None
    return check_report_folder(out, (f"{stem}.md", f"{stem}.json", f"{stem}.png"), f"{stem}.json", key)


def check_report_folder(out: str | Path, names: tuple[str, ...], own_json: str, key: str) -> Path:
    """A report folder (`bench -o`, `eval -o`) gets the same few files on every run. Replacing them is fine
    when they are an earlier report of ours (its JSON carries `key`); a folder whose bench.md, say, is
    somebody else's is refused. Other files in the folder are never touched."""
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another -o")
    present = [n for n in names if (out / n).exists()]
    if present:
        raw = _json(out / own_json)
        if not (isinstance(raw, dict) and key in raw):
            raise UserError(f"{out}: holds {', '.join(present)} that mistral-trt did not write; they would be "
                            "overwritten: choose another -o")
    return out
