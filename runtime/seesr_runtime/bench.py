"""``seesr bench``: per-stage and end-to-end latency of a bundle on this machine (torch-free).

One workload: a synthetic LR image of ``size / 4`` pixels upscaled x4 (so
``--size 512`` is SD2's native 64x64 latent, 1024 runs four 96-latent tiles),
``warmup`` untimed images, then ``runs`` timed ones. Every stage and network
call is recorded (see ``profiling``); the result is a JSON-able dict whose
fields are documented in ``benchmarks/README.md``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import __version__, machine
from . import options as option_table
from .backends import compile_count
from .filemodes import write_atomically
from .manifest import Manifest
from .networks import NETWORK_CALL_ORDER, NetworkSpec
from .pipeline import SeeSRPipeline
from .profiling import Shapes, StageProfiler, summarize

FORMAT = "seesr-bench"
# Report order. "denoise_step" spans one whole sampler step and so overlaps the others.
STAGES = (
    "preprocess",
    "dape",
    "text_encoder",
    "vae_encoder",
    "controlnet",
    "unet",
    "scheduler_step",
    "vae_decoder",
    "postprocess",
)
STEP_STAGE = "denoise_step"
NETWORK_STAGES = NETWORK_CALL_ORDER


@dataclass
class BenchConfig:
    size: int = 512  # output side in pixels; the LR input is size/4
    steps: int = option_table.default("steps")
    runs: int = 3
    warmup: int = 1
    seed: int = 0
    guidance: float | None = None  # the bundle's default when None
    reference_steps: int = option_table.default("steps")  # e2e is also extrapolated to this many steps
    peak_tflops: float | None = None  # the device's stated peak, for the "fraction of peak" column


def synthetic_lr(size: int, seed: int = 0) -> Image.Image:
    """A deterministic LR image (gradients plus texture) of ``size/4`` pixels per side."""
    side = max(size // 4, 8)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(6.28 * (x + y))], axis=-1) * 200
    rgb += rng.normal(0, 20, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def run_bench(
    pipe: SeeSRPipeline,
    profiler: StageProfiler,
    config: BenchConfig,
    image: Image.Image | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Time ``config.warmup + config.runs`` upscales; returns the report (see module doc)."""
    image = image if image is not None else synthetic_lr(config.size, config.seed)
    options: dict[str, Any] = {"steps": config.steps, "guidance": config.guidance}
    end_to_end: list[float] = []
    warmup: list[float] = []
    per_run_calls: list[dict[str, list[float]]] = []
    output_size: tuple[int, int] | None = None
    backend: Any = getattr(pipe, "backend", None)  # benchmarks/bench.py's torch reference has none
    compiles: list[int] | None = None if compile_count(backend) is None else []
    plan = None
    for i in range(config.warmup + config.runs):
        profiler.clear()
        before = compile_count(backend) or 0
        start = time.perf_counter()
        result = pipe(image, seed=config.seed, **options)
        seconds = time.perf_counter() - start
        if compiles is not None:
            compiles.append((compile_count(backend) or 0) - before)
        output_size, plan = result.image.size, getattr(result, "memory_plan", None)
        if i >= config.warmup:
            end_to_end.append(seconds)
            per_run_calls.append(profiler.calls())
        else:
            warmup.append(seconds)
        if progress is not None:
            progress(i, seconds)
    shapes = profiler.shapes()
    stages = {
        name: _stage_report(name, per_run_calls, shapes.get(name, set()), pipe.manifest, config)
        for name in (*STAGES, STEP_STAGE)
    }
    e2e = summarize(end_to_end)
    stage_sum = sum(stages[n]["per_image"]["median_ms"] or 0.0 for n in STAGES)
    stages["other"] = {
        "calls_per_image": None,
        "per_call": summarize([]),
        "per_image": {**summarize([]), "median_ms": max(e2e["median_ms"] - stage_sum, 0.0)},
    }
    step_ms = stages[STEP_STAGE]["per_call"]["median_ms"]
    steps_total = stages[STEP_STAGE]["per_image"]["median_ms"] or 0.0
    extrapolated = None
    if step_ms is not None:
        extrapolated = (e2e["median_ms"] - steps_total + config.reference_steps * step_ms) / 1e3
    return {
        "format": FORMAT,
        "version": 1,
        "per_step": per_step_breakdown(stages, config.steps),
        "input_size": list(image.size),
        "output_size": list(output_size or ()),
        "config": asdict(config),
        "end_to_end": e2e,
        "warmup_s": warmup,  # the first includes opening the sessions/engines
        # shapes compiled during each image, warm-ups first (None: the backend compiles no shapes)
        "compiles_per_image": compiles,
        "images_per_second": 1e3 / e2e["median_ms"],
        "extrapolated": {"steps": config.reference_steps, "end_to_end_s": extrapolated},
        "stages": stages,
        # under a memory budget: what was resident when, the estimated peak and the tiling (memory_plan.py)
        "memory_plan": plan.to_json() if plan is not None and plan.budget is not None else None,
    }


def per_step_breakdown(stages: dict[str, Any], steps: int) -> dict[str, float] | None:
    """One sampler step (median), split into the ControlNet and UNet calls (all tiles) and the host glue
    around them (guidance, scheduler step, tiling, copies): where a step's time goes."""
    step_ms = stages[STEP_STAGE]["per_call"]["median_ms"]
    if step_ms is None or not steps:
        return None
    split = {n: (stages[n]["per_image"]["median_ms"] or 0.0) / steps for n in ("controlnet", "unet")}
    return {
        "step_ms": step_ms,
        "controlnet_ms": split["controlnet"],
        "unet_ms": split["unet"],
        "host_glue_ms": max(step_ms - split["controlnet"] - split["unet"], 0.0),
    }


def _stage_report(
    name: str,
    per_run_calls: list[dict[str, list[float]]],
    shapes: set[Shapes],
    manifest: Manifest,
    config: BenchConfig,
) -> dict[str, Any]:
    calls = [c for run in per_run_calls for c in run.get(name, [])]
    per_image = [sum(run.get(name, [])) for run in per_run_calls]
    report: dict[str, Any] = {
        "calls_per_image": len(per_run_calls[0].get(name, [])) if per_run_calls else 0,
        "per_call": summarize(calls),
        "per_image": summarize(per_image) if calls else summarize([]),
    }
    if name in NETWORK_STAGES and calls:
        flops = [call_flops(manifest, name, dict(s)) for s in shapes]
        if len(flops) == 1 and flops[0] is not None:  # one shape per stage in these workloads
            seconds = report["per_call"]["median_ms"] / 1e3
            report["flops_per_call"] = flops[0]
            report["tflops_per_s"] = flops[0] / seconds / 1e12
            if config.peak_tflops:
                report["fraction_of_peak"] = report["tflops_per_s"] / config.peak_tflops
    return report


def call_flops(manifest: Manifest, network: str, shapes: dict[str, tuple[int, ...]]) -> float | None:
    """FLOPs of one call with these input shapes, from the manifest's counts (exact shapes only)."""
    entry = manifest.data["networks"].get(network, {})
    spec: NetworkSpec = manifest.spec(network)
    for point in entry.get("flops", {}).get("points", []):
        expected = {t.name: t.concrete_shape(point["env"]) for t in spec.inputs}
        if all(tuple(shapes.get(k, ())) == v for k, v in expected.items()):
            return float(point["flops"])
    return None


# ---------------------------------------------------------------- where it ran


def machine_info() -> dict[str, Any]:
    flags = machine.cpu_flags()
    info: dict[str, Any] = {
        "system": platform.system(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu": machine.cpu_model(),
        "cpu_features": machine.cpu_features(flags),  # AVX-512, AVX512_BF16, AMX, VNNI: what the speed depends on
        "cpu_count": os.cpu_count(),
        "gpu": machine.gpu_name(),
    }
    total = machine.total_memory_bytes()
    if total is not None:
        info["memory_gb"] = round(total / 1024**3, 1)
    return info


def peak_host_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024**2 if sys.platform == "darwin" else peak / 1024


def gpu_memory_mb() -> float | None:
    """This process's GPU memory as the driver sees it (allocator pools included; they do not shrink,
    so after a run it is the peak)."""
    for line in machine.nvidia_smi("--query-compute-apps=pid,used_memory"):
        pid, _, used = line.partition(",")
        if pid.strip() == str(os.getpid()):
            return float(used)
    return None


def versions() -> dict[str, str]:
    out = {"seesr_runtime": __version__, "numpy": np.__version__}
    for module in ("onnxruntime", "tensorrt", "openvino"):
        if module in sys.modules:
            out[module] = getattr(sys.modules[module], "__version__", "?")
    return out


def git_commit() -> str | None:
    if os.environ.get("SEESR_COMMIT"):  # a copied tree with no .git (e.g. a remote benchmark machine)
        return os.environ["SEESR_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def bundle_info(manifest: Manifest) -> dict[str, str]:
    digest = hashlib.sha256((manifest.root / "manifest.json").read_bytes()).hexdigest()
    return {"path": str(manifest.root), "name": manifest.data["name"], "manifest_sha256": digest}


# ---------------------------------------------------------------- printing


def format_table(report: dict[str, Any]) -> str:
    stages = report["stages"]
    lines = [f"{'stage':<15}{'calls':>6}{'per call ms':>13}{'p95':>10}{'per image ms':>14}{'TFLOP/s':>9}"]
    for name in (*STAGES, "other"):
        s = stages[name]
        call, image = s["per_call"], s["per_image"]
        if not image["median_ms"] and not s["calls_per_image"]:
            continue
        lines.append(
            f"{name:<15}{s['calls_per_image'] or '':>6}{_ms(call['median_ms']):>13}"
            f"{_ms(call['p95_ms']):>10}{_ms(image['median_ms']):>14}"
            f"{(format(s['tflops_per_s'], '.2f') if 'tflops_per_s' in s else ''):>9}"
        )
    per_step = report.get("per_step")
    if per_step:
        lines.append(
            f"per step: {per_step['step_ms']:.1f} ms = ControlNet {per_step['controlnet_ms']:.1f} + "
            f"UNet {per_step['unet_ms']:.1f} + host glue {per_step['host_glue_ms']:.1f}"
        )
    e2e = report["end_to_end"]
    lines.append(
        f"end to end: median {e2e['median_ms'] / 1e3:.3f} s, p95 {e2e['p95_ms'] / 1e3:.3f} s, "
        f"{report['images_per_second']:.3f} images/s ({report['config']['steps']} steps)"
    )
    extrapolated = report["extrapolated"]
    if extrapolated["end_to_end_s"] is not None and extrapolated["steps"] != report["config"]["steps"]:
        lines.append(f"extrapolated to {extrapolated['steps']} steps: {extrapolated['end_to_end_s']:.3f} s")
    if report.get("compiles_per_image") is not None:
        lines.append(f"compiles per image (warm-ups first): {report['compiles_per_image']}")
    memory = report.get("memory") or {}
    if memory:
        gpu = memory.get("peak_gpu_mb")
        lines.append(
            f"peak host memory {memory['peak_host_mb']:.0f} MB"
            + (f", GPU memory {gpu:.0f} MB" if gpu is not None else "")
        )
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "" if value is None else (f"{value:.1f}" if value >= 10 else f"{value:.2f}")


def write_json(path: Path, report: dict[str, Any]) -> None:
    write_atomically(path, lambda tmp: open(tmp, "w").write(json.dumps(report, indent=1) + "\n"))
