"""Check a bundle's GPU graphs and engines against fp32 on a GPU: TensorRT engines, or onnxruntime-CUDA.

For anyone with an NVIDIA GPU and TensorRT (none is available on the project's CI machines):

    python benchmarks/gpu_validate.py --bundle engines/seesr --out benchmarks/results/<gpu-name>/
    python benchmarks/gpu_validate.py --bundle engines/demo --dry-run   # no GPU: checks the plan only

onnxruntime-CUDA (``--onnxruntime``): every fp16 graph (the GPU graphs and the plain fp16 ones) on the
CUDA provider against the fp32 graph on the CPU (which the build checked against torch), at the 512px
profile's opt shape; a GPU graph outside its manifest ``parity_tolerance`` fails the run (exit 1).
Then the end-to-end PSNR of the final image against the fp32 pipeline, same seed and noise.
``--dry-run`` runs the same code on the CPU provider (plain fp16 graphs only; GPU graphs skipped).

    python benchmarks/gpu_validate.py --onnxruntime --bundle B --out DIR [--psnr-steps 50] [--dry-run]

Per network and precision (fp16, and int8 where the bundle has Q/DQ graphs): engine build time,
relative L2 of the engine's outputs against onnxruntime fp32 on the same inputs (the manifest's
512px profile, at its opt shape), and latency median/p95 over --runs calls, timed with CUDA events.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "runtime")]

from seesr_export.parity import relative_l2
from seesr_export.trt_engines import EngineOptions, build_engine, optimization_profiles
from seesr_runtime import SeeSRPipeline
from seesr_runtime.bench import synthetic_lr
from seesr_runtime.lazy import lazy_import
from seesr_runtime.manifest import GPU_GRAPH, Manifest
from seesr_runtime.networks import NETWORK_NAMES, dummy_feeds
from seesr_runtime.trt_backend import TensorRTBackend, _check

trt = lazy_import("tensorrt", extra="tensorrt")  # the engine checks only; --onnxruntime runs without it


def feeds_for(spec, env: dict, seed: int = 0) -> dict:
    return dummy_feeds(spec, env, seed)


def plan(manifest: Manifest) -> list[tuple[str, str, dict]]:
    """(network, precision, opt env) triples to validate; raises on anything missing."""
    jobs = []
    for name in NETWORK_NAMES:
        spec = manifest.spec(name)
        files = manifest.data["networks"][name]["files"]
        for precision in ("fp16", "int8"):
            if precision in files:
                manifest.graph_path(name, precision)
                profiles = {p.name: p for p in spec.profiles}
                optimization_profiles(spec)  # validates min <= opt <= max
                env = (profiles.get("512px") or spec.profiles[0]).opt
                jobs.append((name, precision, env))
    if not jobs:
        raise SystemExit(f"{manifest.root}: no fp16 or int8 graphs; build with --precision fp16 (or int8)")
    return jobs


def time_backend(backend, network: str, feeds: dict, runs: int, warmup: int) -> dict:
    cudart = backend.cudart
    for _ in range(warmup):
        backend.run(network, feeds)
    start, stop = _check(cudart.cudaEventCreate()), _check(cudart.cudaEventCreate())
    times = []
    for _ in range(runs):
        _check(cudart.cudaEventRecord(start, backend.stream))
        backend.run(network, feeds)
        _check(cudart.cudaEventRecord(stop, backend.stream))
        _check(cudart.cudaEventSynchronize(stop))
        times.append(_check(cudart.cudaEventElapsedTime(start, stop)))
    return {"median_ms": float(np.median(times)), "p95_ms": float(np.percentile(times, 95))}


# ---------------------------------------------------------------- onnxruntime-CUDA accuracy

ACCURACY_TARGET = 3e-3  # issue 11: fp16 UNet and ControlNet within this of fp32 (PyTorch fp16: 1.7e-3)


def psnr(a, b) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def ort_accuracy_rows(manifest: Manifest, providers: list[str], latent: int | None = None) -> list[dict]:
    """Per network and fp16 graph: relative L2 against the fp32 graph on the CPU, same inputs (the 512px
    profile's opt shape, or a ``latent`` x ``latent`` latent)."""
    rows = []
    on_gpu = "CUDAExecutionProvider" in providers
    for name in NETWORK_NAMES:
        files = manifest.data["networks"].get(name, {}).get("files", {})
        graphs = [g for g in ("fp16", GPU_GRAPH) if g in files and (on_gpu or g != GPU_GRAPH)]
        if not graphs:
            continue
        spec = manifest.spec(name)
        env = dict(({p.name: p for p in spec.profiles}.get("512px") or spec.profiles[0]).opt)
        if latent is not None:
            env.update({k: latent for k in ("h", "w") if k in env})
        feeds = feeds_for(spec, env)
        reference = ort.InferenceSession(
            str(manifest.graph_path(name, "fp32")), providers=["CPUExecutionProvider"]
        ).run(spec.output_names, feeds)
        for graph in graphs:
            session = ort.InferenceSession(str(manifest.graph_path(name, graph)), providers=providers)
            got = session.run(spec.output_names, feeds)
            error = max(relative_l2(g, r) for g, r in zip(got, reference))
            tolerance = files[graph].get("parity_tolerance")
            rows.append(
                {
                    "network": name,
                    "graph": graph,
                    "env": env,
                    "max_rel_l2_vs_fp32": error,
                    "tolerance": tolerance,
                    "within_tolerance": tolerance is None or error <= tolerance,
                    "within_target_3e-3": error <= ACCURACY_TARGET,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            del session
    return rows


def end_to_end_psnr(bundle: Path, providers: list[str], steps: int, size: int = 512) -> dict:
    """PSNR of the final image of each fp16 variant against the fp32 pipeline (same seed, same noise)."""
    image = synthetic_lr(size)
    variants = {"fp32": {"precision": "fp32"}, "fp16 (plain graphs)": {"precision": "fp16", "gpu_graph": False}}
    if "CUDAExecutionProvider" in providers:
        variants["fp16 (GPU graphs)"] = {"precision": "fp16"}
    images = {}
    for label, options in variants.items():
        pipe = SeeSRPipeline.from_bundle(bundle, providers=providers, **options)
        images[label] = np.asarray(pipe(image, seed=0, steps=steps).image)
        del pipe
    result = {
        "size": size,
        "steps": steps,
        "psnr_vs_fp32_db": {label: psnr(img, images["fp32"]) for label, img in images.items() if label != "fp32"},
    }
    print(json.dumps(result), flush=True)
    return result


def validate_onnxruntime(args) -> int:
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    providers = ["CPUExecutionProvider"] if args.dry_run else ["CUDAExecutionProvider", "CPUExecutionProvider"]
    manifest = Manifest.load(args.bundle)
    results = {
        "bundle": str(args.bundle),
        "onnxruntime": ort.__version__,
        "providers": providers,
        "networks": ort_accuracy_rows(manifest, providers, args.latent),
        "end_to_end": end_to_end_psnr(args.bundle, providers, args.psnr_steps, args.psnr_size),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "gpu_validate_onnxruntime" + ("_dry_run" if args.dry_run else "")
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    failed = [
        f"{r['network']} {r['graph']}: {r['max_rel_l2_vs_fp32']:.3e} > {r['tolerance']:.1e}"
        for r in results["networks"]
        if not r["within_tolerance"]
    ]
    for line in failed:
        print(f"FAIL: {line}", file=sys.stderr)
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dry-run", action="store_true", help="check the plan without a GPU or TensorRT")
    parser.add_argument(
        "--onnxruntime",
        action="store_true",
        help="check the fp16 graphs on onnxruntime-CUDA (accuracy and PSNR) instead of TensorRT",
    )
    parser.add_argument("--psnr-steps", type=int, default=50, help="--onnxruntime: sampler steps of the PSNR run")
    parser.add_argument("--psnr-size", type=int, default=512, help="--onnxruntime: output size of the PSNR run")
    parser.add_argument(
        "--latent",
        type=int,
        default=None,
        help="--onnxruntime: check the networks at this latent side (default: the 512px profile)",
    )
    args = parser.parse_args()
    if args.onnxruntime:
        return validate_onnxruntime(args)

    manifest = Manifest.load(args.bundle)
    jobs = plan(manifest)
    for name, precision, env in jobs:
        print(f"plan: {name} {precision} at {env}")
    if args.dry_run:
        print(f"dry run: {len(jobs)} engines would be built and checked")
        return 0

    results = {"bundle": str(args.bundle), "tensorrt": trt.__version__, "networks": []}
    with tempfile.TemporaryDirectory() as scratch:
        for name, precision, env in jobs:
            spec = manifest.spec(name)
            engine_path = Path(scratch) / f"{name}.{precision}.plan"
            started = time.perf_counter()
            build_engine(manifest.graph_path(name, precision), spec, engine_path, EngineOptions(precision=precision))
            build_seconds = time.perf_counter() - started
            # A one-network manifest view pointing at the fresh engine drives the real backend code.
            data = json.loads(json.dumps(manifest.data))
            data["networks"] = {name: data["networks"][name]}
            data["networks"][name]["engines"] = {
                precision: {"file": str(engine_path), "tensorrt": trt.__version__, "compute_capability": []}
            }
            backend = TensorRTBackend(Manifest(manifest.root, data), precision=precision)
            feeds = feeds_for(spec, env)
            reference = ort.InferenceSession(
                str(manifest.graph_path(name, "fp32")), providers=["CPUExecutionProvider"]
            ).run(spec.output_names, feeds)
            got = backend.run(name, feeds)
            errors = [relative_l2(g, r) for g, r in zip(got, reference)]
            row = {
                "network": name,
                "precision": precision,
                "env": env,
                "build_s": round(build_seconds, 1),
                "max_rel_l2_vs_fp32": max(errors),
                **time_backend(backend, name, feeds, args.runs, args.warmup),
            }
            backend.close()
            print(json.dumps(row), flush=True)
            results["networks"].append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_validate.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
