"""GPU memory of static-shape denoiser sessions: one, two and three latent shapes captured.

Each latent shape gets its own ControlNet and UNet session (fixed input shapes, a CUDA graph each),
all fed from one copy of the weights (``seesr_runtime.ort_device.SharedWeights``). This measures the
driver's per-process GPU memory after each shape is captured, beside the weights' own size, so the
"no copy of the weights per shape" claim is a figure:

    python benchmarks/ort_shapes_memory.py --bundle B --json out.json            # CUDA, fp16 graphs
    python benchmarks/ort_shapes_memory.py --bundle B --json out.json --dry-run  # CPU, fp32, no capture

Shapes (latent side): 64 (a 512 px image), 96 (the tile every tiled image uses), 80 (another size).
``--dry-run`` reports the peak host memory instead (the same code on the CPU provider).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "runtime")]

from seesr_runtime.backends import OnnxRuntimeBackend
from seesr_runtime.bench import gpu_memory_mb, peak_host_mb
from seesr_runtime.manifest import Manifest


def denoiser_feeds(manifest: Manifest, side: int, batch: int = 2) -> dict:
    rng = np.random.default_rng(side)
    env = {"B": batch, "h": side, "w": side}
    feeds = {}
    for network in ("controlnet", "unet"):
        for tensor in manifest.spec(network).inputs:
            if tensor.name not in feeds:
                feeds[tensor.name] = rng.standard_normal(tensor.concrete_shape(env)).astype(np.float32)
    feeds["timestep"] = np.full((batch,), 501.0, np.float32)
    feeds["conditioning_scale"] = np.array(1.0, np.float32)
    return feeds


def denoiser_backend(manifest: Manifest, dry_run: bool) -> OnnxRuntimeBackend:
    """The GPU scripts' setup: CUDA, fp16 (the GPU graphs), a CUDA graph per static shape; on a dry run the same
    static-shape code on the CPU provider with the fp32 graphs."""
    if dry_run:
        return OnnxRuntimeBackend(manifest, precision="fp32", static_shapes=True)
    return OnnxRuntimeBackend(manifest, precision="fp16", providers=["cuda", "cpu"], cuda_graph=True)


def one_step(backend: OnnxRuntimeBackend, manifest: Manifest, feeds: dict) -> None:
    """ControlNet then UNet, residuals left on the device, as the pipeline's predict_noise does."""
    control_spec, unet_spec = manifest.spec("controlnet"), manifest.spec("unet")
    residuals = backend.run_on_device("controlnet", {n: feeds[n] for n in control_spec.input_names})
    unet_feeds = {n: feeds[n] for n in unet_spec.input_names if n in feeds}
    backend.run("unet", {**unet_feeds, **dict(zip(control_spec.output_names, residuals))})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--sides", type=int, nargs="+", default=[64, 96, 80], help="latent sides, in order")
    parser.add_argument("--calls", type=int, default=3, help="calls per shape (warm-up, capture, replay)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--dry-run", action="store_true", help="CPU provider, fp32, no CUDA graph")
    args = parser.parse_args()

    manifest = Manifest.load(args.bundle)
    backend = denoiser_backend(manifest, args.dry_run)
    memory = peak_host_mb if args.dry_run else gpu_memory_mb
    report = {
        "device": backend.device,
        "cuda_graph": backend.cuda_graph,
        "unit": "MB",
        "measure": "peak host RSS" if args.dry_run else "driver's per-process GPU memory",
        "graphs": {n: backend.graph_precision(n) for n in ("controlnet", "unet")},
        "after_shapes": [],
    }
    for count, side in enumerate(args.sides, start=1):
        feeds = denoiser_feeds(manifest, side)
        for _ in range(args.calls):
            one_step(backend, manifest, feeds)
        weights = {n: w.nbytes / 1024**2 for n, w in backend._weights.items()}
        row = {
            "shapes": count,
            "latent_sides": args.sides[:count],
            "memory_mb": memory(),
            "shared_weights_mb": weights,
            "sessions": len(backend._calls),
        }
        report["after_shapes"].append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
