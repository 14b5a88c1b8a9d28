"""Every snippet in the README runs as written, in order, as a reader would run them after `make setup` (the venv's
bin on PATH): shell blocks in bash from the repository root, Python blocks in the venv's python.

A fence's words after the language say how the block runs:
  (none)   run; it must exit 0;
  server   started in the background; the blocks after it run while it answers /health; then SIGTERM, exit 0;
  7b       the Mistral-7B road: run in a scratch folder with M set to a tiny random Mistral that carries the real v1
           tokenizer (the blocks after it run there too);
  network  needs Hugging Face or PyPI, gpu needs an NVIDIA GPU: not run here, and said so; each `mistral-trt` line
           in them is parsed by the command's own parser and each pip extra named must exist.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```$", re.M | re.S)
NOT_HERE = {"network": "needs the network (Hugging Face, PyPI)", "gpu": "needs an NVIDIA GPU"}
PORT = 8000  # the README's own address


def blocks() -> list[tuple[str, set[str], str, int]]:
    """(language, tags, code, line) of every fenced block of the README, in order."""
    text = (ROOT / "README.md").read_text()
    return [(m[1], set(m[2].split()), m[3], text.count("\n", 0, m.start()) + 1) for m in FENCE.finditer(text)]


def test_readme_is_short_and_every_block_is_known():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 180
    for lang, tags, _, line in blocks():
        assert lang in ("bash", "python"), f"README line {line}: a ```{lang} block: say how it runs"
        assert tags <= {"server", "7b", *NOT_HERE}, f"README line {line}: unknown tags {tags}"


def check_not_run(code: str, line: int, env: dict) -> None:
    """What can be checked without the network or a GPU: our command lines parse, the extras exist."""
    from mistral_trt.main import parser

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    for cmd in re.sub(r"\\\n", " ", code).splitlines():
        argv = shlex.split(os.path.expandvars(cmd.split(" #")[0].replace('"$M"', env["M"])))
        if argv[:1] == ["mistral-trt"]:
            try:
                parser().parse_args(argv[1:])
            except SystemExit as e:
                pytest.fail(f"README line {line}: {cmd!r} does not parse ({e.code})")
        for extra in re.findall(r"\[([\w,-]+)\]", cmd) if argv[:2] == ["pip", "install"] else []:
            assert set(extra.split(",")) <= extras, f"README line {line}: no extra {extra} in pyproject.toml"


def wait_healthy(proc: subprocess.Popen, line: int) -> None:
    t0 = time.time()
    while time.time() - t0 < 300:
        assert proc.poll() is None, f"README line {line}: the server exited {proc.returncode}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"README line {line}: the server did not answer /health in 300 s")


def server_pid(group: int) -> int:
    """The `mistral-trt serve` process in the block's process group (bash, maybe make, then the server)."""
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and os.getpgid(int(p.name)) == group:
                argv = (p / "cmdline").read_bytes().split(b"\0")
                if b"serve" in argv and any(a.endswith(b"mistral-trt") for a in argv[:2]):
                    return int(p.name)
        except (OSError, ProcessLookupError):
            continue
    pytest.fail(f"no mistral-trt serve process in group {group}")


def stop(proc: subprocess.Popen, line: int) -> None:
    """SIGTERM to the server, as an operator sends it: it drains and exits 0, and so do make and bash around it."""
    os.kill(server_pid(proc.pid), signal.SIGTERM)
    rc = proc.wait(timeout=120)
    proc.log.seek(0)
    assert rc == 0, f"README line {line}: the server exited {rc} on SIGTERM\n{proc.log.read()[-2000:]}"


@pytest.mark.slow
def test_readme_runs_as_written(demo_onnx, demo_fused, tiny_full, tmp_path, capsys):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "M": str(tiny_full)}
    cwd, server, not_run, ran = ROOT, None, [], 0
    try:
        for lang, tags, code, line in blocks():
            if tags & set(NOT_HERE):
                check_not_run(code, line, env)
                not_run.append(f"README line {line}: {', '.join(NOT_HERE[t] for t in tags & set(NOT_HERE))}")
                continue
            if "7b" in tags and cwd == ROOT:
                cwd = tmp_path / "7b"
                cwd.mkdir()
            if "server" in tags:
                if server:
                    stop(*server)
                log = open(tmp_path / f"server-{line}.log", "w+")  # a file: a pipe nobody reads would fill and block
                proc = subprocess.Popen(["bash", "-c", code], cwd=cwd, env=env, start_new_session=True,
                                        stdout=subprocess.DEVNULL, stderr=log, text=True)
                proc.log = log
                server = (proc, line)
                wait_healthy(proc, line)
            else:
                argv = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
                r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
                assert r.returncode == 0, f"README line {line}: exit {r.returncode}\n{r.stdout[-2000:]}{r.stderr[-3000:]}"
                if lang == "python":
                    assert r.stdout.strip(), f"README line {line}: printed nothing"
                if "curl" in code:
                    assert json.loads(r.stdout)["choices"][0]["message"]["content"], r.stdout
            ran += 1
    finally:
        if server and server[0].poll() is None:
            stop(*server)
    with capsys.disabled():
        print(f"\nREADME: {ran} blocks ran as written; not run here: " + "; ".join(not_run))
    assert ran >= 8 and len(not_run) == 3
