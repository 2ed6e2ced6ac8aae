"""The runtime against PyTorch, same workload, same script run: per stage, end to end, memory.

Each configuration runs in its own process (one after another, so they never
share the machine) and writes a JSON report; this script then joins them into
``bench_NAME.json`` + ``.md`` + ``.png`` under ``--out``, with every figure's
ratio against the PyTorch reference measured in the same run.

    # CPU, full-size random weights (see benchmarks/README.md)
    python benchmarks/bench.py --bundle B --seesr-root CHECKOUT --torch cpu:fp32 \\
        --runtime onnxruntime:fp32:cpu onnxruntime:int8:cpu --sizes 512 1024 --steps 2 1 --out benchmarks/results/cpu

Configurations: ``--torch DEVICE:DTYPE`` (``cpu:fp32``, ``cuda:fp16``; ``none`` to skip) runs
``seesr_export.reference`` (SDPA attention, as the official code on diffusers; several may be given,
e.g. ``cpu:fp32 cpu:bf16-autocast``, ratios are against the first); ``--runtime
BACKEND:PRECISION[:PROVIDER,...[:CPU_ARENA[:MODE,...]]]`` runs ``seesr bench``; modes (onnxruntime):
``iobinding``, ``no-iobinding``, ``static`` (static-shape denoiser sessions), ``cudagraph``, ``plain`` (the
plain fp16 graphs instead of the GPU graphs), e.g. ``onnxruntime:fp16:cuda::static,cudagraph``;
``openvino:PRECISION[:DEVICE]`` for the OpenVINO backend, e.g. ``openvino:bf16:CPU``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "runtime")]

from seesr_export.layout import SeeSRPaths
from seesr_export.turbo_options import default_sd_turbo
from seesr_runtime.bench import (
    NETWORK_STAGES,
    STAGES,
    BenchConfig,
    bundle_info,
    git_commit,
    gpu_memory_mb,
    machine_info,
    peak_host_mb,
    run_bench,
    write_json,
)
from seesr_runtime.lazy import available, lazy_import
from seesr_runtime.manifest import Manifest
from seesr_runtime.profiling import StageProfiler

# The PyTorch reference runs in its own worker process (--torch-worker): only that process loads torch.
torch = lazy_import("torch", extra="export")
torch_reference = lazy_import("seesr_export.reference", extra="export")
turbo = lazy_import("seesr_export.turbo", extra="export")
matplotlib = lazy_import("matplotlib", extra="bench")  # the PNG chart, where installed
plt = lazy_import("matplotlib.pyplot", extra="bench")

PLOT_STAGES = (*STAGES, "other")


# ---------------------------------------------------------------- the PyTorch side (a worker process)


class _ReferenceAdapter:
    """The torch reference behind the runtime pipeline's call signature, for ``run_bench``."""

    def __init__(self, reference, manifest):
        self.reference, self.manifest = reference, manifest

    def __call__(self, image, seed=0, **options):
        return self.reference(image, seed=seed, **{k: v for k, v in options.items() if v is not None})


def torch_worker(args) -> int:
    (spec,) = args.torch
    device, dtype_name = spec.split(":")
    # bf16-autocast: fp32 weights, matrix products in bf16 under torch.autocast (softmax and normalisation
    # stay fp32): PyTorch's own mixed precision, the yardstick for the runtime's bf16
    autocast = dtype_name == "bf16-autocast"
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "bf16-autocast": torch.float32}[
        dtype_name
    ]
    manifest = Manifest.load(args.bundle)
    paths = SeeSRPaths.from_root(args.seesr_root)
    start = time.perf_counter()
    if _is_turbo(manifest):  # the turbo reference of the same checkout (sd-turbo base, turbo defaults)
        reference = turbo.turbo_reference(paths, args.sd_turbo or default_sd_turbo(args.seesr_root))
    else:
        reference = torch_reference.SeeSRReference.from_paths(paths)
    reference = reference.to(device, dtype)
    reference.profiler = profiler = StageProfiler()
    load_s = time.perf_counter() - start
    pipe = _ReferenceAdapter(reference, manifest)
    results = []
    for size, steps in zip(args.sizes, _steps_per_size(args)):
        config = BenchConfig(
            size=size, steps=steps, runs=args.runs, warmup=args.warmup, reference_steps=_default_steps(manifest)
        )
        print(f"bench torch {spec}: {size} px, {steps} steps", file=sys.stderr, flush=True)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            report = run_bench(pipe, profiler, config)
        # peak_gpu_mb is the driver's view (context + caching allocator), as for the runtime's backends;
        # torch's own count of live tensors is kept beside it.
        report["memory"] = {
            "peak_host_mb": peak_host_mb(),
            "peak_gpu_mb": gpu_memory_mb() if device == "cuda" else None,
            "torch_max_allocated_mb": torch.cuda.max_memory_allocated() / 1024**2 if device == "cuda" else None,
        }
        results.append(report)
    summary = {
        "format": "seesr-bench",
        "version": 1,
        "label": f"PyTorch {dtype_name} ({device})",
        "backend": {"name": "torch", "precision": dtype_name, "providers": [device]},
        "load_s": load_s,
        "versions": {"torch": torch.__version__},
        "results": results,
    }
    write_json(Path(args.json), summary)
    return 0


# ---------------------------------------------------------------- running the configurations


def _is_turbo(manifest: Manifest) -> bool:
    return manifest.data["pipeline"].get("variant") == "turbo"


def _default_steps(manifest: Manifest) -> int:
    """The bundle's default step count (50; 2 for a turbo bundle): end to end is extrapolated to it."""
    return int(manifest.data["pipeline"].get("defaults", {}).get("steps", 50))


def _steps_per_size(args) -> list[int]:
    return args.steps * len(args.sizes) if len(args.steps) == 1 else args.steps


# The onnxruntime modes a --runtime configuration may name (its fifth field), as `seesr bench` options.
RUNTIME_MODES = {
    "iobinding": ["--io-binding", "on"],
    "no-iobinding": ["--io-binding", "off"],
    "static": ["--static-shapes"],
    "cudagraph": ["--cuda-graph"],
    "plain": ["--no-gpu-graph"],
}


def runtime_command(spec: str, args, json_path: Path) -> tuple[str, list[str]]:
    backend, precision, *rest = spec.split(":")
    providers = rest[0].split(",") if rest and rest[0] else []
    arena = rest[1] if len(rest) > 1 and rest[1] else None
    modes = rest[2].split(",") if len(rest) > 2 and rest[2] else []
    unknown = [m for m in modes if m not in RUNTIME_MODES]
    if unknown:
        raise SystemExit(f"--runtime {spec}: unknown mode(s) {unknown}; known: {sorted(RUNTIME_MODES)}")
    label = (
        f"{backend} {precision}"
        + (f" ({','.join(providers)})" if providers else "")
        + (f" arena={arena}" if arena else "")
        + (f" [{'+'.join(modes)}]" if modes else "")
    )
    if backend == "openvino":  # BACKEND:PRECISION[:DEVICE]
        device = rest[0] if rest else "CPU"
        label, providers, arena = f"openvino {precision} ({device})", [], None
    command = [
        sys.executable,
        "-m",
        "seesr_runtime.cli",
        "bench",
        "--bundle",
        str(args.bundle),
        "--backend",
        backend,
        "--precision",
        precision,
        "--size",
        *map(str, args.sizes),
        "--steps",
        *map(str, args.steps),
        "--runs",
        str(args.runs),
        "--warmup",
        str(args.warmup),
        "--label",
        label,
        "--json",
        str(json_path),
    ]
    if providers:
        command += ["--providers", *providers]
    if backend == "openvino":
        command += ["--device", device]
    if arena:
        command += ["--cpu-arena", arena]
    for mode in modes:
        command += RUNTIME_MODES[mode]
    if args.peak_tflops:
        command += ["--peak-tflops", str(args.peak_tflops)]
    return label, command


def torch_command(spec: str, args, json_path: Path) -> tuple[str, list[str]]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--torch-worker",
        "--torch",
        spec,
        "--bundle",
        str(args.bundle),
        "--seesr-root",
        str(args.seesr_root),
        *(["--sd-turbo", str(args.sd_turbo)] if args.sd_turbo else []),
        "--sizes",
        *map(str, args.sizes),
        "--steps",
        *map(str, args.steps),
        "--runs",
        str(args.runs),
        "--warmup",
        str(args.warmup),
        "--json",
        str(json_path),
    ]
    return f"PyTorch {spec}", command


def run_configuration(label: str, command: list[str], json_path: Path, timeout: float) -> dict:
    print(f"== {label}", file=sys.stderr, flush=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "runtime"), os.environ.get("PYTHONPATH", "")]),
    }
    started = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, timeout=timeout)
        error = None if done.returncode == 0 else f"exit code {done.returncode}"
    except subprocess.TimeoutExpired:
        error = f"timed out after {timeout:.0f} s"
    if error is None and json_path.exists():
        report = json.loads(json_path.read_text())
    else:  # a failed configuration is reported, not fatal: the others still count
        report = {"label": label, "error": error or "no report written", "results": []}
    report["wall_s"] = time.perf_counter() - started
    return report


# ---------------------------------------------------------------- joining


def add_ratios(reports: list[dict]) -> None:
    """Each figure against the PyTorch report of the same size (the first one, if any)."""
    torch_reports = [r for r in reports if r.get("backend", {}).get("name") == "torch" and r["results"]]
    if not torch_reports:
        return
    baseline = {res["config"]["size"]: res for res in torch_reports[0]["results"]}
    flops = {}
    for report in reports:  # torch records no shapes: give it the runtime's FLOPs for the same calls
        for res in report["results"]:
            for stage in NETWORK_STAGES:
                if "flops_per_call" in res["stages"][stage]:
                    flops[(res["config"]["size"], stage)] = res["stages"][stage]["flops_per_call"]
    for res in torch_reports[0]["results"]:
        for stage in NETWORK_STAGES:
            entry, value = res["stages"][stage], flops.get((res["config"]["size"], stage))
            if value and entry["per_call"]["median_ms"]:
                entry["flops_per_call"] = value
                entry["tflops_per_s"] = value / entry["per_call"]["median_ms"] * 1e-9
    for report in reports:
        for res in report["results"]:
            base = baseline.get(res["config"]["size"])
            if base is None:
                continue
            res["speedup_vs_torch"] = {
                "end_to_end": base["end_to_end"]["median_ms"] / res["end_to_end"]["median_ms"],
                "extrapolated": _ratio(base["extrapolated"]["end_to_end_s"], res["extrapolated"]["end_to_end_s"]),
                "stages": {
                    s: _ratio(base["stages"][s]["per_image"]["median_ms"], res["stages"][s]["per_image"]["median_ms"])
                    for s in PLOT_STAGES
                },
                "peak_host_memory": _ratio(res["memory"]["peak_host_mb"], base["memory"]["peak_host_mb"]),
            }


def _ratio(a, b):
    return a / b if a and b else None


def markdown(summary: dict) -> str:
    machine = summary["machine"]
    device = machine["gpu"] or f"{machine['cpu']} ({machine['cpu_count']} cores)"
    lines = [
        f"# SeeSR latency: {summary['name']}",
        "",
        f"{device}; commit {summary['commit']}; bundle {summary['bundle']['name']} "
        f"(manifest sha256 {summary['bundle']['manifest_sha256'][:12]}); {summary['date']}.",
        "",
        "Per-image milliseconds (median of the timed runs; network stages are the sum of their calls). "
        "Ratios are PyTorch's time over the configuration's, from the same script run.",
        "",
    ]
    ok = [r for r in summary["configurations"] if r["results"]]
    for size in summary["options"]["sizes"]:
        rows = [(r["label"], next((x for x in r["results"] if x["config"]["size"] == size), None)) for r in ok]
        rows = [(label, res) for label, res in rows if res is not None]
        if not rows:
            continue
        first = rows[0][1]
        lines += [
            f"## {size} px output ({first['input_size'][0]} px input), {first['config']['steps']} steps",
            "",
            "| stage | " + " | ".join(label for label, _ in rows) + " |",
            "|---|" + "---:|" * len(rows),
        ]
        for stage in PLOT_STAGES:
            cells = []
            for _, res in rows:
                value = res["stages"][stage]["per_image"]["median_ms"]
                tflops = res["stages"][stage].get("tflops_per_s")
                cells.append("" if not value else f"{value:.1f}" + (f" ({tflops:.2f} TFLOP/s)" if tflops else ""))
            if any(cells):
                lines.append(f"| {stage} | " + " | ".join(cells) + " |")
        lines.append(
            "| **end to end (s)** | "
            + " | ".join(
                f"**{res['end_to_end']['median_ms'] / 1e3:.3f}** (p95 {res['end_to_end']['p95_ms'] / 1e3:.3f})"
                for _, res in rows
            )
            + " |"
        )
        if first["config"]["steps"] != first["extrapolated"]["steps"]:
            lines.append(
                f"| end to end, extrapolated to {first['extrapolated']['steps']} steps (s) | "
                + " | ".join(_fmt(res["extrapolated"]["end_to_end_s"], ".2f") for _, res in rows)
                + " |"
            )
        lines.append(
            "| speed-up vs PyTorch (end to end) | "
            + " | ".join(_fmt(res.get("speedup_vs_torch", {}).get("end_to_end"), ".2f", "x") for _, res in rows)
            + " |"
        )
        lines.append(
            "| peak host memory (MB) | " + " | ".join(f"{res['memory']['peak_host_mb']:.0f}" for _, res in rows) + " |"
        )
        for key, title in (
            ("step_ms", "per step (ms)"),
            ("controlnet_ms", "per step: ControlNet (ms)"),
            ("unet_ms", "per step: UNet (ms)"),
            ("host_glue_ms", "per step: host glue (ms)"),
        ):
            lines.append(
                f"| {title} | "
                + " | ".join(_fmt((res.get("per_step") or {}).get(key), ".1f") for _, res in rows)
                + " |"
            )
        if any(res["memory"].get("peak_gpu_mb") for _, res in rows):
            lines.append(
                "| peak GPU memory (MB) | "
                + " | ".join(_fmt(res["memory"].get("peak_gpu_mb"), ".0f") for _, res in rows)
                + " |"
            )
        lines.append("")
    failed = [r for r in summary["configurations"] if not r["results"]]
    lines += [f"- {r['label']}: failed ({r.get('error')})" for r in failed]
    lines += ["", "Reproduce: `" + summary["command"] + "`", ""]
    return "\n".join(lines)


def _fmt(value, spec, suffix=""):
    return "" if value is None else format(value, spec) + suffix


def plot(summary: dict, path: Path) -> bool:
    """Stacked per-stage bars, one per configuration and size. False if matplotlib is missing."""
    if not available("matplotlib"):
        return False
    matplotlib.use("Agg")  # before pyplot's first use (pyplot is a lazy module)
    bars = [
        (f"{r['label']}\n{res['config']['size']} px", res) for r in summary["configurations"] for res in r["results"]
    ]
    if not bars:
        return False
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(bars)), 5))
    bottoms = [0.0] * len(bars)
    for stage in PLOT_STAGES:
        heights = [(res["stages"][stage]["per_image"]["median_ms"] or 0.0) / 1e3 for _, res in bars]
        ax.bar(range(len(bars)), heights, bottom=bottoms, label=stage)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    ax.set_xticks(range(len(bars)), [label for label, _ in bars], fontsize=8)
    ax.set_ylabel("seconds per image")
    ax.set_title(f"SeeSR per-stage latency: {summary['name']}")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)
    return True


def machine_kind(machine: dict) -> str:
    if machine.get("gpu"):
        return re.sub(r"[^a-z0-9]+", "-", machine["gpu"].lower()).strip("-")
    return "cpu"


def write_results(out: Path, name: str, manifest, machine, options, command, configurations) -> tuple[str, bool]:
    configurations = json.loads(json.dumps(configurations))
    add_ratios(configurations)
    summary = {
        "format": "seesr-bench-comparison",
        "version": 1,
        "name": name,
        "machine": machine,
        "date": time.strftime("%Y-%m-%d"),
        "commit": git_commit(),
        "bundle": bundle_info(manifest),
        "options": options,
        "command": command,
        "configurations": configurations,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"bench_{name}.json", summary)
    text = markdown(summary)
    (out / f".bench_{name}.md.tmp").write_text(text)
    os.replace(out / f".bench_{name}.md.tmp", out / f"bench_{name}.md")
    return text, plot(summary, out / f"bench_{name}.png")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--seesr-root", type=Path, help="the checkout the bundle was built from (PyTorch side)")
    parser.add_argument(
        "--sd-turbo",
        type=Path,
        default=None,
        help="a turbo bundle's sd-turbo folder for the PyTorch side (default SEESR_ROOT/preset/models/sd-turbo)",
    )
    parser.add_argument(
        "--torch",
        nargs="+",
        default=["cpu:fp32"],
        help="DEVICE:DTYPE of the PyTorch reference (fp32, fp16, bf16, bf16-autocast), one or more "
        "(ratios are against the first), or none",
    )
    parser.add_argument(
        "--runtime",
        nargs="*",
        default=["onnxruntime:fp32:cpu"],
        help="BACKEND:PRECISION[:PROVIDERS] configurations of the runtime",
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[512])
    parser.add_argument("--steps", type=int, nargs="+", default=[50], help="one value, or one per size")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's stated peak (dense fp16)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    parser.add_argument("--name", default=None, help="results file stem (default: from the sizes)")
    parser.add_argument(
        "--out", type=Path, default=None, help="results directory (default benchmarks/results/<machine-kind>)"
    )
    parser.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if len(args.steps) not in (1, len(args.sizes)):
        parser.error("--steps takes one value or one per size")
    if args.torch_worker:
        return torch_worker(args)
    if args.torch != ["none"] and args.seesr_root is None:
        parser.error("--seesr-root is needed for the PyTorch reference (or --torch none)")
    manifest = Manifest.load(args.bundle)
    machine = machine_info()
    out = args.out or ROOT / "benchmarks" / "results" / machine_kind(machine)
    name = args.name or "sd_" + "_".join(map(str, args.sizes))
    configurations = []
    options = {
        "sizes": args.sizes,
        "steps": _steps_per_size(args),
        "runs": args.runs,
        "warmup": args.warmup,
        "peak_tflops": args.peak_tflops,
    }
    command = "python benchmarks/bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="seesr-bench-") as scratch:
        jobs = [
            torch_command(spec, args, Path(scratch) / f"torch{i}.json")
            for i, spec in enumerate(args.torch)
            if spec != "none"
        ]
        jobs += [runtime_command(spec, args, Path(scratch) / f"runtime{i}.json") for i, spec in enumerate(args.runtime)]
        for label, job in jobs:
            json_path = Path(job[job.index("--json") + 1])
            configurations.append(run_configuration(label, job, json_path, args.timeout))
            # Written after every configuration: a run cut short still leaves what it measured.
            text, plotted = write_results(out, name, manifest, machine, options, command, configurations)
    print(text)
    print(f"wrote {out}/bench_{name}.{{json,md{',png' if plotted else ''}}}", file=sys.stderr)
    return 0 if all(r["results"] for r in configurations) else 1


if __name__ == "__main__":
    sys.exit(main())
