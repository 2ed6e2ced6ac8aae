"""benchmarks/gpu_carry.sh's receive and assemble, the half that runs on the GPU machine: parts transferred one at
a time are kept outside the tree, joined and unpacked into an importable site folder. (``pack`` downloads wheels,
so it is exercised when a GPU run is prepared, not here.)"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_carry.sh"

pytestmark = pytest.mark.skipif(shutil.which("xz") is None, reason="gpu_carry.sh needs xz (apt-get install xz-utils)")


def _parts(site_files: dict[str, str], part_size: int) -> list[bytes]:
    """The xz tar of ``site_files`` split as `split -b` does."""
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for name, text in site_files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    packed = subprocess.run(["xz", "-c"], input=archive.getvalue(), capture_output=True, check=True).stdout
    return [packed[i : i + part_size] for i in range(0, len(packed), part_size)]


def _call(tmp_path: Path, carried: dict[str, bytes], command: str) -> subprocess.CompletedProcess:
    """One device call: a fresh copy of the tree holding only what the call carries, then ``command``."""
    tree = tmp_path / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    (tree / "benchmarks").mkdir(parents=True)
    shutil.copy(SCRIPT, tree / "benchmarks")
    for name, data in carried.items():
        (tree / ".gpu-carry").mkdir(exist_ok=True)
        (tree / ".gpu-carry" / name).write_bytes(data)
    env = {**os.environ, "SEESR_CARRY_DIR": str(tmp_path / "there"), "PYTHON": sys.executable}
    script = ["bash", "benchmarks/gpu_carry.sh", command]
    return subprocess.run(script, cwd=tree, env=env, capture_output=True, text=True)


def test_parts_carried_one_per_call_assemble_into_an_importable_site(tmp_path):
    module = "carried_module_probe"
    padding = os.urandom(600).hex()  # incompressible: the archive spans several parts
    parts = _parts({f"{module}/__init__.py": f"ANSWER = 42\nPADDING = '{padding}'\n"}, part_size=300)
    assert len(parts) >= 2
    for k, part in enumerate(parts):
        received = _call(tmp_path, {f"part-{k:02d}": part}, "receive")
        assert received.returncode == 0, received.stderr
        assert f"have {k + 1} parts" in received.stdout
    assembled = _call(tmp_path, {}, "assemble")
    assert assembled.returncode == 0, assembled.stderr
    site = tmp_path / "there" / "site"
    assert f"export PYTHONPATH={site}" in assembled.stdout
    assert "onnxruntime" in assembled.stdout  # the import check ran with the assembled site first on the path
    probe = subprocess.run(
        [sys.executable, "-c", f"import {module}; print({module}.ANSWER)"],
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
    )
    assert probe.stdout.strip() == "42", probe.stderr


def test_a_call_without_a_part_or_parts_is_refused(tmp_path):
    received = _call(tmp_path, {}, "receive")
    assert received.returncode == 2 and "no .gpu-carry/part-*" in received.stderr
    assembled = _call(tmp_path, {}, "assemble")
    assert assembled.returncode == 2 and "no parts received" in assembled.stderr
    usage = _call(tmp_path, {}, "unpack")
    assert usage.returncode == 2 and "gpu_carry.sh pack" in usage.stderr
