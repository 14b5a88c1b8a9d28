"""Atomic output folders: build in a temporary folder beside the target, rename when complete.

    with atomic_folder(out, force) as tmp:
        write everything into tmp
    # out now holds the finished folder; after an error nothing is left behind
"""
from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from mistral_trt.runtime.errors import UserError


@contextmanager
def atomic_folder(out: str | Path, force: bool = False):
    out = Path(out).expanduser().absolute()
    if out.exists() and not force:
        raise UserError(f"{out}: already exists (pass --force to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise UserError(f"{out}: output path is not writable: {e.strerror} ({e.filename or out.parent})") from None
    tmp.chmod(0o755)  # mkdtemp makes it private; the published folder should not be
    try:
        yield tmp
        old = None
        if out.exists():  # --force: move the old folder aside first, remove it last
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.replace(old / "x")
        tmp.replace(out)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
