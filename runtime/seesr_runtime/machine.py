"""What this machine is, without importing any inference engine: the CPU's model and features, NVIDIA GPUs
(through nvidia-smi), free memory and disk. Read by ``seesr doctor`` and recorded by ``seesr bench``."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

CPUINFO = Path("/proc/cpuinfo")
# The CPU features the engines' speed depends on: report name -> the /proc/cpuinfo flags that give it.
FEATURES = {
    "avx512": ("avx512f",),
    "avx512_bf16": ("avx512_bf16",),
    "amx": ("amx_bf16", "amx_int8", "amx_tile"),
    "vnni": ("avx512_vnni", "avx_vnni"),
}
FLAGS = tuple(flag for flags in FEATURES.values() for flag in flags)
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # units that multiply bf16 natively


def cpu_model(cpuinfo: Path = CPUINFO) -> str:
    try:
        with open(cpuinfo) as lines:
            for line in lines:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str] | None:
    """The first CPU's flags in /proc/cpuinfo; None where there is no such file (not Linux)."""
    try:
        with open(cpuinfo) as lines:
            for line in lines:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        return None
    return frozenset()  # a Linux without x86 flags (e.g. ARM's "Features"): none of FLAGS


def cpu_features(flags: frozenset[str] | None) -> dict[str, bool] | None:
    """FEATURES name -> whether any of its flags is set; None where the flags are unknown."""
    if flags is None:
        return None
    return {name: any(flag in flags for flag in wanted) for name, wanted in FEATURES.items()}


def has_bf16_units(flags: frozenset[str] | None) -> bool | None:
    """Whether the CPU multiplies bf16 natively (AVX512_BF16 or AMX); None where the flags are unknown."""
    return None if flags is None else any(flag in flags for flag in BF16_FLAGS)


def nvidia_smi(*query: str) -> list[str]:
    """nvidia-smi's CSV rows for ``query`` (no header, no units); [] without nvidia-smi or a working driver."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", *query, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def nvidia_gpus() -> list[dict[str, Any]]:
    """Each NVIDIA GPU nvidia-smi lists: name, total and free memory in MiB."""
    gpus = []
    for row in nvidia_smi("--query-gpu=name,memory.total,memory.free"):
        name, total, free = (field.strip() for field in row.rsplit(",", 2))
        gpus.append({"name": name, "memory_total_mb": _number(total), "memory_free_mb": _number(free)})
    return gpus


def _number(text: str) -> int | None:
    try:
        return int(float(text))
    except ValueError:  # "[N/A]"
        return None


def gpu_name() -> str | None:
    names = nvidia_smi("--query-gpu=name")
    return names[0] if names else None


def available_memory_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """MemAvailable (what can be allocated without swapping); None where the kernel does not say."""
    try:
        with open(meminfo) as lines:
            for line in lines:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def total_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def free_disk_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free
