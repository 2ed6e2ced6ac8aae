"""``seesr-export``: the build-side command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from PIL import Image

from seesr_runtime import SeeSRPipeline, logs
from seesr_runtime import options as option_table
from seesr_runtime.cli import run_command
from seesr_runtime.errors import ImageRejected
from seesr_runtime.filemodes import write_atomically
from seesr_runtime.lazy import available, install_hint, lazy_import
from seesr_runtime.ort_backend import IO_BINDING_MODES
from seesr_runtime.triton import ACCESS_KEY_ENV, server_access_arguments

from .errors import SeeSRExportError
from .graph_format import EXTERNAL_DATA_THRESHOLD, OPSET
from .layout import SeeSRPaths
from .progress import Progress
from .testing import released as released_files
from .triton_repo import BACKENDS as TRITON_BACKENDS
from .triton_repo import DEFAULT_MAX_PIXELS, PRECISION_CHOICES, TritonOptions, write_repository
from .turbo_options import TURBO_DEFAULTS, add_turbo_args, sd_turbo_from_args

# The modules behind the torch commands load torch, diffusers and onnx (seconds): they are lazy modules,
# imported when a command first uses them, so --help and the torch-free `triton` command start fast.
bundle = lazy_import("seesr_export.bundle", extra="export")
fixtures = lazy_import("seesr_export.testing.fixtures", extra="export")
reference = lazy_import("seesr_export.reference", extra="export")
turbo = lazy_import("seesr_export.turbo", extra="export")

SAMPLE_IMAGE = Path(__file__).parent / "assets" / "sample.png"

# By name: run as ``python -m seesr_export.cli`` the module is "__main__", outside the configured loggers.
log = logging.getLogger("seesr_export.cli")


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("checkpoints (a SeeSR checkout, or each file on its own)")
    group.add_argument(
        "--seesr-root",
        type=Path,
        default=Path("."),
        help="SeeSR checkout holding preset/models and ram/data (default: current directory)",
    )
    for name, what in [
        ("sd2", "stable-diffusion-2-base folder"),
        ("unet", "SeeSR unet folder"),
        ("controlnet", "SeeSR controlnet folder"),
        ("ram", "ram_swin_large_14m.pth"),
        ("dape", "DAPE.pth"),
        ("tag-list", "ram_tag_list.txt"),
        ("tag-thresholds", "ram_tag_list_threshold.txt"),
    ]:
        group.add_argument(f"--{name}", type=Path, default=None, help=f"path of the {what}")


def paths_from_args(args):
    return SeeSRPaths.from_root(
        args.seesr_root,
        sd2=args.sd2,
        unet=args.unet,
        controlnet=args.controlnet,
        ram=args.ram,
        dape=args.dape,
        tag_list=args.tag_list,
        tag_thresholds=args.tag_thresholds,
    )


def save_png_atomically(image, path: Path) -> None:
    """Write to a temporary file beside ``path``, then rename: never a half-written PNG."""
    write_atomically(path, lambda tmp: image.save(tmp, format="PNG"))


def cmd_fixture(args) -> int:
    progress = Progress(args.quiet)
    progress.stage(f"writing {args.size} random-weight SeeSR checkpoints to {args.out}")
    files = fixtures.FixtureFiles(layout=args.layout, weights=args.weights)
    fixtures.write_fixture(args.out, size=args.size, seed=args.seed, files=files)
    progress.stage("done")
    return 0


def run_reference(
    paths, inputs: list[Path], out_dir: Path, options: dict, progress: Progress, sd_turbo: Path | None = None
) -> int:
    # bad values fail before the networks load
    options = option_table.resolve(options, TURBO_DEFAULTS if sd_turbo is not None else None)
    progress.stage("loading SeeSR networks (torch reference, fp32 CPU)")
    if sd_turbo is None:
        pipe = reference.SeeSRReference.from_paths(paths)
    else:
        pipe = turbo.turbo_reference(paths, sd_turbo)
    failures = 0
    for path in inputs:
        progress.stage(f"upscaling {path}")
        try:
            with Image.open(path) as opened:
                lr = opened.convert("RGB")
            option_table.check_image_size(*lr.size, options["max_pixels"], raise_with="--max-pixels")
        except ImageRejected as exc:
            log.error("%s: %s", path, exc)
            failures += 1
            continue
        except (OSError, ValueError) as exc:
            log.error("%s: not a readable image (%s)", path, exc)
            failures += 1
            continue
        with progress.bar(options["steps"], "denoising") as bar:
            result = pipe(lr, callback=lambda i, t: bar.update(1), **options)
        target = out_dir / f"{path.stem}.png"
        save_png_atomically(result.image, target)
        progress.stage(f"wrote {target} ({result.image.size[0]}x{result.image.size[1]}); tags: {result.tags!r}")
    return 1 if failures else 0


def add_verbosity_args(parser: argparse.ArgumentParser) -> None:
    """-q and -v, read by ``seesr_runtime.logs.configure``: -q leaves errors, warnings and the result lines."""
    parser.add_argument("-q", "--quiet", action="store_true", help="no stage notes or progress bars; problems only")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="also debug details")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    option_table.add_arguments(parser)


def sampling_options(args) -> dict:
    """The options given on the command line, checked; the rest take the official defaults."""
    return option_table.given_in(args)


def cmd_reference(args) -> int:
    options, sd_turbo = sampling_options(args), sd_turbo_from_args(args)
    return run_reference(paths_from_args(args), args.inputs, args.output, options, Progress(args.quiet), sd_turbo)


def cmd_demo(args) -> int:
    """Random-weight checkpoints -> fp32 ONNX bundle -> the torch-free runtime on the sample image."""
    progress = Progress(args.quiet)
    checkout = args.out / "checkpoints"
    marker = checkout / ".complete"
    if not marker.exists():
        progress.stage(f"writing tiny demo checkpoints to {checkout}")
        fixtures.write_fixture(checkout, size="tiny", seed=0)
        marker.write_text("tiny seed 0\n")
    progress.stage(f"building the fp32 ONNX bundle {args.bundle}")
    report = bundle.build_bundle(
        SeeSRPaths.from_root(checkout), args.bundle, bundle.BuildOptions(precision="fp32"), progress
    )
    for name, parity in report.parity.items():
        progress.stage(f"{name}: onnxruntime vs torch rel L2 {parity['fp32']['max_rel_l2']:.1e}")
    progress.stage(f"upscaling {SAMPLE_IMAGE.name} with the torch-free runtime (onnxruntime, CPU)")
    pipe = SeeSRPipeline.from_bundle(args.bundle)
    options = pipe.resolve_options(sampling_options(args))
    with progress.bar(options["steps"], "denoising") as bar:
        result = pipe(Image.open(SAMPLE_IMAGE), callback=lambda i, t: bar.update(1), **options)
    target = args.out / f"{SAMPLE_IMAGE.stem}.png"
    save_png_atomically(result.image, target)
    progress.stage(f"wrote {target} ({result.image.size[0]}x{result.image.size[1]}); tags: {result.tags!r}")
    return 0


def cmd_flops(args) -> int:
    progress = Progress(args.quiet)
    for name, entry in bundle.add_flops(args.bundle, paths_from_args(args), progress).items():
        progress.stage(f"{name}: " + ", ".join(f"{p['env']} {p['flops'] / 1e9:.1f} GFLOP" for p in entry["points"]))
    return 0


def cmd_build(args) -> int:
    calib = tuple(expand_images(args.calib_images)) if args.calib_images else ()
    options = bundle.BuildOptions(
        precision=args.precision,
        backend=args.backend,
        networks=tuple(args.networks) if args.networks else bundle.BuildOptions.networks,
        opset=args.opset,
        verify=not args.no_verify,
        calib_images=calib,
        calib_size=args.calib_size,
        calib_steps=args.calib_steps,
        quant_method=args.quant_method,
        jobs=args.jobs,
        int8_image_attention_fp32=args.int8_image_attention_fp32,
        int8_conv_percentile=args.int8_conv_percentile,
        sd_turbo=sd_turbo_from_args(args),
    )
    if args.external_data_threshold_mb is not None:
        options.external_data_threshold = int(args.external_data_threshold_mb * 1024**2)
    report = bundle.build_bundle(paths_from_args(args), args.out, options, Progress(args.quiet))
    for name, parity in report.parity.items():
        errors = ", ".join(f"{p} rel L2 {v['max_rel_l2']:.2e}" for p, v in parity.items())
        print(f"{name}: onnxruntime vs torch: {errors}", file=sys.stderr)
    if report.quality:
        for name, error in report.quality["network_rel_l2_vs_fp32"].items():
            print(f"{name}: int8 vs fp32 on held-out calibration calls: rel L2 {error:.2e}", file=sys.stderr)
        print(
            f"int8 end to end: PSNR {report.quality['end_to_end_psnr_vs_fp32_db']:.1f} dB against fp32 (same noise)",
            file=sys.stderr,
        )
    return 0


def expand_images(folder: Path) -> list[Path]:
    from seesr_runtime.inputs import expand_inputs

    images = expand_inputs([folder])
    if not images:
        raise SeeSRExportError(f"--calib-images {folder}: no images found (png, jpg, webp, bmp, tif)")
    return images


OPENVINO_AUTO_NOTE = ", precision auto: bf16 where the serving CPU has bf16 units, else f32"


def cmd_triton(args) -> int:
    options = TritonOptions(
        instances=args.instances,
        kind=args.kind,
        backend=args.backend,
        precision=args.precision,
        providers=tuple(args.providers) if args.providers else None,
        threads=args.threads,
        static_shapes=args.static_shapes,
        cuda_graph=args.cuda_graph,
        io_binding=args.io_binding,
        max_pixels=args.max_pixels,
        pipeline_options=dict(args.option or []),
        reference_bundle=args.reference_bundle,
        model_name=args.model_name,
    )
    model_dir = write_repository(args.bundle, args.out, options)
    access = " ".join(server_access_arguments(f"${ACCESS_KEY_ENV}"))
    log.info(
        "wrote %s (%d x %s instance(s), %s%s); serve with inference for holders of the access key:\n"
        "  tritonserver --model-repository %s %s",
        model_dir,
        options.instances,
        options.kind,
        options.backend,
        OPENVINO_AUTO_NOTE if options.backend == "openvino" and options.precision in (None, "auto") else "",
        args.out.resolve(),
        access,
    )
    return 0


def pipeline_option(text: str) -> tuple[str, object]:
    """KEY=VALUE for --option; VALUE is read as JSON when it parses (64 -> int), else kept as text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. process_size=512), got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


BUILD_HELP = """\
precision:
  fp32   fp32 ONNX graphs (what onnxruntime on CPU runs best)
  fp16   fp32 graphs plus fp16 copies for GPU backends (fp32 inputs/outputs; attention scores
         and softmax kept in fp32, since SD2 attention overflows fp16)
  int8   fp32 + fp16 graphs, plus Q/DQ int8 UNet and ControlNet (97 % of the FLOPs) calibrated on
         real LR images run through the SeeSR sampler (--calib-images DIR, --calib-size N images,
         --calib-steps K steps each; every step's inputs are recorded). --quant-method: NVIDIA
         ModelOpt INT8 SmoothQuant (alpha 0.8; needs the quant extra) or
         onnxruntime's static quantizer (min/max, per-channel weights); time embedding, conv_in,
         conv_out, conv_shortcut, norm_out, proj_out and attention's Q.K^T / P.V stay fp32.
         The int8 graphs run on onnxruntime CPU (seesr upscale --precision int8). Error per network
         and end-to-end PSNR against fp32 are printed and stored in the manifest.
backend:
  onnx      ONNX graphs only (any machine)
  tensorrt  also TensorRT engines: needs an NVIDIA GPU and the 'tensorrt' package
            (the tensorrt extra); refused clearly where either is missing
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seesr-export", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fixture", help="write random-weight SeeSR checkpoints in the official layout")
    p.add_argument("--out", type=Path, required=True, help="checkout root to create")
    p.add_argument(
        "--size",
        choices=["tiny", "sd2"],
        default="tiny",
        help="tiny: seconds, for tests; sd2: real SD2-base + Swin-L shapes, for benchmarks",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--layout",
        choices=released_files.LAYOUTS,
        default="released",
        help="released: every file as the official releases ship it; simplified: plain-string special tokens, "
        "no model_index.json (as re-saved checkpoints may be)",
    )
    p.add_argument(
        "--weights",
        choices=released_files.WEIGHT_FORMATS,
        default="release",
        help="release: each folder in its release's formats (fp16 variants included); safetensors or bin: every "
        "folder in that one format (smaller: use it for --size sd2)",
    )
    add_verbosity_args(p)
    p.set_defaults(func=cmd_fixture)

    p = sub.add_parser(
        "build",
        help="export every SeeSR network and write a bundle under engines/",
        epilog=BUILD_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write (e.g. engines/seesr)")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32")
    p.add_argument("--backend", choices=["onnx", "tensorrt"], default="onnx")
    p.add_argument(
        "--networks",
        nargs="+",
        metavar="NAME",
        help="export only these (dape text_encoder controlnet unet vae_encoder vae_decoder)",
    )
    p.add_argument("--opset", type=int, default=OPSET)
    p.add_argument(
        "--external-data-threshold-mb",
        type=float,
        default=None,
        help="graphs above this size keep weights in one .onnx.data file "
        f"(default {EXTERNAL_DATA_THRESHOLD // 1024**2})",
    )
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime-vs-torch check of each graph")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="export this many networks at once, one process each (big machines; each can need "
        "~12 GB at SD2 size; default 1)",
    )
    p.add_argument("--calib-images", type=Path, default=None, help="int8: folder of real LR calibration images")
    p.add_argument("--calib-size", type=int, default=4, help="int8: how many calibration images (default 4)")
    p.add_argument("--calib-steps", type=int, default=4, help="int8: sampler steps per image (default 4)")
    p.add_argument(
        "--quant-method",
        choices=["auto", "modelopt", "onnxruntime"],
        default="auto",
        help="int8 quantizer: NVIDIA ModelOpt SmoothQuant (needs the 'quant' extra), onnxruntime's "
        "static quantizer, or auto (ModelOpt when installed)",
    )
    p.add_argument(
        "--int8-conv-percentile",
        type=float,
        default=99.99,
        help="int8, ModelOpt: calibrate convolution inputs to this histogram percentile (NVIDIA's "
        "diffusion recipe); 100 = plain max (default 99.99)",
    )
    p.add_argument(
        "--int8-image-attention-fp32",
        action="store_true",
        help="int8: also keep SeeSR's image cross-attention projections unquantized (see "
        "benchmarks/results/cpu/int8_image_attention.md for the measured effect)",
    )
    add_checkpoint_args(p)
    add_turbo_args(p)
    add_verbosity_args(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser(
        "flops",
        help="count each network's FLOPs into an existing bundle's manifest",
        description="Bundles built by this version record FLOPs already; this adds them to older "
        "bundles (seesr bench reports TFLOP/s from them).",
    )
    p.add_argument("--bundle", type=Path, required=True)
    add_checkpoint_args(p)
    add_verbosity_args(p)
    p.set_defaults(func=cmd_flops)

    p = sub.add_parser("reference", help="upscale images with the torch reference pipeline (fp32, CPU)")
    p.add_argument("inputs", nargs="+", type=Path, help="LR images")
    p.add_argument("-o", "--output", type=Path, required=True, help="output directory for PNGs")
    add_checkpoint_args(p)
    add_turbo_args(p)
    add_sampling_args(p)
    add_verbosity_args(p)
    p.set_defaults(func=cmd_reference)

    p = sub.add_parser("demo", help="demo checkpoints -> fp32 bundle -> sample image through the torch-free runtime")
    p.add_argument("--out", type=Path, default=Path("out/demo"))
    p.add_argument("--bundle", type=Path, default=Path("engines/demo"))
    add_sampling_args(p)
    add_verbosity_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "triton",
        help="write a Triton Inference Server model repository for a bundle (no torch needed)",
        description="Write a Triton model repository: a Python-backend model running the torch-free "
        "runtime on the bundle (copied in, hard-linked where possible).",
    )
    p.add_argument("--bundle", type=Path, required=True, help="bundle directory written by seesr-export build")
    p.add_argument("--out", type=Path, required=True, help="model repository to write (e.g. model_repository/)")
    p.add_argument("--instances", type=int, default=1, help="model instances (per GPU with --kind gpu; default 1)")
    p.add_argument("--kind", choices=["cpu", "gpu"], default="cpu", help="instance kind (default cpu)")
    p.add_argument(
        "--backend",
        choices=list(TRITON_BACKENDS),
        default="onnxruntime",
        help="runtime backend inside each instance (tensorrt needs the bundle's engines and --kind gpu; "
        "openvino: --kind cpu, the fastest CPU backend)",
    )
    p.add_argument(
        "--precision",
        choices=list(PRECISION_CHOICES),
        default=None,
        help="graphs to run (default fp32 on CPU, fp16 on GPU when the bundle has them); openvino: fp32, bf16, "
        "int8, int8-bf16 or auto (its default: bf16 where the serving CPU has bf16 units, else fp32)",
    )
    p.add_argument("--providers", nargs="+", default=None, help="onnxruntime providers (default cpu; gpu: cuda cpu)")
    p.add_argument("--threads", type=int, default=None, help="threads per instance (default cores/instances)")
    gpu = p.add_argument_group("GPU options of each instance's pipeline (those of `seesr upscale`)")
    gpu.add_argument(
        "--static-shapes", action="store_true", help="onnxruntime: one UNet/ControlNet session per input shape"
    )
    gpu.add_argument(
        "--cuda-graph",
        action="store_true",
        help="capture CUDA graphs and replay them (tensorrt; onnxruntime with the CUDA provider); --kind gpu",
    )
    gpu.add_argument(
        "--io-binding",
        choices=list(IO_BINDING_MODES),
        default="auto",
        help="onnxruntime: keep constants and ControlNet residuals on the device (auto: on with a GPU provider)",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"largest input image, in pixels, a request may send (default {DEFAULT_MAX_PIXELS})",
    )
    p.add_argument(
        "--option",
        type=pipeline_option,
        action="append",
        metavar="KEY=VALUE",
        help="pipeline default for every request, e.g. --option process_size=512 (repeatable)",
    )
    p.add_argument(
        "--reference-bundle",
        action="store_true",
        help="store the bundle's absolute path instead of copying it (the server must see that path)",
    )
    p.add_argument("--model-name", default="seesr", help="Triton model name (default seesr)")
    add_verbosity_args(p)
    p.set_defaults(func=cmd_triton, needs_torch=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.quiet, args.verbose)
    if getattr(args, "needs_torch", True) and not available("torch"):
        print(f"error: seesr-export needs the build extras: {install_hint('export')}", file=sys.stderr)
        return 2
    return run_command(args.func, args)  # every SeeSRError (build side included): one line, exit 2


if __name__ == "__main__":
    sys.exit(main())
