"""``seesr``: the runtime command line (torch-free)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from . import __version__, doctor, logs, ray_batch, ui
from . import options as option_table
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
from .errors import ImageRejected, OptionError, SeeSRError
from .filemodes import remove_stale_temporaries
from .inputs import expand_inputs, load_lr_image
from .lazy import imported, lazy_import
from .ort_backend import IO_BINDING_MODES
from .pipeline import SeeSRPipeline
from .profiling import StageProfiler
from .upscaling import (
    backend_options_from,
    choose_default,
    open_pipeline,
    output_png,
    summary_line,
    upscale_and_write,
)

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
    if args.ray is not None:
        return ray_batch.run_ray_batch(args, given)
    if args.ray_actors is not None or args.job_record is not None:
        raise OptionError("--ray-actors and --job-record are options of --ray (a batch on a Ray cluster)")
    files = expand_inputs([Path(given) for given in args.inputs])
    if not files:
        print("error: no input images found", file=sys.stderr)
        return 2
    pipe, options = open_pipeline(args, given)
    remove_stale_temporaries(args.output, ".png")
    remove_stale_temporaries(args.output / "txt", ".txt")
    done, skipped, failed = 0, 0, []
    with StopRequests() as stop:
        for path in tqdm.tqdm(files, desc="images", unit="img", disable=not logs.progress_enabled(), file=sys.stderr):
            if stop.signal is not None:
                break
            if args.skip_existing and output_png(args.output, path.name).exists():
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
            target, result = upscale_and_write(pipe, lr, path.name, options, args.output, args.save_prompts)
            log.info(f"{path} -> {target} ({result.image.size[0]}x{result.image.size[1]})")
            done += 1
    summary = summary_line(done, skipped, failed)
    if stop.signal is not None:
        left = len(files) - done - skipped - len(failed)
        summary += (
            f"; stopped by {signal.Signals(stop.signal).name} with {left} not started "
            "(rerun with --skip-existing to finish)"
        )
    print(summary, file=sys.stderr)
    return 128 + stop.signal if stop.signal is not None else 1 if failed else 0


def cmd_ui(args: argparse.Namespace) -> int:
    if args.concurrency < 1:
        raise OptionError(f"--concurrency must be an integer >= 1, got {args.concurrency}", "concurrency")
    if not 0 <= args.port <= 65535:
        raise OptionError(f"--port must be an integer in [0, 65535], got {args.port}", "port")
    settings = ui.ServerSettings(
        host=args.host,
        port=args.port,
        concurrency=args.concurrency,
        max_file_size=option_table.parse_byte_size("max_file_size", args.max_file_size),
        max_pixels=option_table.given_in(args, ["max_pixels"]).get("max_pixels", option_table.default("max_pixels")),
    )
    budget = option_table.given_in(args, option_table.PIPELINE_NAMES).get("memory_budget")
    with ui.server_folder() as work:
        imported(ui.gr)  # a missing extra is named before the bundle loads
        choose_default(args)
        pipe = SeeSRPipeline.from_bundle(
            args.bundle,
            backend=args.backend,
            verify="never" if args.no_verify else "auto",
            memory_budget=budget,
            **backend_options_from(args),
        )
        if hasattr(pipe.backend, "load_all") and budget is None:
            pipe.backend.load_all()  # every session open before the first job (under a budget, each job's stages)
        return ui.serve(pipe, settings, work)


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


def add_no_verify_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the sha256 check of the bundle's files (by default files new or changed since "
        "their last check are hashed; use when you verify the bundle otherwise)",
    )


def add_backend_args(p: argparse.ArgumentParser, machine_default: bool = False) -> None:
    """Backend choice and options, shared by upscale and bench. ``machine_default``: without --backend,
    --precision, --providers and --device, run doctor's recommendation (see upscaling.choose_default) instead of
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
    # strings, not Paths: with --ray an input may be a URL, whose "//" a Path would collapse
    p.add_argument("inputs", nargs="+", help="LR images, or directories of images (--ray: also list files and URLs)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output directory (PNG, same stem as the input)")
    p.add_argument("--bundle", type=Path, required=True, help="bundle directory written by seesr-export build")
    add_no_verify_arg(p)
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
    p.add_argument(
        "--ray",
        nargs="?",
        const="auto",
        default=None,
        metavar="ADDRESS",
        help="run the batch on a Ray cluster with Ray Data (the 'ray' extra; docs/scale-out.md): ADDRESS is "
        "HOST:PORT or ray://HOST:PORT; alone, RAY_ADDRESS or the cluster running here, else a new local one. "
        "INPUT may then also be a list file (one path or URL a line) or an fsspec URL; the bundle and OUTPUT "
        "must be at the same path on every node",
    )
    p.add_argument(
        "--ray-actors",
        type=int,
        default=None,
        metavar="N",
        help="--ray: pipelines to run (default: one per GPU with a GPU backend, else as many as the nodes' "
        "cores hold at --threads cores each; --threads defaults to the smallest node's cores)",
    )
    p.add_argument(
        "--job-record",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"--ray: append one JSON line per image here (default OUTPUT/{ray_batch.RECORD_NAME})",
    )
    add_verbosity_args(p, quiet_help="no progress bars or notes; errors and summary only")
    p.set_defaults(func=cmd_upscale)

    p = sub.add_parser(
        "ui",
        help="a web page to upscale images in a browser (the 'ui' extra)",
        description="Serve a web page (Gradio) to upscale images with a bundle: upload, options with the "
        "bundle's defaults, before/after comparison, tags and prompt, progress, cancel, PNG download (the "
        "bytes seesr upscale writes). One pipeline, loaded at start, serves every browser through a queue. "
        "No outbound requests; temporary files are removed when it stops. docs/ui.md has the details.",
    )
    p.add_argument("--bundle", type=Path, required=True, help="bundle directory written by seesr-export build")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 serves every interface, "
        "with no authentication)",
    )
    p.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    p.add_argument(
        "--concurrency", type=int, default=1, help="jobs run at once; the others wait in the queue (default 1)"
    )
    p.add_argument(
        "--max-file-size",
        default="50MB",
        metavar="SIZE",
        help="the largest upload accepted, e.g. 20MB, 1GiB (default 50MB)",
    )
    add_no_verify_arg(p)
    add_backend_args(p, machine_default=True)
    option_table.add_arguments(p, ui.SERVER_OPTIONS)
    option_table.add_arguments(p, option_table.PIPELINE_NAMES)
    add_verbosity_args(p, quiet_help="errors only")
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser(
        "bench",
        help="per-stage and end-to-end latency of a bundle on this machine",
        description="Upscale a synthetic LR image (size/4 pixels per side) x4, WARMUP untimed times "
        "then RUNS timed times, and report every stage (median, p95 per call and per "
        "image), end to end, images/s and peak memory. No PyTorch needed; "
        "benchmarks/bench.py runs the PyTorch reference beside it.",
    )
    p.add_argument("--bundle", type=Path, required=True, help="bundle directory written by seesr-export build")
    add_no_verify_arg(p)
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
