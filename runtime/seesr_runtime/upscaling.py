"""One image through ``seesr upscale``: the pipeline the command line asks for, the image upscaled and its
outputs written. Shared by the one-machine batch (``cli.cmd_upscale``) and the Ray batch (``ray_batch``),
so the same options and seed give the same bytes on one machine and on a cluster."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image

from . import doctor, logs
from . import options as option_table
from .backends import compile_count
from .errors import BundleError
from .filemodes import save_png, write_atomically
from .lazy import lazy_import
from .manifest import Manifest
from .ort_backend import IO_BINDING_MODES
from .pipeline import SeeSRPipeline, UpscaleResult

log = logging.getLogger(__name__)

tqdm = lazy_import("tqdm")  # loaded with the first progress bar: seesr-export imports the CLI at start-up

OPENVINO_ONLY_PRECISIONS = ("bf16", "int8-bf16")


def open_pipeline(args: argparse.Namespace, given: dict[str, Any]) -> tuple[SeeSRPipeline, dict[str, Any]]:
    """The pipeline ``seesr upscale``'s parsed flags ask for (``choose_default`` filling in the backend where
    none was given), and every per-call option: ``given`` (``options.given_in(args)``) over the bundle's
    defaults."""
    budget = option_table.given_in(args, option_table.PIPELINE_NAMES).get("memory_budget")
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
    return pipe, pipe.resolve_options(given)  # with the bundle's defaults: the rules between options


def output_png(output: Path, source_name: str) -> Path:
    """Where the upscaled image of the input named ``source_name`` goes: OUTPUT/STEM.png."""
    return output / f"{Path(source_name).stem}.png"


def upscale_and_write(
    pipe: SeeSRPipeline,
    lr: Image.Image,
    source_name: str,
    options: dict[str, Any],
    output: Path,
    save_prompts: bool,
) -> tuple[Path, UpscaleResult]:
    """Upscale ``lr`` and write OUTPUT/STEM.png (and OUTPUT/txt/STEM.txt with ``save_prompts``), each
    atomically; returns the PNG's path and the result."""
    result = upscale_one(pipe, lr, source_name, options)
    target = output_png(output, source_name)
    save_png(target, result.image)
    if save_prompts:
        write_atomically(output / "txt" / f"{target.stem}.txt", partial(_write_text, text=result.prompt))
    return target, result


def _write_text(path: str, text: str) -> None:
    Path(path).write_text(text)


def upscale_one(pipe: SeeSRPipeline, lr: Image.Image, name: str, options: dict[str, Any]) -> UpscaleResult:
    hidden = not logs.progress_enabled()
    compiles_before = compile_count(pipe.backend)
    start = time.perf_counter()
    with tqdm.tqdm(total=options["steps"], desc=name, unit="step", leave=False, disable=hidden, file=sys.stderr) as bar:
        result = pipe(lr, callback=lambda i, t: bar.update(1), **options)
    compiles_after = compile_count(pipe.backend)
    compiled = "" if compiles_after is None else f", {compiles_after - (compiles_before or 0)} compiles"
    log.debug(f"{name}: {time.perf_counter() - start:.2f} s{compiled}")
    return result


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


def summary_line(done: int, skipped: int, failed: list[Any]) -> str:
    """The batch's last line: counts, then the inputs that failed."""
    return f"{done} upscaled, {skipped} skipped, {len(failed)} failed" + (
        ": " + ", ".join(str(p) for p in failed) if failed else ""
    )
