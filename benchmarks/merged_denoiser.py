"""Is one merged ControlNet+UNet call per step faster than two calls? The measurement that decides.

Both sides run as the runtime runs a step: static input shapes, IOBinding, per-image constants (text and
image embeddings, control image) uploaded once, only the latent and the timestep copied in per step and
the noise prediction copied out; with CUDA graphs, one captured graph per session. The two-call side is
the runtime's own backend (ControlNet residuals left on the device); the merged side is one session over
``seesr_export.merged_denoiser``'s composition of the same graphs (the GPU graphs on CUDA).

    python benchmarks/merged_denoiser.py --bundle B --json out.json             # CUDA, CUDA graphs
    python benchmarks/merged_denoiser.py --bundle B --json out.json --dry-run   # CPU, fp32, checks the code

Prints and writes per latent side: milliseconds per step (median, p95) each way, the speed-up, and the
relative L2 between the two noise predictions (the same arithmetic, so it should be ~0).
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

from ort_shapes_memory import denoiser_backend, denoiser_feeds

from seesr_export.merged_denoiser import merge_denoiser
from seesr_runtime.backends import OnnxRuntimeBackend
from seesr_runtime.manifest import Manifest
from seesr_runtime.networks import DENOISER_PROFILES, NetworkSpec
from seesr_runtime.ort_device import BoundCall, solve_dims

PER_STEP = ("sample", "timestep")  # what changes every step; the rest is uploaded once per image


def merged_spec(manifest: Manifest) -> NetworkSpec:
    """The merged graph's interface: every input of either network once, minus the residuals."""
    control, unet = manifest.spec("controlnet"), manifest.spec("unet")
    internal = set(control.output_names)
    inputs = {t.name: t for t in (*control.inputs, *unet.inputs) if t.name not in internal}
    return NetworkSpec("denoiser", tuple(inputs.values()), unet.outputs, DENOISER_PROFILES)


def step_feeds(backend: OnnxRuntimeBackend, feeds: dict, step: int) -> dict:
    """This step's feeds: constants as device handles (uploaded once), a fresh latent and timestep."""
    rng = np.random.default_rng(step)
    fresh = {"sample": rng.standard_normal(feeds["sample"].shape).astype(np.float32)}
    fresh["timestep"] = np.full(feeds["timestep"].shape, 999.0 - 20 * step, np.float32)
    return {name: fresh.get(name, value) for name, value in feeds.items()}


def two_calls(backend: OnnxRuntimeBackend, manifest: Manifest, feeds: dict) -> np.ndarray:
    control, unet = manifest.spec("controlnet"), manifest.spec("unet")
    residuals = backend.run_on_device("controlnet", {n: feeds[n] for n in control.input_names})
    unet_feeds = {n: feeds[n] for n in unet.input_names if n in feeds}
    return backend.run("unet", {**unet_feeds, **dict(zip(control.output_names, residuals))})[0]


def merged_call(call: BoundCall, feeds: dict) -> np.ndarray:
    return np.array(call.run({n: feeds[n] for n in call.spec.input_names})[0].numpy())


def open_merged(backend: OnnxRuntimeBackend, path: Path, spec: NetworkSpec, feeds: dict) -> BoundCall:
    env = solve_dims(spec, {n: np.shape(v) for n, v in feeds.items()})
    return backend.static_call(path, spec, env)


def timed(run, backend: OnnxRuntimeBackend, feeds: dict, warmup: int, steps: int) -> tuple[list[float], np.ndarray]:
    """Milliseconds of each of ``steps`` steps after ``warmup`` (first call, CUDA graph capture)."""
    times, out = [], None
    for step in range(warmup + steps):
        this = step_feeds(backend, feeds, step % 2)  # two alternating latents: every step copies one in
        started = time.perf_counter()
        out = run(this)
        if step >= warmup:
            times.append((time.perf_counter() - started) * 1e3)
    return times, out


def figures(times: list[float]) -> dict:
    return {"median": float(np.median(times)), "p95": float(np.percentile(times, 95)), "runs": len(times)}


def measure(backend, manifest, merged_path, side, warmup, steps) -> dict:
    raw = denoiser_feeds(manifest, side)
    feeds = {n: (v if n in PER_STEP else backend.to_device(v)) for n, v in raw.items()}
    spec = merged_spec(manifest)
    merged = open_merged(backend, merged_path, spec, raw)
    separate_ms, separate_out = timed(lambda f: two_calls(backend, manifest, f), backend, feeds, warmup, steps)
    merged_ms, merged_out = timed(lambda f: merged_call(merged, f), backend, feeds, warmup, steps)
    error = float(np.linalg.norm(merged_out - separate_out) / max(np.linalg.norm(separate_out), 1e-30))
    two, one = figures(separate_ms), figures(merged_ms)
    return {
        "latent_side": side,
        "batch": raw["sample"].shape[0],
        "two_calls_ms": two,
        "merged_ms": one,
        "speedup": two["median"] / one["median"],
        "rel_l2_merged_vs_two_calls": error,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--sides", type=int, nargs="+", default=[64, 96], help="latent sides (64: 512 px image)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per side and way")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (first call, capture)")
    parser.add_argument("--work", type=Path, default=None, help="where the merged graph is written (default: temp)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--dry-run", action="store_true", help="CPU provider, fp32 graphs, no CUDA graph")
    args = parser.parse_args()

    manifest = Manifest.load(args.bundle)
    backend = denoiser_backend(manifest, args.dry_run)
    precision = {n: backend.graph_precision(n) for n in ("controlnet", "unet")}
    if len(set(precision.values())) != 1:
        raise SystemExit(f"the ControlNet and UNet would run different graphs ({precision}): nothing to merge")
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        started = time.perf_counter()
        merged_path = merge_denoiser(manifest, precision["unet"], Path(work) / "denoiser.onnx")
        report = {
            "device": backend.device,
            "cuda_graph": backend.cuda_graph,
            "graphs": precision["unet"],
            "merge_seconds": time.perf_counter() - started,
            "sides": [],
        }
        for side in args.sides:
            row = measure(backend, manifest, merged_path, side, args.warmup, args.steps)
            report["sides"].append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
