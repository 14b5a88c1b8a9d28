"""scripts/gpu_lease.py: the GPU check carried to a lent machine in parts (no network there). The parts' sizes fit
a call, a part that arrived damaged or is missing stops the run before anything installs, the joined parts give
the tar back, and the wheel set's closure is checked from the wheels' own metadata. (`prepare` downloads 400 MB;
`make gpu-lease` and the dry run, docs/tensorrt.md, exercise it.)"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_lease  # noqa: E402


def wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", "Metadata-Version: 2.1\nName: " + name + "\nVersion: " + version
                   + "\n" + "".join(f"Requires-Dist: {r}\n" for r in requires))
    return path


def test_parts_fit_a_call_and_arrive_whole(tmp_path, monkeypatch):
    lease = tmp_path / "build" / "gpu-lease"
    (tmp_path / "wheels").mkdir(parents=True)
    lease.mkdir(parents=True)
    wheel(tmp_path / "wheels", "mistral_trt", "0.1.0", [])
    (tmp_path / "wheels" / "big.bin").write_bytes(bytes(range(256)) * 3000)
    tar = tmp_path / "w.tar"
    with tarfile.open(tar, "w") as t:
        t.add(tmp_path / "wheels", arcname="wheels")
    data, size = tar.read_bytes(), 100_000
    parts = []
    for i in range(0, len(data), size):
        (lease / f"part-{i // size:02d}").write_bytes(data[i:i + size])
        parts.append({"name": f"part-{i // size:02d}", "bytes": len(data[i:i + size]),
                      "sha256": hashlib.sha256(data[i:i + size]).hexdigest()})
    (lease / "plan.json").write_text(json.dumps({"parts": parts, "tar_sha256": hashlib.sha256(data).hexdigest(),
                                                 "wheels": []}))
    monkeypatch.setattr(gpu_lease, "ROOT", tmp_path)
    calls = gpu_lease.calls(lease)
    assert len(calls) == len(parts) + 1 and calls[-1]["command"].endswith("run --out $OUT")
    assert all(c["carry"][-1].endswith("plan.json") for c in calls)
    assert gpu_lease.PART_BYTES + (1 << 20) <= 64 << 20  # a part and plan.json fit the 64 MiB a call carries
    for i in range(len(parts)):
        gpu_lease.receive(i, lease)
    got = gpu_lease.assemble(lease, tmp_path / "there")
    assert [w.name for w in got] == ["big.bin", "mistral_trt-0.1.0-py3-none-any.whl"]
    assert (tmp_path / "there" / "wheels" / "big.bin").read_bytes() == bytes(range(256)) * 3000
    damaged = bytearray((lease / "part-01").read_bytes())
    damaged[7] ^= 1
    (lease / "part-01").write_bytes(bytes(damaged))
    with pytest.raises(SystemExit, match="sha256"):
        gpu_lease.receive(1, lease)
    with pytest.raises(SystemExit, match="parts missing or damaged: part-01"):
        gpu_lease.assemble(lease, tmp_path / "again")
    (lease / "part-02").unlink()
    with pytest.raises(SystemExit, match="part-01, part-02"):
        gpu_lease.assemble(lease, tmp_path / "again")


def test_closure_checked_from_the_wheels_metadata(tmp_path, monkeypatch):
    """A requirement no wheel of the set satisfies (by name and version, markers evaluated for CPython 3.12 on Linux)
    and the machine does not have is named; the machine's own packages (torch, onnx, ...) need not travel."""
    monkeypatch.setattr(gpu_lease, "INSTALL", ["mistral-trt", "gguf"])
    w = [wheel(tmp_path, "mistral_trt", "0.1.0", ["numpy>=1.26", "llguidance>=1.9,<2", "pywin32; sys_platform == 'win32'"]),
         wheel(tmp_path, "llguidance", "1.9.1", ["pydantic"]),
         wheel(tmp_path, "gguf", "0.19.0", ["numpy", "pyyaml", "tqdm"])]
    assert gpu_lease.unmet(w) == ["llguidance-1.9.1-py3-none-any.whl needs pydantic"]
    w.append(wheel(tmp_path, "pydantic", "2.14.4", []))
    assert gpu_lease.unmet(w) == []
    w[1] = wheel(tmp_path, "llguidance", "1.6.1", [])
    assert gpu_lease.unmet(w) == ["mistral_trt-0.1.0-py3-none-any.whl needs llguidance<2,>=1.9"]


def test_gpu_check_names_its_options():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--budget" in r.stdout and "--device" in r.stdout
