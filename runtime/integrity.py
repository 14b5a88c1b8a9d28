"""Do the files of an artifact still match the sha256 its manifest recorded?

A runtime must refuse weights that changed after export (they would run and print garbage), but hashing
14 GB at every start of a 7B model takes a minute. So a file is hashed in full once; its identity at that
moment (device, inode, size, mtime and ctime in nanoseconds) is then remembered with the hash in a small
record under the user's cache folder, and a later start whose file has the same identity skips the hash.
Any write to the file changes its mtime and ctime (ctime cannot be set back by a user: `touch -d` sets
mtime and bumps ctime), a copy is a new inode, so a changed file is always hashed again. Renaming the
export folder changes none of them, so the record survives publishing.

    check_files(folder, {"model.onnx": "9f2c..."})              # hashes on first use, then remembers
    check_files(folder, {"model.onnx": "9f2c..."}, full=True)   # `verify`: always hashes

Records live in $MISTRAL_TRT_CACHE, else $XDG_CACHE_HOME/mistral-trt, else ~/.cache/mistral-trt, one file
per (file identity) named by a hash of that identity; where that folder is not writable every start
hashes in full.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from .errors import UserError

ANNOUNCE_BYTES = 1 << 30  # say so before hashing a file this large (a 7B model: ~30 s per 14 GB)


def sha256(path: str | Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    if os.environ.get("MISTRAL_TRT_CACHE"):
        return Path(os.environ["MISTRAL_TRT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mistral-trt"


def _identity(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _record(st: os.stat_result) -> Path:
    return cache_dir() / "sha256" / hashlib.sha256(_identity(st).encode()).hexdigest()[:40]


def _remembered(st: os.stat_result) -> str | None:
    try:
        return _record(st).read_text().strip()
    except OSError:
        return None


def _remember(st: os.stat_result, digest: str) -> None:
    rec = _record(st)
    try:
        rec.parent.mkdir(parents=True, exist_ok=True)
        tmp = rec.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(digest + "\n")
        tmp.replace(rec)
    except OSError:
        pass  # not writable: the next start hashes again, nothing worse


def hash_file(path: str | Path) -> str:
    """sha256 of a file just written, remembered so that the first load does not hash it again."""
    st = os.stat(path)
    digest = sha256(path)
    if os.stat(path).st_mtime_ns == st.st_mtime_ns:
        _remember(st, digest)
    return digest


def check_files(folder: str | Path, files: dict[str, str], full: bool = False, where: str = "manifest.json") -> None:
    """Raise UserError naming the first file that is missing or whose sha256 differs from `files`."""
    folder = Path(folder)
    for name, want in files.items():
        path = folder / name
        try:
            st = path.stat()
        except OSError:
            raise UserError(f"{path}: missing (listed in {where}); the artifact is incomplete") from None
        if not full and _remembered(st) == want:
            continue
        if st.st_size >= ANNOUNCE_BYTES:
            print(f"checking the sha256 of {path} ({st.st_size / 1e9:.1f} GB) against {where}; later starts "
                  "skip this while the file is unchanged", file=sys.stderr, flush=True)
        got = sha256(path)
        if got != want:
            raise UserError(f"{path}: sha256 {got[:16]}... differs from {where}'s {str(want)[:16]}...: the file was "
                            "changed or replaced after export; export it again")
        if path.stat().st_mtime_ns == st.st_mtime_ns:  # unchanged while we read it
            _remember(st, got)
