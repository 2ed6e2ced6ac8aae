"""Seconds per upscale: the native runtime (libseesr, through its C ABI) against the Python runtime, on the same
engine (OpenVINO fp32 on the CPU), bundle, image, options and thread count.

    python benchmarks/native_vs_python.py BUNDLE [--size 64] [--steps 10] [--threads 2] [--runs 3]

Needs runtime/cpp built (`make cpp`). Each side runs once untimed (OpenVINO compiles its models), then `--runs`
times; the median is reported. Run both quiet and at the same priority: they share nothing but the machine.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from seesr_runtime.manifest import Manifest
from seesr_runtime.openvino_backend import OpenVINOBackend
from seesr_runtime.pipeline import SeeSRPipeline

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "runtime" / "cpp" / "python"))  # the C ABI's ctypes declarations

from seesr_capi import VERIFY_NEVER, call, load_library, open_pipeline

LIBRARY = ROOT / "runtime" / "cpp" / "build" / "libseesr.so"


def native_upscaler(bundle: Path, threads: int, options: dict):
    """A function upscaling an RGB8 array through libseesr."""
    lib = load_library(LIBRARY)
    pipeline, handle = open_pipeline(lib, bundle, threads=threads, verify=VERIFY_NEVER), ctypes.c_void_p()
    call(lib, "seesr_options_create", pipeline, ctypes.byref(handle))
    for name, value in options.items():
        kind = "string" if isinstance(value, str) else "int"
        call(lib, f"seesr_options_set_{kind}", handle, name.encode(), value.encode() if kind == "string" else value)

    def upscale(image: np.ndarray) -> None:
        rows = np.ascontiguousarray(image)
        out = ctypes.c_void_p()
        height, width, _ = rows.shape
        buffer = rows.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        call(lib, "seesr_upscale", pipeline, buffer, width, height, 3 * width, handle, ctypes.byref(out))
        lib.seesr_image_free(out)

    return upscale


def median_seconds(run, image: np.ndarray, runs: int) -> float:
    run(image)  # compiles the models
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        run(image)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--size", type=int, default=64, help="side of the square input image (px)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    options = dict(steps=args.steps, seed=1, color_fix="wavelet")

    manifest = Manifest.load(args.bundle, verify="never")
    python = SeeSRPipeline(manifest, OpenVINOBackend(manifest, precision="fp32", threads=args.threads))
    python_seconds = median_seconds(lambda lr: python(lr, **options), image, args.runs)
    native_seconds = median_seconds(native_upscaler(args.bundle, args.threads, options), image, args.runs)
    print(
        f"{args.size}x{args.size} px, {args.steps} steps, OpenVINO fp32, {args.threads} threads, median of {args.runs}:"
        f" Python runtime {python_seconds:.2f} s, native runtime {native_seconds:.2f} s"
        f" ({python_seconds / native_seconds:.2f}x)"
    )


if __name__ == "__main__":
    main()
