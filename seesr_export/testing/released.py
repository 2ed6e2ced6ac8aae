"""The JSON files of the released checkpoint folders, field for field, as a user who downloads them has them.

The fixture (``fixtures.py``) writes these beside its random weights, so every test builds from files shaped
like the real ones. ``docs/checkpoints.md`` lists, per file, what is mirrored and where that was learnt.
Each quirk that changed behaviour somewhere is named in a comment and held by a test in
``tests/test_released_layout.py``.
"""

from __future__ import annotations

from typing import Any

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Where the SD2-base files were converted: every config of that release names a folder under it.
SD2_UPLOAD_CACHE = (
    "/home/suraj_huggingface_co/.cache/huggingface/diffusers/models--fusing--stable-diffusion-v2/snapshots/"
    "3282d2bdc378f4afd43edbbb90803779a5249116"
)
SD_TURBO_UPLOAD = "/home/patrick/sd-turbo"

# "released": every file as the official releases ship it; "simplified": the plainer files a user has after
# converting or re-saving checkpoints (plain-string special tokens, no model_index.json, no extra config
# fields, today's VAE key names), which must keep building too.
LAYOUTS = ("released", "simplified")
# "release": each folder in its release's own formats (RELEASE_WEIGHTS); "safetensors" or "bin": every
# folder in that one format.
WEIGHT_FORMATS = ("release", "safetensors", "bin")


def added_token(content: str, typed: bool) -> dict[str, Any]:
    """A special token as transformers of 2022 saved it: an object with ``normalized: true`` (the quirk the
    native tokenizer once refused); ``typed`` adds the ``__type`` marker that tokenizer_config.json carries."""
    token: dict[str, Any] = {"__type": "AddedToken"} if typed else {}
    token.update(content=content, lstrip=False, normalized=True, rstrip=False, single_word=False)
    return token


# ------------------------------------------------------------ stabilityai/stable-diffusion-2-base

SD2_TOKENIZER_CONFIG = {
    "add_prefix_space": False,
    "bos_token": added_token(BOS, typed=True),
    "do_lower_case": True,
    "eos_token": added_token(EOS, typed=True),
    "errors": "replace",
    "model_max_length": 77,
    "name_or_path": f"{SD2_UPLOAD_CACHE}/tokenizer",
    # Overridden at load time by special_tokens_map.json's "!": SD2 pads with id 0, as OpenCLIP does.
    "pad_token": EOS,
    "special_tokens_map_file": "./special_tokens_map.json",
    "tokenizer_class": "CLIPTokenizer",
    "unk_token": added_token(EOS, typed=True),
}

SD2_SPECIAL_TOKENS_MAP = {
    "bos_token": added_token(BOS, typed=False),
    "eos_token": added_token(EOS, typed=False),
    "pad_token": "!",
    "unk_token": added_token(EOS, typed=False),
}

SD2_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.8.0",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

# Fields transformers 4.25 wrote into text_encoder/config.json beyond the architecture's own.
SD2_TEXT_ENCODER_EXTRA = {
    "_name_or_path": f"{SD2_UPLOAD_CACHE}/text_encoder",
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "transformers_version": "4.25.0.dev0",
}

# No prediction_type (epsilon by default) and no timestep_spacing: diffusers 0.8 wrote neither.
SD2_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

# The old CLIPFeatureExtractor format (integer sizes). SeeSR loads it and never uses it.
SD2_FEATURE_EXTRACTOR = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}

# diffusers 0.8 wrote 22 keys into SD2's unet/config.json; later keys take their defaults when loaded.
SD2_UNET_KEYS = (
    "_class_name", "_diffusers_version", "_name_or_path", "act_fn", "attention_head_dim", "block_out_channels",
    "center_input_sample", "cross_attention_dim", "down_block_types", "downsample_padding", "dual_cross_attention",
    "flip_sin_to_cos", "freq_shift", "in_channels", "layers_per_block", "mid_block_scale_factor", "norm_eps",
    "norm_num_groups", "out_channels", "sample_size", "up_block_types", "use_linear_projection",
)  # fmt: skip

# ------------------------------------------------------------ SeeSR (seesr/unet, seesr/controlnet)

# SeeSR saved its UNet and ControlNet with diffusers 0.21's save_pretrained, which writes every constructor
# argument. Beyond the architecture's own values, these are 0.21's defaults (what SD2-base's config leaves out).
SEESR_DIFFUSERS_VERSION = "0.21.0"
DIFFUSERS_0_21_UNET_DEFAULTS = {
    "addition_embed_type": None,
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": None,
    "attention_type": "default",
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_norm": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "mid_block_only_cross_attention": None,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "projection_class_embeddings_input_dim": None,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": 1,
}
# The ControlNet's constructor takes a subset of the UNet's arguments, plus its conditioning ones.
DIFFUSERS_0_21_CONTROLNET_KEYS = (
    "addition_embed_type", "addition_embed_type_num_heads", "addition_time_embed_dim", "class_embed_type",
    "encoder_hid_dim", "encoder_hid_dim_type", "num_attention_heads", "num_class_embeds",
    "projection_class_embeddings_input_dim", "transformer_layers_per_block",
)  # fmt: skip
# A leftover of the accelerate checkpoint folder the release was cut from (a GradScaler's state).
SEESR_SCALER = "scaler.pt"

# ------------------------------------------------------------ weight files per folder

# Weight files each released folder holds, by kind: "safetensors" and "bin" are the full-precision files the
# official code loads; "fp16.*" are the half-precision variants diffusers loads only when asked
# (variant="fp16"), which a loader must never pick up in their place.
RELEASE_WEIGHTS = {
    "sd2": ("safetensors", "bin"),  # the fp16 files live on another branch of the repository
    "seesr": ("safetensors",),
    "sd-turbo": ("safetensors", "fp16.safetensors"),
}

# ------------------------------------------------------------ stabilityai/sd-turbo

# Saved by a transformers of late 2023: plain-string special tokens, and every added token in
# added_tokens_decoder, "!" (id 0, SD2's pad token) included as a special, unnormalized token.
SD_TURBO_TOKENIZER_CONFIG = {
    "add_prefix_space": False,
    "added_tokens_decoder": {
        "0": {
            "content": "!",
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        },
        "49406": {**added_token(BOS, typed=False), "special": True},
        "49407": {**added_token(EOS, typed=False), "special": True},
    },
    "bos_token": BOS,
    "clean_up_tokenization_spaces": True,
    "do_lower_case": True,
    "eos_token": EOS,
    "errors": "replace",
    "model_max_length": 77,
    "pad_token": "!",
    "tokenizer_class": "CLIPTokenizer",
    "unk_token": EOS,
}

# Unlike SD2-base's, all four are objects, the pad token's unnormalized.
SD_TURBO_SPECIAL_TOKENS_MAP = {
    "bos_token": added_token(BOS, typed=False),
    "eos_token": added_token(EOS, typed=False),
    "pad_token": {"content": "!", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
    "unk_token": added_token(EOS, typed=False),
}

# The release has no feature_extractor/ folder (SeeSR's turbo script loads one: users copy SD2-base's).
SD_TURBO_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.24.0.dev0",
    "_name_or_path": f"{SD_TURBO_UPLOAD}/",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "requires_safety_checker": True,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

SD_TURBO_TEXT_ENCODER_EXTRA = {
    **SD2_TEXT_ENCODER_EXTRA,
    "_name_or_path": f"{SD_TURBO_UPLOAD}/text_encoder",
    "transformers_version": "4.36.0.dev0",
}
