"""A random-weight ``preset/models/sd-turbo`` folder in the layout of Stability's sd-turbo release.

SeeSR-turbo (``test_seesr_turbo.py``) reads its scheduler, tokenizer, text encoder and VAE from this
folder and composes its UNet from this folder's UNet plus SeeSR's image attention. The networks have
the shapes of the SD2 fixture of the same size (sd-turbo is a distilled SD 2.1, the SD2-base
architecture) but weights of their own, so tests can tell which folder a weight came from.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from .fixtures import (
    SAFETENSORS_METADATA,
    SD2_FEATURE_EXTRACTOR,
    SHAPES,
    _json,
    _save_diffusers,
    _text_config,
    _unet_config,
    _vae_config,
    randomize_,
    write_clip_tokenizer,
)

# The release's scheduler file: an Euler config with trailing spacing. SeeSR reads it as a DDPM config,
# so only the shared keys matter; the others are kept so the file is the one a user has.
SD_TURBO_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.24.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "sigma_max": None,
    "sigma_min": None,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "trailing",
    "timestep_type": "discrete",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

# Keys a diffusers 0.24 UNet config carries beyond SD2's; every value is the one that changes nothing.
_NEWER_UNET_KEYS = {
    "_diffusers_version": "0.24.0.dev0",
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "attention_type": "default",
    "class_embed_type": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "dropout": 0.0,
    "encoder_hid_dim": None,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "time_cond_proj_dim": None,
    "time_embedding_type": "positional",
    "transformer_layers_per_block": 1,
}


def sd_turbo_unet_config(size: str) -> dict:
    """sd-turbo's UNet config at fixture ``size``: SD2's layout, no image cross-attention."""
    s = SHAPES[size]
    config = {**_unet_config(s, s.text_hidden), **_NEWER_UNET_KEYS}
    del config["use_image_cross_attention"]  # a SeeSR key; the release's plain UNet does not have it
    return config


def write_sd_turbo(folder: Path | str, size: str, seed: int) -> Path:
    """Write the sd-turbo folder (scheduler, feature extractor, tokenizer, text encoder, VAE, UNet; all
    weights safetensors) with weights drawn from ``seed``; returns ``folder``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..models.denoiser import _diffusers_kwargs

    folder, s = Path(folder), SHAPES[size]
    generator = torch.Generator().manual_seed(seed)
    _json(folder / "scheduler" / "scheduler_config.json", SD_TURBO_SCHEDULER)
    # The official turbo script loads a feature extractor from this folder too (it is never used).
    _json(folder / "feature_extractor" / "preprocessor_config.json", SD2_FEATURE_EXTRACTOR)
    write_clip_tokenizer(folder / "tokenizer")

    text_config = _text_config(s)
    text = randomize_(CLIPTextModel(CLIPTextConfig.from_dict(text_config)), generator)
    _json(folder / "text_encoder" / "config.json", text_config)
    state = {
        k if k.startswith("text_model.") else f"text_model.{k}": v.contiguous() for k, v in text.state_dict().items()
    }
    save_file(state, str(folder / "text_encoder" / "model.safetensors"), metadata=SAFETENSORS_METADATA)

    vae_config = {**_vae_config(s), "force_upcast": True, "scaling_factor": 0.18215}
    vae = randomize_(AutoencoderKL(**_diffusers_kwargs(AutoencoderKL, vae_config, "fixture")), generator)
    _save_diffusers(folder / "vae", vae_config, vae, safetensors=True)

    unet_config = sd_turbo_unet_config(size)
    unet = UNet2DConditionModel(**_diffusers_kwargs(UNet2DConditionModel, unet_config, "fixture"))
    _save_diffusers(folder / "unet", unet_config, randomize_(unet, generator), safetensors=True)
    return folder
