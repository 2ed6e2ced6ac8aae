"""Does SeeSR's image cross-attention belong on the int8 exclusion list? And does percentile
calibration of convolution inputs help? Measured, not assumed.

Builds the same bundle with ModelOpt int8 three ways, calibrating through the real sampler each time:
the default recipe (image cross-attention quantized, conv inputs at the 99.99th percentile), image
cross-attention kept in fp32, and conv inputs at their plain max. Reports each network's held-out
relative L2 against fp32 and the end-to-end PSNR (same noise), into results/cpu/int8_image_attention.*

    python benchmarks/int8_image_attention.py                       # tiny fixture, ~10 min on 2 cores
    python benchmarks/int8_image_attention.py --seesr-root CHECKOUT  # e.g. the full-size random weights
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "runtime"), str(ROOT / "benchmarks")]

from int8_sd2 import calibration_images

from seesr_export.bundle import BuildOptions, build_bundle
from seesr_export.layout import SeeSRPaths
from seesr_export.progress import Progress
from seesr_export.testing.fixtures import write_fixture
from seesr_runtime import logs
from seesr_runtime.bench import git_commit, machine_info
from seesr_runtime.manifest import Manifest

VARIANTS = {
    "default (image attention int8, conv p99.99)": {},
    "image attention kept fp32": {"int8_image_attention_fp32": True},
    "conv inputs at max": {"int8_conv_percentile": 100.0},
}


def main() -> int:
    logs.configure()  # the builds' stage messages on stderr
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seesr-root", type=Path, default=None, help="default: a fresh tiny fixture")
    parser.add_argument("--calib-size", type=int, default=3)
    parser.add_argument("--calib-steps", type=int, default=3)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "cpu")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="seesr-int8-exp-") as scratch:
        scratch = Path(scratch)
        paths = (
            SeeSRPaths.from_root(args.seesr_root)
            if args.seesr_root
            else write_fixture(scratch / "checkout", size="tiny", seed=0)
        )
        images = sorted(calibration_images(scratch / "calib").iterdir())
        rows = []
        for label, overrides in VARIANTS.items():
            options = BuildOptions(
                precision="int8",
                verify=False,
                calib_images=tuple(images),
                calib_size=args.calib_size,
                calib_steps=args.calib_steps,
                quant_method="modelopt",
                **overrides,
            )
            started = time.perf_counter()
            build_bundle(paths, scratch / "bundle", options, Progress(quiet=False))
            quality = Manifest.load(scratch / "bundle").data["quality"]["int8"]
            rows.append(
                {
                    "variant": label,
                    "options": overrides,
                    "seconds": time.perf_counter() - started,
                    **{k: quality[k] for k in ("network_rel_l2_vs_fp32", "end_to_end_psnr_vs_fp32_db", "settings")},
                }
            )
            print(json.dumps(rows[-1]), flush=True)

    fixture = "tiny random-weight fixture" if args.seesr_root is None else str(args.seesr_root)
    result = {
        "machine": machine_info(),
        "commit": git_commit(),
        "checkout": fixture,
        "calib_size": args.calib_size,
        "calib_steps": args.calib_steps,
        "variants": rows,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "int8_image_attention.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"# int8 (ModelOpt SmoothQuant α 0.8) variants on the {fixture}",
        "",
        f"Calibrated through the sampler: {args.calib_size} images x {args.calib_steps} steps; error on "
        "held-out recorded calls; PSNR of the final image against the fp32 pipeline, same noise.",
        "",
        "| variant | ControlNet rel L2 | UNet rel L2 | end-to-end PSNR (dB) |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        errors = row["network_rel_l2_vs_fp32"]
        lines.append(
            f"| {row['variant']} | {errors['controlnet']:.2e} | {errors['unet']:.2e} | "
            f"{row['end_to_end_psnr_vs_fp32_db']:.1f} |"
        )
    (args.results / "int8_image_attention.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
