"""``seesr``: the runtime command line (torch-free)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

from PIL import Image

from . import __version__, doctor, logs
from . import options as option_table
from .backends import compile_count
from .bench import (
    FORMAT,
    BenchConfig,
    bundle_info,
    format_table,
    git_commit,
    gpu_memory_mb,
    machine_info,
    peak_host_mb,
    run_bench,
    versions,
    write_json,
)
from .errors import BundleError, ImageRejected, SeeSRError
from .filemodes import remove_stale_temporaries, write_atomically
from .inputs import expand_inputs, load_lr_image
from .lazy import lazy_import
from .manifest import Manifest
from .ort_backend import IO_BINDING_MODES
from .pipeline import SeeSRPipeline, UpscaleResult
from .profiling import StageProfiler

log = logging.getLogger(__name__)

tqdm = lazy_import("tqdm")  # loaded with the first progress bar: seesr-export imports this module at start-up


class StopRequests:
    """SIGINT or SIGTERM during a batch: finish the current image, then stop (``signal`` says which);
    a second one stops at once (KeyboardInterrupt). Outputs are written atomically either way."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}  # signal -> the handler it had before

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        log.info(f"{signal.Signals(signum).name}: stopping after the current image (again to stop now)")


def cmd_upscale(args: argparse.Namespace) -> int:
    given = option_table.given_in(args)  # bad values fail here, before the bundle loads
    budget = option_table.given_in(args, option_table.PIPELINE_NAMES).get("memory_budget")
    files = expand_inputs(args.inputs)
    if not files:
        print("error: no input images found", file=sys.stderr)
        return 2
    choose_default(args)
    backend_options = backend_options_from(args)
    pipe = SeeSRPipeline.from_bundle(
        args.bundle,
        backend=args.backend,
        tiled_vae_spill_dir=args.tiled_vae_spill_dir,
        verify="never" if args.no_verify else "auto",
        memory_budget=budget,
        **backend_options,
    )
    options = pipe.resolve_options(given)  # with the bundle's defaults: the rules between options
    remove_stale_temporaries(args.output, ".png")
    remove_stale_temporaries(args.output / "txt", ".txt")
    done, skipped, failed = 0, 0, []
    with StopRequests() as stop:
        for path in tqdm.tqdm(files, desc="images", unit="img", disable=not logs.progress_enabled(), file=sys.stderr):
            if stop.signal is not None:
                break
            target = args.output / f"{path.stem}.png"
            if args.skip_existing and target.exists():
                skipped += 1
                continue
            try:
                lr, note = load_lr_image(path, options["max_pixels"])
            except (ImageRejected, OSError) as exc:
                log.error(f"{path}: {exc}")
                failed.append(path)
                continue
            if note:
                log.info(f"note: {path}: {note}")
            result = _upscale_one(pipe, lr, path.name, options)
            write_atomically(target, partial(result.image.save, format="PNG"))
            if args.save_prompts:
                write_atomically(
                    args.output / "txt" / f"{path.stem}.txt",
                    partial(_write_text, text=result.prompt),
                )
            log.info(f"{path} -> {target} ({result.image.size[0]}x{result.image.size[1]})")
            done += 1
    summary = f"{done} upscaled, {skipped} skipped, {len(failed)} failed" + (
        ": " + ", ".join(str(p) for p in failed) if failed else ""
    )
    if stop.signal is not None:
        left = len(files) - done - skipped - len(failed)
        summary += (
            f"; stopped by {signal.Signals(stop.signal).name} with {left} not started "
            "(rerun with --skip-existing to finish)"
        )
    print(summary, file=sys.stderr)
    return 128 + stop.signal if stop.signal is not None else 1 if failed else 0


def _write_text(path: str, text: str) -> None:
    Path(path).write_text(text)


def _upscale_one(pipe: SeeSRPipeline, lr: Image.Image, name: str, options: dict[str, Any]) -> UpscaleResult:
    hidden = not logs.progress_enabled()
    compiles_before = compile_count(pipe.backend)
    start = time.perf_counter()
    with tqdm.tqdm(total=options["steps"], desc=name, unit="step", leave=False, disable=hidden, file=sys.stderr) as bar:
        result = pipe(lr, callback=lambda i, t: bar.update(1), **options)
    compiles_after = compile_count(pipe.backend)
    compiled = "" if compiles_after is None else f", {compiles_after - (compiles_before or 0)} compiles"
    log.debug(f"{name}: {time.perf_counter() - start:.2f} s{compiled}")
    return result


def cmd_bench(args: argparse.Namespace) -> int:
    image = None
    if args.image is not None:
        try:
            image, _ = load_lr_image(args.image)
        except (ImageRejected, OSError) as exc:
            print(f"error: {args.image}: {exc}", file=sys.stderr)
            return 2
    budget = option_table.given_in(args, option_table.PIPELINE_NAMES).get("memory_budget")
    profiler = StageProfiler()
    backend_options = backend_options_from(args)
    start = time.perf_counter()
    pipe = SeeSRPipeline.from_bundle(
        args.bundle,
        backend=args.backend,
        profiler=profiler,
        verify="never" if args.no_verify else "auto",
        memory_budget=budget,
        **backend_options,
    )
    if hasattr(pipe.backend, "load_all") and budget is None:
        # sessions open before timing, so a run without warm-up is not a cold start (under a budget each
        # image loads its networks stage by stage: that cost is what is measured)
        pipe.backend.load_all()
    load_s = time.perf_counter() - start
    on_gpu = args.backend == "tensorrt" or any(
        p.lower() in ("cuda", "tensorrt") or "CUDA" in p or "Tensorrt" in p for p in (args.providers or [])
    )
    label = args.label or f"{args.backend} {args.precision}"
    step_counts = args.steps or [pipe.defaults["steps"]]  # the bundle's default: 2 for a turbo bundle
    if len(step_counts) not in (1, len(args.size)):
        print(
            f"error: --steps takes one value or one per --size ({len(args.size)}), got {len(step_counts)}",
            file=sys.stderr,
        )
        return 2
    results = []
    for size, steps in zip(args.size, step_counts * len(args.size) if len(step_counts) == 1 else step_counts):
        config = BenchConfig(
            size=size,
            steps=steps,
            runs=args.runs,
            warmup=args.warmup,
            seed=args.seed,
            guidance=args.guidance,
            peak_tflops=args.peak_tflops,
            reference_steps=pipe.defaults["steps"],  # e2e is also extrapolated to the bundle's default
        )
        log.info(f"bench {label}: {size} px, {steps} steps, {args.warmup} warm-up + {args.runs} timed")
        report = run_bench(
            pipe,
            profiler,
            config,
            image,
            progress=lambda i, s: log.info(f"  {'warm-up' if i < args.warmup else 'run'} {i + 1}: {s:.3f} s"),
        )
        report["memory"] = {"peak_host_mb": peak_host_mb(), "peak_gpu_mb": gpu_memory_mb() if on_gpu else None}
        results.append(report)
        if not args.quiet:
            print(f"== {label}, {size} px ==")
            print(format_table(report), flush=True)
    summary = {
        "format": FORMAT,
        "version": 1,
        "label": label,
        "backend": {
            "name": args.backend,
            "precision": args.precision,
            "providers": [args.device or "CPU"] if args.backend == "openvino" else args.providers or ["cpu"],
            # what actually ran where a backend can fall back (openvino: bf16 without bf16 units)
            "inference_precision": getattr(pipe.backend, "inference_precision", None),
        },
        "load_s": load_s,
        "machine": machine_info(),
        "versions": versions(),
        "commit": git_commit(),
        "bundle": bundle_info(pipe.manifest),
        "results": results,
    }
    if args.json:
        write_json(Path(args.json), summary)
        log.info(f"wrote {args.json}")
    return 0


def add_backend_args(p: argparse.ArgumentParser, machine_default: bool = False) -> None:
    """Backend choice and options, shared by upscale and bench. ``machine_default``: without --backend,
    --precision, --providers and --device, run doctor's recommendation (see choose_default) instead of
    onnxruntime fp32."""
    p.add_argument(
        "--backend",
        default=None if machine_default else "onnxruntime",
        choices=["onnxruntime", "tensorrt", "openvino"],
        help="inference backend (tensorrt: a bundle built with --backend tensorrt, an NVIDIA GPU; "
        "openvino: needs the 'openvino' extra; bf16/int8 on CPUs with those units, Intel GPUs)"
        + (
            "; default (with none of --backend, --precision, --providers, --device): what `seesr doctor` "
            "recommends: onnxruntime on CUDA with an NVIDIA GPU and onnxruntime-gpu, else openvino bf16 on "
            "CPUs with bf16 units (the fastest measured CPU configuration within 35 dB of fp32) or openvino "
            "fp32 where OpenVINO is installed, else onnxruntime fp32"
            if machine_default
            else ""
        ),
    )
    p.add_argument(
        "--providers",
        nargs="+",
        default=None,
        help="onnxruntime execution providers in order, e.g. cuda cpu (default: cpu)",
    )
    p.add_argument(
        "--precision",
        default=None if machine_default else "fp32",
        choices=["fp32", "fp16", "bf16", "int8", "int8-bf16"],
        help="which graphs of the bundle to run and how: fp16 is for GPU providers (openvino: f16 "
        "inference precision, Intel GPUs); int8 (bundles built with --precision int8) runs the "
        "Q/DQ UNet and ControlNet; bf16 and int8-bf16 (openvino) compute in bfloat16 on CPUs "
        "with bf16 units (f32 with a warning elsewhere)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="intra-op threads (default: the backend's choice, all cores)"
    )
    p.add_argument(
        "--device",
        default=None,
        help="openvino device: CPU (default), GPU (Intel graphics), AUTO, or any OpenVINO device name",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="openvino: keep prepared models and OpenVINO's compiled-model cache here, so later "
        "starts skip compilation (GBs at SD2 size)",
    )
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="capture each engine launch (tensorrt) or each static-shape denoiser session (onnxruntime "
        "with the CUDA provider) as a CUDA graph and replay it",
    )
    p.add_argument(
        "--io-binding",
        choices=list(IO_BINDING_MODES),
        default="auto",
        help="onnxruntime: embeddings, control image and ControlNet residuals stay on the device "
        "(auto: on with a GPU provider)",
    )
    p.add_argument(
        "--static-shapes",
        action="store_true",
        help="onnxruntime: one UNet/ControlNet session per input shape (shape arithmetic folded, "
        "weights shared); implied by --cuda-graph",
    )
    p.add_argument(
        "--no-gpu-graph",
        action="store_true",
        help="onnxruntime fp16 on CUDA: run the plain fp16 graphs instead of the fused GPU graphs",
    )
    p.add_argument(
        "--cpu-arena",
        choices=["none", "shared", "per-session"],
        default="none",
        help="onnxruntime CPU memory: none frees buffers after each call (least memory); shared "
        "keeps one arena for all networks (~10%% faster, more memory); per-session is "
        "onnxruntime's default (most memory) (default none)",
    )


OPENVINO_ONLY_PRECISIONS = ("bf16", "int8-bf16")


def choose_default(args: argparse.Namespace) -> None:
    """Fill in args.backend and args.precision (and --providers) where the user gave none of --backend,
    --precision, --providers and --device: doctor's recommendation for this machine and bundle, announced
    with the reason. Otherwise only what is missing: the backend the precision or device needs, fp32."""
    if args.backend is None and args.precision is None and args.providers is None and args.device is None:
        chosen = doctor.recommend(doctor.gather_facts(Manifest.load(args.bundle, verify="never")))
        args.backend, args.precision = chosen.backend, chosen.precision
        args.providers = list(chosen.providers) if chosen.providers else None
        log.info(f"note: running {chosen.label} ({chosen.reason}; `seesr doctor` explains, --backend overrides)")
        for hint in chosen.hints:
            log.info(f"note: faster: {hint}")
        return
    if args.backend is None:
        args.backend = "openvino" if args.precision in OPENVINO_ONLY_PRECISIONS or args.device else "onnxruntime"
    if args.precision is None:
        args.precision = "fp32"


def backend_options_from(args: argparse.Namespace) -> dict[str, Any]:
    if args.backend != "openvino":
        if args.precision in OPENVINO_ONLY_PRECISIONS:
            raise BundleError(
                f"--precision {args.precision} needs --backend openvino ({args.backend} runs fp32, fp16 or int8 graphs)"
            )
        if args.device is not None or args.cache_dir is not None:
            raise BundleError("--device and --cache-dir are options of --backend openvino")
    if args.backend == "openvino":
        return {
            "precision": args.precision,
            "threads": args.threads,
            "device": args.device or "CPU",
            "cache_dir": args.cache_dir,
            "providers": args.providers,
            "cuda_graph": args.cuda_graph,
        }
    options = {"precision": args.precision, "providers": args.providers, "threads": args.threads}
    if args.cuda_graph:
        options["cuda_graph"] = True
    if args.backend == "onnxruntime":
        options["cpu_arena"] = args.cpu_arena
        options["io_binding"] = IO_BINDING_MODES[args.io_binding]
        options["static_shapes"] = args.static_shapes
        options["gpu_graph"] = not args.no_gpu_graph
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seesr", description="Run SeeSR from an exported bundle, without PyTorch.")
    parser.add_argument("--version", action="version", version=f"seesr-runtime {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "upscale",
        help="x4 super-resolution of images with a bundle",
        description="Upscale images (files or directories) with a SeeSR bundle. Options left out "
        "take the bundle's defaults (those of the official test_seesr.py).",
    )
    p.add_argument("inputs", nargs="+", type=Path, help="LR images, or directories of images")
    p.add_argument("-o", "--output", type=Path, required=True, help="output directory (PNG, same stem as the input)")
    p.add_argument("--bundle", type=Path, required=True, help="bundle directory written by seesr-export build")
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the sha256 check of the bundle's files (by default files new or changed since "
        "their last check are hashed; use when you verify the bundle otherwise)",
    )
    add_backend_args(p, machine_default=True)
    option_table.add_arguments(p)
    option_table.add_arguments(p, option_table.PIPELINE_NAMES)
    p.add_argument(
        "--tiled-vae-spill-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="keep the tiled VAE's waiting tiles in files under DIR (very large outputs in little memory; same result)",
    )
    p.add_argument("--save-prompts", action="store_true", help="also write each prompt to OUTPUT/txt/NAME.txt")
    p.add_argument("--skip-existing", action="store_true", help="leave inputs whose output PNG exists")
    add_verbosity_args(p, quiet_help="no progress bars or notes; errors and summary only")
    p.set_defaults(func=cmd_upscale)

    p = sub.add_parser(
        "bench",
        help="per-stage and end-to-end latency of a bundle on this machine",
        description="Upscale a synthetic LR image (size/4 pixels per side) x4, WARMUP untimed times "
        "then RUNS timed times, and report every stage (median, p95 per call and per "
        "image), end to end, images/s and peak memory. No PyTorch needed; "
        "benchmarks/bench.py runs the PyTorch reference beside it.",
    )
    p.add_argument("--bundle", type=Path, required=True, help="bundle directory written by seesr-export build")
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the sha256 check of the bundle's files (by default files new or changed since "
        "their last check are hashed; use when you verify the bundle otherwise)",
    )
    add_backend_args(p)
    p.add_argument(
        "--size",
        type=int,
        nargs="+",
        default=[512],
        help="output side(s) in pixels: 512 (one 64x64 latent), 1024 (4 latent tiles), 2048; several "
        "sizes share one session load (default 512)",
    )
    p.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=None,
        help="DDPM steps per image, one value or one per --size (default: the bundle's; "
        f"{option_table.default('steps')} in a standard bundle); fewer steps are also extrapolated to that default",
    )
    p.add_argument("--runs", type=int, default=3, help="timed images (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed images first (default 1)")
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help=f"guidance (default: the bundle's; {option_table.default('guidance')} in a standard bundle)",
    )
    p.add_argument("--seed", type=int, default=0, help="noise and synthetic-image seed")
    p.add_argument("--image", type=Path, default=None, help="an LR image to use instead of the synthetic one")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's stated peak TFLOP/s; adds each network's fraction of it",
    )
    option_table.add_arguments(p, option_table.PIPELINE_NAMES)
    p.add_argument("--label", default=None, help="name of this configuration in the report")
    p.add_argument("--json", type=Path, default=None, help="write the full report here (JSON)")
    add_verbosity_args(p, quiet_help="print nothing but errors")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "doctor",
        help="what this machine can run, and the seesr upscale command to type",
        description="Report the CPU's features (AVX-512, AVX512_BF16, AMX, VNNI), the engines installed "
        "(onnxruntime and its providers, OpenVINO and its devices, TensorRT), NVIDIA GPUs, free memory and "
        "disk; with --bundle, verify the bundle and list what it holds. Then recommend a seesr upscale "
        "command line for this machine, with the time committed measurements lead one to expect.",
    )
    p.add_argument("--bundle", type=Path, default=None, help="a bundle directory to verify and recommend a command for")
    p.add_argument("--json", action="store_true", help="print the report as JSON (keys: seesr_runtime.doctor)")
    add_verbosity_args(p, quiet_help="print nothing but the report and errors")
    p.set_defaults(func=doctor.cmd_doctor)
    return parser


def add_verbosity_args(p: argparse.ArgumentParser, quiet_help: str) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help=quiet_help)
    p.add_argument(
        "-v", "--verbose", action="count", default=0, help="also details: sessions, shapes, per-file checks (DEBUG)"
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.quiet, args.verbose)
    return run_command(args.func, args)


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``func(args)``, with every error a user can cause or fix (SeeSRError; OSError: a file, a folder, the
    disk) as one line on stderr and exit status 2, never a traceback; Ctrl-C: 130."""
    try:
        return func(args)
    except (SeeSRError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
