"""The OpenVINO engines across images and threads: seconds per image in a run (first image, later ones), shapes
compiled per image, and several threads sharing one native pipeline while a new shape compiles.

    # seconds and compiles per image, one process, images one after the other (--engine python or native)
    python benchmarks/openvino_threads.py serial BUNDLE --checkout DIR --engine python --json OUT.json
    # the tiled VAE encoder alone (Python runtime): seconds, compiles and resident memory per image
    python benchmarks/openvino_threads.py encoder BUNDLE --checkout DIR [--keep-working-memory] --json OUT.json
    # native: threads sharing one pipeline, two image sizes; throughput and the longest stall of a step
    python benchmarks/openvino_threads.py threads BUNDLE --checkout DIR --json OUT.json
    # the markdown table of several such JSON files, with the machine's CPU
    python benchmarks/openvino_threads.py report OUT.json ... > results.md

``--checkout`` is the source tree whose runtime is measured (its ``runtime/`` on the import path, its
``runtime/cpp/build/libseesr.so``): this one, or an older commit checked out elsewhere (``git worktree add``) to
compare before and after. Both sides read the same bundle with the same options.

serial: ``--images`` synthetic inputs of ``--size`` (default three 300x280, which the official defaults run with
latent tiles and the tiled VAE encoder), each timed on its own. The Python runtime's compiles are counted from its
log records ("openvino: compiling ..."), which older versions write too; the native runtime reports none.

threads: ``--threads`` threads share one native pipeline; thread i upscales ``--per-thread`` images of size
``sizes[i % 2]``. The first size is compiled before the clock starts (one image); the threads of the first size
start first, those of the second once every first-size thread has finished a step, so that the second size's
new shapes compile while the first size's threads run. Every step's end is recorded (the progress callback): the
report gives the throughput, each size's median step, and the longest gap between two steps of a first-size
thread once the second size started: the stall a compile inflicts on calls of shapes already compiled.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "seesr-openvino-threads"


def parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    return int(width), int(height or width)


def synthetic_image(width: int, height: int, seed: int) -> np.ndarray:
    """A structured, noisy RGB8 image (deterministic per seed)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 3 + 40 * seed, y * 2, (x + y) % 200], -1) % 256
    return (base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)


def cpu_description() -> dict[str, Any]:
    """The CPU's model name and the matrix features OpenVINO's bf16 and int8 kernels use, from lscpu."""
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    wanted = ("amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_vnni", "avx512f", "avx2")
    return {
        "model": fields.get("Model name", platform.processor()).strip(),
        "cpus": int(fields.get("CPU(s)", "0").strip() or 0),
        "features": [flag for flag in wanted if flag in flags],
    }


def checkout_commit(checkout: Path) -> str:
    run = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return run.stdout.strip()


def load_capi(checkout: Path) -> Any:
    sys.path.insert(0, str(checkout / "runtime" / "cpp" / "python"))
    import seesr_capi

    return seesr_capi


# ---------------------------------------------------------------- serial


class CompileCounter(logging.Handler):
    """Counts the OpenVINO backend's "compiling" records (every version writes one per compiled shape)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("openvino: compiling"):
            self.count += 1


def python_upscaler(checkout: Path, bundle: Path, precision: str, threads: int | None) -> tuple[Any, CompileCounter]:
    sys.path.insert(0, str(checkout / "runtime"))
    from seesr_runtime import SeeSRPipeline

    counter = CompileCounter()
    logger = logging.getLogger("seesr_runtime.openvino_backend")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(counter)
    options = {"threads": threads} if threads else {}
    pipe = SeeSRPipeline.from_bundle(bundle, backend="openvino", precision=precision, verify="never", **options)
    return pipe, counter


def run_serial(args: argparse.Namespace, save: Any) -> dict[str, Any]:
    width, height = parse_size(args.size)
    images = [synthetic_image(width, height, seed) for seed in range(args.images)]
    options = {"steps": args.steps, "seed": 0}
    seconds: list[float] = []
    compiles: list[int | None] = []
    result = {
        "kind": "serial",
        "engine": args.engine,
        "input_size": [width, height],
        "options": options,
        "seconds_per_image": seconds,  # filled image by image, and saved after each
        "compiles_per_image": compiles,
    }
    start = time.perf_counter()
    if args.engine == "python":
        pipe, counter = python_upscaler(args.checkout, args.bundle, args.precision, args.engine_threads)
        result["open_s"] = time.perf_counter() - start
        for image in images:
            before, begin = counter.count, time.perf_counter()
            pipe(image, **options)
            seconds.append(time.perf_counter() - begin)
            compiles.append(counter.count - before)
            save(result)
    else:
        capi = load_capi(args.checkout)
        native = Native(capi, args.checkout, args.bundle, args.precision, args.engine_threads)
        result["open_s"] = time.perf_counter() - start
        for image in images:
            begin = time.perf_counter()
            native.upscale(image, options)
            seconds.append(time.perf_counter() - begin)
            compiles.append(None)
            save(result)
        native.close()
    for i, (s, c) in enumerate(zip(seconds, compiles)):
        print(f"image {i + 1}: {s:.1f} s" + ("" if c is None else f", {c} compiles"), file=sys.stderr)
    return result


def memory_gb(key: str) -> float:
    """VmRSS or VmHWM (peak) of this process, in GB."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(key))
    return int(line.split()[1]) / 1024**2


def run_encoder(args: argparse.Namespace, save: Any) -> dict[str, Any]:
    """The tiled VAE encoder alone on the working image of a --size input (x4): seconds, compiles, memory."""
    width, height = parse_size(args.size)
    pipe, counter = python_upscaler(args.checkout, args.bundle, args.precision, args.engine_threads)
    if args.keep_working_memory and hasattr(pipe.backend, "release_working_memory"):  # held, never released
        pipe.backend.release_working_memory = lambda network: None
    x = np.random.default_rng(0).random((1, 3, 4 * height, 4 * width), dtype=np.float32) * 2 - 1
    tile = pipe.defaults["vae_encoder_tile_size"]
    rows = []
    for _ in range(args.images):
        before, begin = counter.count, time.perf_counter()
        pipe.run_vae("vae_encoder", x, tile)
        rows.append(
            {
                "seconds": time.perf_counter() - begin,
                "compiles": counter.count - before,
                "rss_gb": memory_gb("VmRSS"),
                "peak_rss_gb": memory_gb("VmHWM"),
            }
        )
        print(rows[-1], file=sys.stderr)
    return {
        "kind": "encoder",
        "engine": "python",
        "input_size": [width, height],
        "tile": tile,
        "keep_working_memory": args.keep_working_memory,
        # whether the runtime frees the working memory after each pass (older versions never do)
        "releases_working_memory": hasattr(pipe.backend, "release_working_memory") and not args.keep_working_memory,
        "images": rows,
    }


# ---------------------------------------------------------------- native, threads

PROGRESS_FN_ARGS = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32)


class Native:
    """One libseesr pipeline (of ``checkout``'s build) and upscales through it."""

    def __init__(self, capi: Any, checkout: Path, bundle: Path, precision: str, threads: int | None):
        self.capi = capi
        self.lib = capi.load_library(checkout / "runtime" / "cpp" / "build" / "libseesr.so")
        self.pipeline = capi.open_pipeline(
            self.lib, bundle, verify=capi.VERIFY_NEVER, precision=precision.encode(), threads=threads or 0
        )

    def upscale(self, image: np.ndarray, options: dict[str, int], progress: Any = None) -> None:
        handle, out = ctypes.c_void_p(), ctypes.c_void_p()
        self.capi.call(self.lib, "seesr_options_create", self.pipeline, ctypes.byref(handle))
        try:
            for name, value in options.items():
                self.capi.call(self.lib, "seesr_options_set_int", handle, name.encode(), value)
            if progress is not None:
                self.capi.call(self.lib, "seesr_options_set_progress", handle, progress, None)
            rows = np.ascontiguousarray(image)
            height, width, _ = rows.shape
            buffer = rows.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
            self.capi.call(
                self.lib, "seesr_upscale", self.pipeline, buffer, width, height, 3 * width, handle, ctypes.byref(out)
            )
            self.lib.seesr_image_free(out)
        finally:
            self.lib.seesr_options_free(handle)

    def close(self) -> None:
        self.lib.seesr_pipeline_close(self.pipeline)


def run_threads(args: argparse.Namespace, save: Any) -> dict[str, Any]:
    sizes = [parse_size(s) for s in args.sizes]
    options = {"steps": args.steps, "seed": 0}
    options.update({k: v for k, v in (("latent_tile_size", args.latent_tile_size),) if v})
    capi = load_capi(args.checkout)
    native = Native(capi, args.checkout, args.bundle, args.precision, args.engine_threads)
    warm = time.perf_counter()
    native.upscale(synthetic_image(*sizes[0], seed=99), options)  # the first size's shapes, compiled
    warm_s = time.perf_counter() - warm

    steps: list[tuple[int, float]] = []  # (thread, time of a step's end)
    lock = threading.Lock()
    first_size_stepped = threading.Barrier(len([i for i in range(args.threads) if i % 2 == 0]) + 1)
    errors: list[str] = []
    callbacks = []

    def worker(index: int) -> None:
        seen_first_step = False

        def progress(_: Any, step: int, total: int) -> int:
            nonlocal seen_first_step
            with lock:
                steps.append((index, time.perf_counter()))
            if index % 2 == 0 and not seen_first_step:
                seen_first_step = True
                first_size_stepped.wait()
            return 0

        callback = ctypes.CFUNCTYPE(*PROGRESS_FN_ARGS)(progress)
        callbacks.append(callback)  # alive as long as the calls that may invoke it
        try:
            for k in range(args.per_thread):
                native.upscale(synthetic_image(*sizes[index % 2], seed=10 * index + k), options, callback)
        except capi.SeeSRError as exc:  # reported in the result, not lost in a thread
            errors.append(f"thread {index}: {exc}")

    starts: dict[int, float] = {}
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.threads)]
    begin = time.perf_counter()
    for i, thread in enumerate(threads):
        if i % 2 == 0:
            starts[i] = time.perf_counter()
            thread.start()
    try:
        first_size_stepped.wait(timeout=3600)  # every first-size thread has finished a step: now the new size
    except threading.BrokenBarrierError:
        errors.append("the first size's threads did not all reach a step")
    second_start = time.perf_counter()
    for i, thread in enumerate(threads):
        if i % 2 == 1:
            starts[i] = time.perf_counter()
            thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - begin
    native.close()

    def gaps(index: int, after: float | None = None) -> list[float]:
        times = [starts[index]] + [t for i, t in steps if i == index]
        return [b - a for a, b in zip(times, times[1:]) if after is None or b > after]

    first = [i for i in range(args.threads) if i % 2 == 0]
    second = [i for i in range(args.threads) if i % 2 == 1]
    first_gaps_after = [g for i in first for g in gaps(i, second_start)]
    report = {
        "kind": "threads",
        "engine": "native",
        "sizes": [list(s) for s in sizes],
        "threads": args.threads,
        "per_thread": args.per_thread,
        "options": options,
        "warm_first_size_s": warm_s,
        "wall_s": wall,
        "images": args.threads * args.per_thread,
        "images_per_minute": 60 * args.threads * args.per_thread / wall,
        "median_step_s": {
            "first_size": statistics.median([g for i in first for g in gaps(i)[1:]] or [0.0]),
            "second_size": statistics.median([g for i in second for g in gaps(i)[1:]] or [0.0]),
        },
        "second_size_first_step_s": statistics.median([gaps(i)[0] for i in second if gaps(i)] or [0.0]),
        "longest_first_size_step_gap_s": max(first_gaps_after or [0.0]),
        "errors": errors,
    }
    print(json.dumps(report, indent=1), file=sys.stderr)
    return report


# ---------------------------------------------------------------- report


def report_markdown(paths: list[Path]) -> str:
    results = [json.loads(p.read_text()) for p in paths]
    cpu = results[0]["machine"]["cpu"]
    lines = [
        f"CPU: {cpu['model']}, {cpu['cpus']} CPUs, features {', '.join(cpu['features'])} (lscpu); "
        f"OpenVINO {results[0]['versions']['openvino']}.",
        "",
    ]
    serial = [r for r in results if r["result"]["kind"] == "serial"]
    if serial:
        lines += [
            "| code | engine | precision | input | steps | image 1 | image 2 | image 3 | compiles per image |",
            "|---|---|---|---|---:|---:|---:|---:|---|",
        ]
        for r in serial:
            s = r["result"]
            times = [f"{t:.1f} s" for t in s["seconds_per_image"]] + [""] * 3
            compiles = s["compiles_per_image"]
            counted = "—" if all(c is None for c in compiles) else ", ".join(str(c) for c in compiles)
            lines.append(
                f"| {r['label']} ({r['commit']}) | {s['engine']} | {r['precision']} | {s['input_size'][0]}x"
                f"{s['input_size'][1]} | {s['options']['steps']} | {' | '.join(times[:3])} | {counted} |"
            )
        lines.append("")
    encoders = [r for r in results if r["result"]["kind"] == "encoder"]
    if encoders:
        lines += [
            "| code | working memory | input | image | seconds | compiles | RSS after | peak RSS so far |",
            "|---|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in encoders:
            e = r["result"]
            kept = "released after each pass" if e["releases_working_memory"] else "kept"
            for i, row in enumerate(e["images"]):
                lines.append(
                    f"| {r['label']} ({r['commit']}) | {kept} | {e['input_size'][0]}x{e['input_size'][1]} | {i + 1} | "
                    f"{row['seconds']:.1f} | {row['compiles']} | {row['rss_gb']:.2f} GB | {row['peak_rss_gb']:.2f} GB |"
                )
        lines.append("")
    threaded = [r for r in results if r["result"]["kind"] == "threads"]
    if threaded:
        lines += [
            "| code | threads | sizes | images | wall | images/min | median step (1st size, 2nd size) | "
            "2nd size's first step | longest 1st-size step gap while the 2nd size starts | errors |",
            "|---|---:|---|---:|---:|---:|---|---:|---:|---|",
        ]
        for r in threaded:
            t = r["result"]
            sizes = " and ".join(f"{w}x{h}" for w, h in t["sizes"])
            median = t["median_step_s"]
            lines.append(
                f"| {r['label']} ({r['commit']}) | {t['threads']} | {sizes} | {t['images']} | {t['wall_s']:.0f} s | "
                f"{t['images_per_minute']:.2f} | {median['first_size']:.1f} s, {median['second_size']:.1f} s | "
                f"{t['second_size_first_step_s']:.1f} s | {t['longest_first_size_step_gap_s']:.1f} s | "
                f"{len(t['errors'])} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("serial", "encoder", "threads"):
        p = sub.add_parser(name)
        p.add_argument("bundle", type=Path)
        p.add_argument("--checkout", type=Path, required=True, help="source tree whose runtime is measured")
        p.add_argument("--label", default="", help="what the checkout is (e.g. before, after)")
        p.add_argument("--precision", default="bf16")
        p.add_argument("--engine-threads", type=int, default=None, help="OpenVINO inference threads")
        p.add_argument("--steps", type=int, default=1)
        p.add_argument("--json", type=Path, required=True)
    serial = sub.choices["serial"]
    serial.add_argument("--engine", choices=("python", "native"), default="python")
    serial.add_argument("--size", default="300x280", help="input WIDTHxHEIGHT")
    serial.add_argument("--images", type=int, default=3)
    encoder = sub.choices["encoder"]
    encoder.add_argument("--size", default="300x280", help="input WIDTHxHEIGHT (the encoder sees 4x that)")
    encoder.add_argument("--images", type=int, default=2)
    encoder.add_argument("--keep-working-memory", action="store_true", help="never release the working memory")
    threads = sub.choices["threads"]
    threads.add_argument("--sizes", nargs=2, default=["128x128", "160x128"], help="two input sizes, WIDTHxHEIGHT")
    threads.add_argument("--threads", type=int, default=4)
    threads.add_argument("--per-thread", type=int, default=1)
    threads.add_argument("--latent-tile-size", type=int, default=None)
    rep = sub.add_parser("report")
    rep.add_argument("results", type=Path, nargs="+")
    args = parser.parse_args()
    if args.command == "report":
        print(report_markdown(args.results), end="")
        return
    import openvino

    summary = {
        "format": FORMAT,
        "label": args.label,
        "commit": checkout_commit(args.checkout),
        "bundle": str(args.bundle),
        "precision": args.precision,
        "machine": {"cpu": cpu_description(), "system": platform.platform()},
        "versions": {"openvino": openvino.__version__, "python": platform.python_version()},
        "command": sys.argv,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)

    def save(result: dict[str, Any]) -> None:  # also midway: a run stopped early keeps what it measured
        args.json.write_text(json.dumps({**summary, "result": result}, indent=1) + "\n")

    save({"serial": run_serial, "encoder": run_encoder, "threads": run_threads}[args.command](args, save))


if __name__ == "__main__":
    main()
