"""SeeSR-turbo: the sd-turbo fixture."""

from __future__ import annotations

import json

import pytest
import torch

from seesr_export.turbo import default_sd_turbo


@pytest.fixture(scope="module")
def sd_turbo(tiny_checkout):
    root = tiny_checkout.sd2.parent.parent.parent  # sd2 is ROOT/preset/models/stable-diffusion-2-base
    return default_sd_turbo(root)


def _safetensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


# ---------------------------------------------------------------- the fixture


def test_fixture_writes_sd_turbo_in_the_official_layout(sd_turbo):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    scheduler_file = json.loads((sd_turbo / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler_file["_class_name"] == "EulerDiscreteScheduler"
    assert scheduler_file["timestep_spacing"] == "trailing"
    assert scheduler_file["steps_offset"] == 1
    unet_config = json.loads((sd_turbo / "unet" / "config.json").read_text())
    assert "use_image_cross_attention" not in unet_config
    # Each part loads with the library the official script loads it with.
    unet = UNet2DConditionModel.from_pretrained(str(sd_turbo / "unet"))
    assert not any(".image_attentions." in k for k in unet.state_dict())
    CLIPTextModel.from_pretrained(str(sd_turbo / "text_encoder"))
    AutoencoderKL.from_pretrained(str(sd_turbo / "vae"))
    CLIPTokenizer.from_pretrained(str(sd_turbo / "tokenizer"))
    scheduler = DDPMScheduler.from_pretrained(str(sd_turbo), subfolder="scheduler")
    scheduler.set_timesteps(2)
    assert scheduler.timesteps.tolist() == [999, 499]


def test_fixture_sd_turbo_weights_differ_from_sd2(tiny_checkout, sd_turbo):
    for part, name in (("vae", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        turbo, sd2 = _safetensors(sd_turbo / part / name), _safetensors(tiny_checkout.sd2 / part / name)
        assert set(turbo) - {"text_model.embeddings.position_ids"} == set(sd2) - {"text_model.embeddings.position_ids"}
        assert all(not torch.equal(turbo[k], sd2[k]) for k in turbo if k.endswith("weight") and turbo[k].ndim >= 2)
