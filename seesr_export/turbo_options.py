"""SeeSR-turbo's inputs and defaults, torch-free: where sd-turbo is, what the turbo mode changes in the
options, and the command-line flags that ask for it (``seesr_export.turbo`` composes and runs it)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from .errors import BuildError, CheckpointError
from .layout import SeeSRPaths

SD_TURBO_SUBDIR = Path("preset") / "models" / "sd-turbo"
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"  # the only file the official composition reads

# The options whose official turbo value differs from test_seesr.py's.
TURBO_DEFAULTS = {"steps": 2, "guidance": 1.0, "latent_tile_overlap": 32}

SD_TURBO_HELP = """\
expected the sd-turbo release laid out as:
  preset/models/sd-turbo/{scheduler,tokenizer,text_encoder,vae}/
  preset/models/sd-turbo/unet/{config.json,diffusion_pytorch_model.safetensors}"""


def default_sd_turbo(root: Path | str) -> Path:
    """Where the official turbo script expects sd-turbo in a SeeSR checkout."""
    return Path(root) / SD_TURBO_SUBDIR


def turbo_paths(paths: SeeSRPaths, sd_turbo: Path | str) -> SeeSRPaths:
    """``paths`` with the sd-turbo folder as the base model; the sd-turbo folder and its UNet weights
    are checked here, before any loading, with the path at fault named."""
    sd_turbo = Path(sd_turbo)
    if not sd_turbo.is_dir():
        raise CheckpointError(f"sd-turbo folder not found: {sd_turbo}\n{SD_TURBO_HELP}")
    for needed in ("unet/config.json", f"unet/{UNET_WEIGHTS}"):
        if not (sd_turbo / needed).is_file():
            raise CheckpointError(f"sd-turbo UNet: file not found: {sd_turbo / needed}\n{SD_TURBO_HELP}")
    return dataclasses.replace(paths, sd2=sd_turbo)


def add_turbo_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("SeeSR-turbo (2 steps on the sd-turbo base, no guidance)")
    group.add_argument(
        "--turbo",
        action="store_true",
        help="the turbo mode of test_seesr_turbo.py: sd-turbo's scheduler, tokenizer, text encoder and VAE, "
        "the UNet composed of sd-turbo's and SeeSR's image attention; defaults 2 steps, guidance 1.0, latent "
        "tile overlap 32 (sd-turbo read from SEESR_ROOT/preset/models/sd-turbo)",
    )
    group.add_argument(
        "--sd-turbo",
        type=Path,
        default=None,
        metavar="PATH",
        help="the sd-turbo folder (implies --turbo)",
    )


def sd_turbo_from_args(args: argparse.Namespace) -> Path | None:
    """The sd-turbo folder a command line asks for; None for a standard build."""
    if args.sd_turbo is None and not args.turbo:
        return None
    if args.sd2 is not None:
        raise BuildError(
            f"--sd2 {args.sd2}: the turbo mode reads its base model from the sd-turbo folder, not SD2; "
            "name that folder with --sd-turbo PATH"
        )
    return args.sd_turbo if args.sd_turbo is not None else default_sd_turbo(args.seesr_root)
