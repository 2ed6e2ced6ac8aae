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

from pathlib import Path

SD_TURBO_SUBDIR = Path("preset") / "models" / "sd-turbo"


def default_sd_turbo(root: Path | str) -> Path:
    """Where the official turbo script expects sd-turbo in a SeeSR checkout."""
    return Path(root) / SD_TURBO_SUBDIR
