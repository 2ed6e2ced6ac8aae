"""SeeSR-turbo: SeeSR's weights on the sd-turbo base, sampled in 2 steps without guidance.

What the official ``test_seesr_turbo.py`` changes against ``test_seesr.py``:

* the scheduler config, tokenizer, text encoder and VAE come from the sd-turbo folder (its Euler config
  with "trailing" spacing, read as a DDPM config: the sampler stays DDPM, timesteps 999, 499 at 2 steps);
* the UNet is composed: sd-turbo's config with image cross-attention switched on, all of sd-turbo's UNet
  weights, and only the ``image_attentions`` weights of SeeSR's UNet (``compose_turbo_unet``);
* the defaults: 2 steps, guidance 1.0 (no negative branch, so every network runs at batch 1), latent tile
  overlap 32. ControlNet, DAPE, prompts, start point, tile sizes and colour fix are unchanged.

A turbo checkout is a ``SeeSRPaths`` whose ``sd2`` (the base model folder) is the sd-turbo folder
(``turbo_paths``); everything that reads the base model reads it from there unchanged.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from seesr_runtime.scheduler import DDPMConfig

from .checkpoints import find_weights, load_state_dict, require_file
from .errors import CheckpointError
from .layout import SeeSRPaths
from .models.denoiser import SeeSRUNet, read_config
from .models.sd2 import load_scheduler_config
from .reference import SeeSRReference
from .turbo_options import TURBO_DEFAULTS, UNET_WEIGHTS, turbo_paths

IMAGE_ATTENTION = "image_attentions"  # the module name of SeeSR's image cross-attention transformers


def is_image_attention(key: str) -> bool:
    return IMAGE_ATTENTION in key.split(".")


def turbo_unet_config(sd_turbo_unet: Path) -> dict:
    """sd-turbo's UNet config with SeeSR's image cross-attention switched on."""
    return {**read_config(sd_turbo_unet, "sd-turbo UNet"), "use_image_cross_attention": True}


def composed_state_dict(sd_turbo_unet: Path, seesr_unet: Path, wanted: dict) -> dict:
    """sd-turbo's UNet weights plus SeeSR's image-attention weights, each key accounted for against
    ``wanted`` (the composed model's state dict): every sd-turbo key and every SeeSR image-attention key
    is used, and together they fill the model. One error lists every problem, naming the files."""
    turbo_file = require_file(Path(sd_turbo_unet) / UNET_WEIGHTS, "sd-turbo UNet")
    seesr_file = find_weights(seesr_unet, "diffusion_pytorch_model", "SeeSR UNet")
    turbo = load_state_dict(turbo_file, "sd-turbo UNet")
    image = {k: v for k, v in load_state_dict(seesr_file, "SeeSR UNet").items() if is_image_attention(k)}
    problems = [
        f"{turbo_file}: has image-attention key {k!r}; a plain sd-turbo UNet has none"
        for k in sorted(turbo)
        if is_image_attention(k)
    ]
    if not image:
        problems.append(f"{seesr_file}: no {IMAGE_ATTENTION} keys; is this SeeSR's UNet?")
    for source, state in ((turbo_file, turbo), (seesr_file, image)):
        for key in sorted(set(state) - set(wanted)):
            problems.append(f"{source}: unexpected key {key!r} (shape {tuple(state[key].shape)})")
        for key in sorted(set(state) & set(wanted)):
            if tuple(state[key].shape) != tuple(wanted[key].shape):
                shapes = f"{tuple(state[key].shape)}, expected {tuple(wanted[key].shape)}"
                problems.append(f"{source}: key {key!r} has shape {shapes}")
    for key in sorted(set(wanted) - set(turbo) - set(image)):
        source = seesr_file if is_image_attention(key) else turbo_file
        problems.append(f"{source}: missing key {key!r} (expected shape {tuple(wanted[key].shape)})")
    if problems:
        raise CheckpointError("cannot compose the SeeSR-turbo UNet:\n  " + "\n  ".join(problems))
    return {**turbo, **image}


def compose_turbo_unet(sd_turbo_unet: Path | str, seesr_unet: Path | str):
    """The SeeSR-turbo UNet: sd-turbo's config and weights, SeeSR's image attention."""
    sd_turbo_unet = Path(sd_turbo_unet)
    model = SeeSRUNet(turbo_unet_config(sd_turbo_unet), source=str(sd_turbo_unet / "config.json"))
    state = composed_state_dict(sd_turbo_unet, Path(seesr_unet), model.state_dict())
    model.load_state_dict(state, strict=True)
    return model.eval()


def turbo_scheduler_config(sd_turbo: Path | str) -> dict:
    """sd-turbo's scheduler file read as a DDPM config, as the official script reads it, with every value
    the DDPM sampler uses written out (the file's, else DDPMScheduler's default), so no reader of the
    manifest depends on defaults: an Euler file may leave out keys only DDPM reads."""
    return {**dataclasses.asdict(DDPMConfig()), **load_scheduler_config(Path(sd_turbo))}


def turbo_reference(paths: SeeSRPaths, sd_turbo: Path | str):
    """The torch reference pipeline in turbo mode: the composed UNet, sd-turbo's text encoder, tokenizer,
    VAE and scheduler, SeeSR's ControlNet and DAPE, and the turbo defaults (2 steps, no guidance:
    batch 1, tile overlap 32). Any option can still be given per call, guidance above 1 included."""
    paths = turbo_paths(paths, sd_turbo).check()
    reference = SeeSRReference.from_paths(
        paths,
        unet=compose_turbo_unet(paths.sd2 / "unet", paths.unet),
        scheduler_config=turbo_scheduler_config(paths.sd2),
    )
    reference.defaults = dict(TURBO_DEFAULTS)
    return reference


# ---------------------------------------------------------------- command line
