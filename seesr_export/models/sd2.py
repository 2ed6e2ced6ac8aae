"""Stable Diffusion 2-base parts SeeSR reuses unchanged: VAE, CLIP text encoder, tokenizer, scheduler."""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import AutoencoderKL
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..checkpoints import find_weights, load_state_dict, load_strict, require_file
from ..errors import CheckpointError
from .denoiser import _diffusers_kwargs, read_config

# SeeSR builds a DDPMScheduler from SD2's PNDM config: these keys carry over,
# everything else takes DDPMScheduler's defaults.
DDPM_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "variance_type",
    "clip_sample",
    "clip_sample_range",
    "prediction_type",
    "thresholding",
    "timestep_spacing",
    "steps_offset",
    "rescale_betas_zero_snr",
)

# Attention names of VAEs saved by diffusers < 0.14 (SD2's own release included).
_OLD_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _modernise_vae_keys(state_dict: dict) -> dict:
    renamed = {}
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        block, _, name = prefix.rpartition(".")
        if ".attentions." in key and name in _OLD_VAE_ATTENTION:
            key = f"{block}.{_OLD_VAE_ATTENTION[name]}.{leaf}"
        renamed[key] = value
    return renamed


def load_vae(sd2_folder: Path) -> nn.Module:
    folder = Path(sd2_folder) / "vae"
    config = read_config(folder, "SD2 VAE")
    model = AutoencoderKL(**_diffusers_kwargs(AutoencoderKL, config, str(folder / "config.json")))
    weights = find_weights(folder, "diffusion_pytorch_model", "SD2 VAE")
    load_strict(model, _modernise_vae_keys(load_state_dict(weights, "SD2 VAE")), weights)
    return model.eval()


def load_text_encoder(sd2_folder: Path) -> nn.Module:
    folder = Path(sd2_folder) / "text_encoder"
    config = CLIPTextConfig.from_dict(read_config(folder, "SD2 text encoder"))
    model = CLIPTextModel(config)
    weights = (
        find_weights(folder, "model", "SD2 text encoder")
        if (folder / "model.safetensors").exists()
        else find_weights(folder, "pytorch_model", "SD2 text encoder")
    )
    state = _match_text_prefix(load_state_dict(weights, "SD2 text encoder"), model)
    # position_ids is a constant buffer older transformers saved; it is rebuilt, not loaded.
    load_strict(model, state, weights, ignore_keys=("text_model.embeddings.position_ids", "embeddings.position_ids"))
    return model.eval()


def _match_text_prefix(state_dict: dict, model: nn.Module) -> dict:
    """SD2 checkpoints name keys ``text_model.*`` (transformers 4); transformers 5 drops that prefix."""
    prefix = "text_model."
    model_has = any(k.startswith(prefix) for k in model.state_dict())
    file_has = any(k.startswith(prefix) for k in state_dict)
    if file_has and not model_has:
        return {k.removeprefix(prefix): v for k, v in state_dict.items()}
    if model_has and not file_has:
        return {prefix + k: v for k, v in state_dict.items()}
    return state_dict


def load_tokenizer(sd2_folder: Path):
    folder = Path(sd2_folder) / "tokenizer"
    for name in ("vocab.json", "merges.txt"):
        require_file(folder / name, "SD2 tokenizer")
    return CLIPTokenizer.from_pretrained(str(folder))


def load_scheduler_config(sd2_folder: Path) -> dict:
    """SD2's scheduler config as SeeSR uses it: the values a DDPMScheduler reads from it."""
    path = require_file(Path(sd2_folder) / "scheduler" / "scheduler_config.json", "SD2 scheduler")
    try:
        raw = json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"SD2 scheduler: cannot parse {path}: {exc}") from exc
    return {k: raw[k] for k in DDPM_KEYS if k in raw}
