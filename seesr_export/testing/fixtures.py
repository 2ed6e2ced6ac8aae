"""Random-weight SeeSR checkpoints in exactly the official ``preset/models`` layout.

No model hub is reachable from tests or CI, so every test (and the demo) makes
its own checkpoints: ``tiny`` sizes run in seconds, ``sd2`` sizes are the real
SD2-base + Swin-L shapes for benchmarks (latency does not depend on weight
values). Output is deterministic for a given seed.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from ..errors import SeeSRExportError
from ..layout import SeeSRPaths
from ..models.denoiser import SeeSRControlNet, SeeSRUNet, _diffusers_kwargs
from ..turbo_options import default_sd_turbo
from . import released
from .dape_fixture import calibrate_tag_bias, write_dape_lora, write_ram_checkpoint, write_tag_files
from .released import LAYOUTS, WEIGHT_FORMATS

SIZES = ("tiny", "sd2")
# What diffusers/transformers write; older transformers refuse safetensors files without it.
SAFETENSORS_METADATA = {"format": "pt"}

_UNET_COMMON = {
    "in_channels": 4,
    "out_channels": 4,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_eps": 1e-05,
    "use_linear_projection": True,
    "upcast_attention": False,
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "resnet_time_scale_shift": "default",
    "use_image_cross_attention": True,
}


@dataclass(frozen=True)
class FixtureShapes:
    unet_channels: list
    unet_heads: list
    norm_groups: int
    text_hidden: int
    text_layers: int
    text_heads: int
    vae_channels: list
    vae_layers: int
    vae_groups: int
    cond_channels: list


SHAPES = {
    "tiny": FixtureShapes([32, 32, 64, 64], [2, 2, 4, 4], 8, 32, 2, 4, [16, 16, 32, 32], 1, 8, [8, 16, 16, 32]),
    "sd2": FixtureShapes(
        [320, 640, 1280, 1280], [5, 10, 20, 20], 32, 1024, 23, 16, [128, 256, 512, 512], 2, 32, [16, 32, 96, 256]
    ),
}


def _json(path: Path, obj: dict) -> None:
    """As diffusers and transformers save configs: sorted keys, indent 2, a final newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def randomize_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Overwrite every parameter with seeded values of a sane scale.

    Diffusers zero-initialises ControlNet's output convolutions; random
    non-zero values make sure every weight actually influences the outputs.
    """
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(fan_in))
            elif name.endswith("weight"):  # norm scales
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=generator))
    return module


def _unet_config(s: FixtureShapes, text_dim: int) -> dict:
    return {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.21.0",
        **_UNET_COMMON,
        "block_out_channels": s.unet_channels,
        "attention_head_dim": s.unet_heads,
        "norm_num_groups": s.norm_groups,
        "cross_attention_dim": text_dim,
        "sample_size": 64,
        "center_input_sample": False,
    }


def _controlnet_config(s: FixtureShapes, text_dim: int) -> dict:
    config = {
        k: v
        for k, v in _unet_config(s, text_dim).items()
        if k
        not in (
            "out_channels",
            "up_block_types",
            "mid_block_type",
            "sample_size",
            "center_input_sample",
            "dual_cross_attention",
        )
    }
    config.update(
        {
            "_class_name": "ControlNetModel",
            "conditioning_channels": 3,
            "conditioning_embedding_out_channels": s.cond_channels,
            "controlnet_conditioning_channel_order": "rgb",
            "global_pool_conditions": False,
        }
    )
    return config


def _vae_config(s: FixtureShapes) -> dict:
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.8.0",
        "act_fn": "silu",
        "block_out_channels": s.vae_channels,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "layers_per_block": s.vae_layers,
        "norm_num_groups": s.vae_groups,
        "sample_size": 512,
    }


def _text_config(s: FixtureShapes) -> dict:
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "hidden_act": "gelu",
        "hidden_size": s.text_hidden,
        "intermediate_size": 4 * s.text_hidden,
        "num_attention_heads": s.text_heads,
        "num_hidden_layers": s.text_layers,
        "max_position_embeddings": 77,
        "vocab_size": 49408,
        "layer_norm_eps": 1e-05,
        "projection_dim": 512,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "torch_dtype": "float32",
    }


# Kept here by name for the tests that build schedulers from them.
SD2_SCHEDULER = released.SD2_SCHEDULER
SD2_FEATURE_EXTRACTOR = released.SD2_FEATURE_EXTRACTOR


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest above 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


# CLIP's merge count: 256 bytes + 256 word-final bytes + 48894 merges + 2 specials = 49408 tokens.
CLIP_MERGE_COUNT = 49152 - 256 - 2
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def fixture_bpe_merges() -> list[str]:
    """A CLIP-format BPE merge list of CLIP's length, made here (no download, no extra package).

    Every merge joins two tokens that exist by then: all two-letter pieces, then all three-letter pieces,
    each inside a word and at a word's end ("</w>"), then four-letter word ends until the list is full.
    Random-weight networks do not care which merges these are; what the tests need is a real CLIP
    tokenizer (same files, sizes and special-token ids) that CLIPTokenizer and the bundle's
    tokenizer.json must agree on. CLIP's own merges are checked too where open_clip_torch is installed
    (``clip_bpe_merges``).
    """
    merges = []
    pairs = [a + b for a in _LETTERS for b in _LETTERS]
    for a in _LETTERS:
        for b in _LETTERS:
            merges += [f"{a} {b}", f"{a} {b}</w>"]
    for pair in pairs:
        for c in _LETTERS:
            merges += [f"{pair} {c}", f"{pair} {c}</w>"]
    triples = (pair + c for pair in pairs for c in _LETTERS)
    while len(merges) < CLIP_MERGE_COUNT:
        triple = next(triples)
        merges += [f"{triple} {d}</w>" for d in _LETTERS][: CLIP_MERGE_COUNT - len(merges)]
    return merges


def clip_bpe_merges() -> list[str]:
    """CLIP's own BPE merge list, from the vocabulary file open_clip_torch ships (tests only)."""
    # Locate the file without importing open_clip (its import needs torchvision).
    spec = importlib.util.find_spec("open_clip")
    folders = list(spec.submodule_search_locations or []) if spec else []
    found = [c for c in (Path(f) / "bpe_simple_vocab_16e6.txt.gz" for f in folders) if c.is_file()]
    if not found:
        raise FileNotFoundError(
            "CLIP's BPE vocabulary file comes from the open_clip_torch package, which is "
            "not installed: pip install --no-deps open_clip_torch==3.3.0"
        )
    lines = gzip.decompress(found[0].read_bytes()).decode("utf-8").split("\n")
    return lines[1 : CLIP_MERGE_COUNT + 1]


def write_clip_tokenizer(folder: Path, merges: list[str] | None = None, layout: str = "released") -> None:
    """An SD2 ``tokenizer/`` folder (CLIPTokenizer files; pad token "!" = id 0); ``merges`` defaults to
    the fixture's own (``fixture_bpe_merges``). ``layout="released"`` writes SD2-base's own
    tokenizer_config.json and special_tokens_map.json (special tokens as ``normalized`` AddedToken objects)."""
    merges = fixture_bpe_merges() if merges is None else merges
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m.split()) for m in merges]
    tokens += [released.BOS, released.EOS]
    folder.mkdir(parents=True, exist_ok=True)
    # CLIP's vocab.json is one line of compact JSON, non-ASCII characters as they are.
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    if layout == "released":
        _json(folder / "special_tokens_map.json", released.SD2_SPECIAL_TOKENS_MAP)
        _json(folder / "tokenizer_config.json", released.SD2_TOKENIZER_CONFIG)
        return
    specials = {"bos_token": released.BOS, "eos_token": released.EOS, "pad_token": "!", "unk_token": released.EOS}
    _json(folder / "special_tokens_map.json", specials)
    _json(
        folder / "tokenizer_config.json",
        {
            **specials,
            "add_prefix_space": False,
            "do_lower_case": True,
            "errors": "replace",
            "model_max_length": 77,
            "tokenizer_class": "CLIPTokenizer",
        },
    )


@dataclass(frozen=True)
class FixtureFiles:
    """How the fixture's files are shaped: ``layout`` (LAYOUTS) and ``weights`` (WEIGHT_FORMATS)."""

    layout: str = "released"
    weights: str = "release"

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise SeeSRExportError(f"fixture layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.weights not in WEIGHT_FORMATS:
            raise SeeSRExportError(f"fixture weights must be one of {WEIGHT_FORMATS}, got {self.weights!r}")

    @property
    def released(self) -> bool:
        return self.layout == "released"

    def kinds(self, release: str) -> tuple[str, ...]:
        """The weight files to write for a folder of ``release`` (a key of ``released.RELEASE_WEIGHTS``)."""
        return released.RELEASE_WEIGHTS[release] if self.weights == "release" else (self.weights,)


def save_weights(folder: Path, stems: tuple[str, str], state: dict, kinds: tuple[str, ...]) -> None:
    """``state`` under each of ``kinds``; ``stems`` are the (safetensors, bin) file stems of the folder, which
    differ for transformers (``model`` / ``pytorch_model``) and agree for diffusers."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in state.items()}
    for kind in kinds:
        half = kind.startswith("fp16.")
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in state.items()} if half else state
        suffix = kind.removeprefix("fp16.")
        stem = stems[0] if suffix == "safetensors" else stems[1]
        path = folder / f"{stem}{'.fp16' if half else ''}.{suffix}"
        if suffix == "safetensors":
            save_file(tensors, str(path), metadata=SAFETENSORS_METADATA)
        else:
            torch.save(tensors, path)


DIFFUSERS_STEMS = ("diffusion_pytorch_model", "diffusion_pytorch_model")
TRANSFORMERS_STEMS = ("model", "pytorch_model")


def _save_diffusers(folder: Path, config: dict, state: dict, kinds: tuple[str, ...]) -> None:
    _json(folder / "config.json", config)
    save_weights(folder, DIFFUSERS_STEMS, state, kinds)


def _legacy_vae_keys(state: dict) -> dict:
    """VAE attention keys as diffusers < 0.14 named them (query/key/value/proj_attn), as SD2's VAE ships."""
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, value in state.items():
        if ".attentions." in key:
            for new, old in legacy.items():
                key = key.replace(f".{new}.", f".{old}.")
        renamed[key] = value
    return renamed


def _text_encoder_state(text: nn.Module) -> dict:
    """Keys as SD2 ships them (transformers 4 naming, "text_model." prefix)."""
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in text.state_dict().items()}


def write_sd2(folder: Path, size: str, generator: torch.Generator, files: FixtureFiles = FixtureFiles()) -> None:
    s = SHAPES[size]
    kinds = files.kinds("sd2")
    _json(folder / "scheduler" / "scheduler_config.json", SD2_SCHEDULER)
    _json(folder / "feature_extractor" / "preprocessor_config.json", SD2_FEATURE_EXTRACTOR)
    write_clip_tokenizer(folder / "tokenizer", layout=files.layout)
    if files.released:
        _json(folder / "model_index.json", released.SD2_MODEL_INDEX)

    vae_config = _vae_config(s)
    vae = randomize_(AutoencoderKL(**_diffusers_kwargs(AutoencoderKL, vae_config, "fixture")), generator)
    vae_state = _legacy_vae_keys(vae.state_dict()) if files.released else vae.state_dict()
    if files.released:
        vae_config = {**vae_config, "_name_or_path": f"{released.SD2_UPLOAD_CACHE}/vae"}
    _save_diffusers(folder / "vae", vae_config, vae_state, kinds)

    text_config = _text_config(s)
    text = randomize_(CLIPTextModel(CLIPTextConfig.from_dict(text_config)), generator)
    text_json = {**released.SD2_TEXT_ENCODER_EXTRA, **text_config} if files.released else text_config
    _json(folder / "text_encoder" / "config.json", dict(sorted(text_json.items())))
    state = _text_encoder_state(text)
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # saved by the transformers of 2022
    save_weights(folder / "text_encoder", TRANSFORMERS_STEMS, state, kinds)

    if files.released:
        # SD2's own UNet: SeeSR never loads it, but the downloaded folder has it. Its own generator, so the
        # weights SeeSR does load are the same in both layouts.
        full = {
            **_unet_config(s, s.text_hidden),
            "_diffusers_version": "0.8.0",
            "_name_or_path": f"{released.SD2_UPLOAD_CACHE}/unet",
        }
        unet_config = {k: full[k] for k in released.SD2_UNET_KEYS}
        unet = UNet2DConditionModel(**_diffusers_kwargs(UNet2DConditionModel, unet_config, "fixture"))
        unused = torch.Generator().manual_seed(0)
        _save_diffusers(folder / "unet", unet_config, randomize_(unet, unused).state_dict(), kinds)


def write_seesr_denoisers(folder: Path, size: str, generator: torch.Generator, files: FixtureFiles = FixtureFiles()):
    s = SHAPES[size]
    kinds = files.kinds("seesr")
    unet_config, control_config = _unet_config(s, s.text_hidden), _controlnet_config(s, s.text_hidden)
    unet = randomize_(SeeSRUNet(unet_config), generator)
    controlnet = randomize_(SeeSRControlNet(control_config), generator)
    if files.released:  # every constructor argument, as diffusers 0.21's save_pretrained wrote them
        defaults, version = released.DIFFUSERS_0_21_UNET_DEFAULTS, released.SEESR_DIFFUSERS_VERSION
        unet_config = {**defaults, **unet_config, "_diffusers_version": version}
        control_defaults = {k: defaults[k] for k in released.DIFFUSERS_0_21_CONTROLNET_KEYS}
        control_config = {**control_defaults, **control_config, "_diffusers_version": version}
        gradient_scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000}
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({**gradient_scaler, "_growth_tracker": 0}, folder / released.SEESR_SCALER)
    _save_diffusers(folder / "unet", unet_config, unet.state_dict(), kinds)
    _save_diffusers(folder / "controlnet", control_config, controlnet.state_dict(), kinds)


# ---------------------------------------------------------------- sd-turbo
# A random-weight ``preset/models/sd-turbo`` in the layout of Stability's sd-turbo release. SeeSR-turbo
# (``test_seesr_turbo.py``) reads its scheduler, tokenizer, text encoder and VAE from it and composes its
# UNet from this UNet plus SeeSR's image attention. Shapes are the SD2 fixture's of the same size
# (sd-turbo is a distilled SD 2.1, the SD2-base architecture); the weights are its own, so tests can
# tell which folder a weight came from.

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


def write_sd_turbo(folder: Path | str, size: str, seed: int, files: FixtureFiles = FixtureFiles()) -> Path:
    """Write the sd-turbo folder (scheduler, feature extractor, tokenizer, text encoder, VAE, UNet) with
    weights drawn from ``seed``; returns ``folder``."""
    folder, s = Path(folder), SHAPES[size]
    kinds = files.kinds("sd-turbo")
    generator = torch.Generator().manual_seed(seed)
    _json(folder / "scheduler" / "scheduler_config.json", SD_TURBO_SCHEDULER)
    if not files.released:  # the release has none; SeeSR's turbo script loads one (users copy SD2-base's)
        _json(folder / "feature_extractor" / "preprocessor_config.json", SD2_FEATURE_EXTRACTOR)
    write_clip_tokenizer(folder / "tokenizer", layout="simplified")
    if files.released:
        _json(folder / "tokenizer" / "tokenizer_config.json", released.SD_TURBO_TOKENIZER_CONFIG)
        _json(folder / "tokenizer" / "special_tokens_map.json", released.SD_TURBO_SPECIAL_TOKENS_MAP)
        _json(folder / "model_index.json", released.SD_TURBO_MODEL_INDEX)

    text_config = _text_config(s)
    text = randomize_(CLIPTextModel(CLIPTextConfig.from_dict(text_config)), generator)
    text_json = {**released.SD_TURBO_TEXT_ENCODER_EXTRA, **text_config} if files.released else text_config
    _json(folder / "text_encoder" / "config.json", dict(sorted(text_json.items())))
    save_weights(folder / "text_encoder", TRANSFORMERS_STEMS, _text_encoder_state(text), kinds)

    vae_config = {**_vae_config(s), "force_upcast": True, "scaling_factor": 0.18215}
    vae = randomize_(AutoencoderKL(**_diffusers_kwargs(AutoencoderKL, vae_config, "fixture")), generator)
    if files.released:
        vae_config.update(
            _diffusers_version="0.24.0.dev0", _name_or_path=f"{released.SD_TURBO_UPLOAD}/vae", sample_size=768
        )
    _save_diffusers(folder / "vae", vae_config, vae.state_dict(), kinds)

    unet_config = sd_turbo_unet_config(size)
    unet = UNet2DConditionModel(**_diffusers_kwargs(UNet2DConditionModel, unet_config, "fixture"))
    _save_diffusers(folder / "unet", unet_config, randomize_(unet, generator).state_dict(), kinds)
    return folder


def write_fixture(
    root: Path | str, size: str = "tiny", seed: int = 0, files: FixtureFiles = FixtureFiles()
) -> SeeSRPaths:
    """Write a complete random-weight SeeSR checkout under ``root`` (sd-turbo included); returns its paths.
    The weights depend on ``size`` and ``seed`` only, not on ``files``."""
    if size not in SIZES:
        raise SeeSRExportError(f"fixture size must be one of {SIZES}, got {size!r}")
    paths = SeeSRPaths.from_root(root)
    generator = torch.Generator().manual_seed(seed)
    write_sd2(paths.sd2, size, generator, files)
    write_seesr_denoisers(paths.unet.parent, size, generator, files)
    paths.ram.parent.mkdir(parents=True, exist_ok=True)
    write_ram_checkpoint(paths.ram, size=size, seed=seed + 1)
    write_dape_lora(paths.dape, paths.ram, seed=seed + 2)
    paths.tag_list.parent.mkdir(parents=True, exist_ok=True)
    # SeeSR's ram_tag_list.txt ends without a newline; its thresholds file with one.
    write_tag_files(paths.tag_list, paths.tag_thresholds, seed=seed + 3, final_newline=not files.released)
    calibrate_tag_bias(paths.ram, paths.dape, paths.tag_thresholds)
    write_sd_turbo(default_sd_turbo(root), size, seed=seed + 4, files=files)  # SeeSR-turbo's base
    return paths
