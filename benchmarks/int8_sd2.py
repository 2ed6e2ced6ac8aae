"""int8 (Q/DQ) vs fp32 on onnxruntime CPU at full SD2 size: latency per UNet/ControlNet call and PSNR.

Not part of CI. Expects the full-size checkout of benchmarks/export_sd2.py (same --work); the
int8 build reuses that bundle's fp32/fp16 graphs from the cache and adds the calibrated
int8 UNet and ControlNet.

    python benchmarks/int8_sd2.py --work /tmp/seesr-sd2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "runtime")]

from seesr_runtime.lazy import lazy_import
from seesr_runtime.manifest import Manifest

# Loads torch: imported after the build (a subprocess), so this process holds no torch meanwhile.
export = lazy_import("seesr_export.export", extra="export")

SAMPLE = ROOT / "seesr_export" / "assets" / "sample.png"


def calibration_images(folder: Path) -> Path:
    """The bundled sample and two variants of it (mirrored, rotated): small real-looking LR images."""
    folder.mkdir(parents=True, exist_ok=True)
    sample = Image.open(SAMPLE).convert("RGB")
    for name, image in [("sample", sample), ("mirror", ImageOps.mirror(sample)), ("rot", sample.rotate(180))]:
        image.save(folder / f"{name}.png")
    return folder


def time_call(session, feeds: dict, runs: int) -> dict:
    session.run(None, feeds)  # warm-up
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - started)
    return {"median_s": round(float(np.median(times)), 3), "p95_s": round(float(np.percentile(times, 95)), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/seesr-sd2"))
    parser.add_argument("--bundle", type=Path, default=None, help="default: WORK/engines-fp16/sd2")
    parser.add_argument("--calib-size", type=int, default=2)
    parser.add_argument("--calib-steps", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "cpu")
    args = parser.parse_args()

    bundle = args.bundle or args.work / "engines-fp16" / "sd2"
    calib = calibration_images(args.work / "calib")
    started = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "seesr_export.cli",
            "build",
            "--seesr-root",
            str(args.work / "checkout"),
            "--out",
            str(bundle),
            "--precision",
            "int8",
            "--calib-images",
            str(calib),
            "--calib-size",
            str(args.calib_size),
            "--calib-steps",
            str(args.calib_steps),
        ],
        check=True,
        env=dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'runtime'}"),
    )
    build_seconds = time.perf_counter() - started
    manifest = Manifest.load(bundle)
    env = {"B": 2, "h": 64, "w": 64}  # one guided step at 512 px
    rows = []
    for name in ("controlnet", "unet"):
        spec = manifest.spec(name)
        feeds = export.sample_feeds(spec, env, seed=0)
        row = {"network": name}
        for precision in ("fp32", "int8"):
            session = ort.InferenceSession(
                str(manifest.graph_path(name, precision)), providers=["CPUExecutionProvider"]
            )
            row[precision] = time_call(session, feeds, args.runs)
            del session
        row["speedup"] = round(row["fp32"]["median_s"] / row["int8"]["median_s"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    quality = manifest.data["quality"]["int8"]
    result = {
        "benchmark": "int8_sd2_cpu",
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "onnxruntime": ort.__version__,
        "env": env,
        "calibration": {"images": args.calib_size, "steps": args.calib_steps},
        "build_seconds": round(build_seconds, 1),
        "per_call": rows,
        "quality": quality,
        "note": "random-weight sd2 fixture: latency is meaningful, the error figures only roughly so",
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "int8_sd2.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"# onnxruntime CPU, int8 Q/DQ vs fp32, full SD2 size ({result['cores']} cores)",
        "",
        "| network (B=2, 64x64 latent) | fp32 median (s) | int8 median (s) | speed-up | int8 rel L2 vs fp32 |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['network']} | {r['fp32']['median_s']} | {r['int8']['median_s']} | {r['speedup']}x | "
            f"{quality['network_rel_l2_vs_fp32'][r['network']]:.2e} |"
        )
    lines += [
        "",
        f"End-to-end PSNR of the int8 pipeline against fp32 (same noise, {args.calib_steps} steps): "
        f"{quality['end_to_end_psnr_vs_fp32_db']:.1f} dB",
    ]
    (args.results / "int8_sd2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
