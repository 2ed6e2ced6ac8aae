"""Build TensorRT engines from a bundle, check them against onnxruntime fp32, and time them.

For anyone with an NVIDIA GPU and TensorRT (none is available on the project's CI machines):

    python benchmarks/gpu_validate.py --bundle engines/seesr --out benchmarks/results/<gpu-name>/
    python benchmarks/gpu_validate.py --bundle engines/demo --dry-run   # no GPU: checks the plan only

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

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "runtime")]

from seesr_runtime.manifest import Manifest  # noqa: E402
from seesr_runtime.networks import NETWORK_NAMES  # noqa: E402


def feeds_for(spec, env: dict, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {}
    for tensor in spec.inputs:
        shape = tensor.concrete_shape(env)
        if tensor.dtype == "int64":
            feeds[tensor.name] = rng.integers(0, 49408, shape, dtype=np.int64)
        elif tensor.name == "timestep":
            feeds[tensor.name] = np.full(shape, 501, np.float32)
        elif tensor.name == "conditioning_scale":
            feeds[tensor.name] = np.array(1.0, np.float32)
        else:
            feeds[tensor.name] = (0.5 * rng.standard_normal(shape)).astype(np.float32)
    return feeds


def plan(manifest: Manifest) -> list[tuple[str, str, dict]]:
    """(network, precision, opt env) triples to validate; raises on anything missing."""
    from seesr_export.trt_engines import optimization_profiles

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
    from seesr_runtime.trt_backend import _check

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dry-run", action="store_true", help="check the plan without a GPU or TensorRT")
    args = parser.parse_args()

    manifest = Manifest.load(args.bundle)
    jobs = plan(manifest)
    for name, precision, env in jobs:
        print(f"plan: {name} {precision} at {env}")
    if args.dry_run:
        print(f"dry run: {len(jobs)} engines would be built and checked")
        return 0

    import onnxruntime as ort
    import tensorrt as trt

    from seesr_export.bundle import relative_l2
    from seesr_export.trt_engines import EngineOptions, build_engine
    from seesr_runtime.trt_backend import TensorRTBackend

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
            data["networks"][name]["engines"] = {precision: {"file": str(engine_path), "tensorrt": trt.__version__,
                                                             "compute_capability": []}}
            backend = TensorRTBackend(Manifest(manifest.root, data), precision=precision)
            feeds = feeds_for(spec, env)
            reference = ort.InferenceSession(str(manifest.graph_path(name, "fp32")),
                                             providers=["CPUExecutionProvider"]).run(spec.output_names, feeds)
            got = backend.run(name, feeds)
            errors = [relative_l2(g, r) for g, r in zip(got, reference)]
            row = {"network": name, "precision": precision, "env": env, "build_s": round(build_seconds, 1),
                   "max_rel_l2_vs_fp32": max(errors), **time_backend(backend, name, feeds, args.runs, args.warmup)}
            backend.close()
            print(json.dumps(row), flush=True)
            results["networks"].append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_validate.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
