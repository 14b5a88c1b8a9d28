"""`mistral-trt triton-serve REPO`: NVIDIA Triton Inference Server on a model repository that `triton-repo`
wrote (export/triton.py; the model itself is serve/triton_model.py; docs/triton.md).

    mistral-trt triton-serve REPO [--http-port 8000] [--grpc-port 8001] [--metrics-port 8002]

It runs the tritonserver on PATH (NVIDIA's containers have one) or else the one bundled in the
nvidia-pytriton wheel (`pip install 'mistral-trt[triton]'`): it prepares that distribution as pytriton itself
does (the python backend stub for this interpreter's version beside libtriton_python.so), points the stub at
this interpreter's libpython and import path, and forwards SIGTERM/SIGINT to the server as SIGTERM.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

from mistral_trt.runtime.errors import UserError

# -- the server -------------------------------------------------------------------------------------------
def _bundled(workdir: Path) -> tuple[Path, Path, Path]:
    """tritonserver, a backend folder with the python backend stub for this interpreter, and the wheel's shared
    libraries (the stub, once copied, no longer finds them by its own rpath), from nvidia-pytriton."""
    try:
        import pytriton
    except ImportError:
        raise UserError("triton-serve: no tritonserver on PATH and nvidia-pytriton is not installed: "
                        "pip install 'mistral-trt[triton]' (or run in NVIDIA's tritonserver container)") from None
    dist = Path(pytriton.__file__).parent / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise UserError(f"triton-serve: nvidia-pytriton has no python backend stub for Python {version}")
    backends = workdir / "backends"
    if not (backends / "python" / "triton_python_backend_stub").is_file():
        shutil.rmtree(backends, ignore_errors=True)
        shutil.copytree(dist / "backends", backends)
        shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
    return dist / "bin" / "tritonserver", backends, dist.parent.parent / "nvidia_pytriton.libs"


def server_command(repo: Path, host: str, http_port: int, grpc_port: int, metrics_port: int, workdir: Path,
                   log_verbose: int = 0) -> tuple[list[str], dict]:
    on_path = shutil.which("tritonserver")
    env = dict(os.environ)
    if on_path:
        binary, extra = on_path, []
    else:
        binary, backends, libs = _bundled(workdir)
        extra = [f"--backend-directory={backends}"]
        # The stub embeds libpython: make it this interpreter's (not another one on the system). An embedded
        # Python finds its prefix from "python3" on PATH, so this interpreter's bin folder first: its site folders
        # (a venv's, with their .pth files: an editable install is one) are where mistral-trt is.
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
        env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    cmd = [str(binary), f"--model-repository={repo}", f"--http-address={host}", f"--http-port={http_port}",
           f"--grpc-address={host}", f"--grpc-port={grpc_port}", f"--metrics-address={host}",
           f"--metrics-port={metrics_port}", "--allow-metrics=true", "--allow-cpu-metrics=true",
           "--allow-gpu-metrics=false", f"--log-verbose={log_verbose}", "--exit-on-error=true", *extra]
    return cmd, env


def serve_repo(repo: str | Path, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 8001,
               metrics_port: int = 8002, log_verbose: int = 0) -> int:
    repo = Path(repo).resolve()
    models = sorted(p for p in repo.iterdir() if (p / "config.pbtxt").is_file()) if repo.is_dir() else []
    if not models:
        raise UserError(f"{repo}: not a Triton model repository (no MODEL/config.pbtxt in it); "
                        "write one with `mistral-trt triton-repo EXPORT_DIR -o REPO`")
    ports = [http_port, grpc_port, metrics_port]
    if len(set(ports)) != 3:
        raise UserError(f"--http-port, --grpc-port and --metrics-port must differ, got {ports}")
    workdir = Path(os.environ.get("MISTRAL_TRT_CACHE") or Path.home() / ".cache" / "mistral-trt") / "tritonserver"
    workdir.mkdir(parents=True, exist_ok=True)
    cmd, env = server_command(repo, host, http_port, grpc_port, metrics_port, workdir, log_verbose)
    print(f"starting {cmd[0]} on {repo} ({', '.join(p.name for p in models)}): http {host}:{http_port}, grpc "
          f"{host}:{grpc_port}, metrics {host}:{metrics_port}", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, env=env)
    stopping = []

    def forward(signum, frame):  # tritonserver stops cleanly on SIGTERM (SIGINT may not, after a model error)
        stopping.append(signum)
        proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                rc = proc.wait()
                break
            except KeyboardInterrupt:  # a second Ctrl-C while waiting
                proc.send_signal(signal.SIGTERM)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if stopping:
        return 0  # a requested stop is not a failure
    if rc:
        raise UserError(f"tritonserver exited with status {rc} (its log above says why)")
    return 0
