"""SeeSR-turbo: the sd-turbo fixture, the composed UNet, the trailing DDPM schedule."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from seesr_export.errors import CheckpointError
from seesr_export.turbo import (
    compose_turbo_unet,
    default_sd_turbo,
    is_image_attention,
    turbo_paths,
    turbo_scheduler_config,
)
from seesr_runtime.scheduler import DDPMScheduler


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
    assert not any(is_image_attention(k) for k in unet.state_dict())
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


# ---------------------------------------------------------------- the composed UNet


def _explicit_turbo_unet(sd_turbo, seesr_unet_folder):
    """The composition spelled out: a SeeSR UNet on sd-turbo's config, every weight set by hand."""
    from seesr_export.checkpoints import find_weights, load_state_dict
    from seesr_export.models.denoiser import SeeSRUNet

    config = {**json.loads((sd_turbo / "unet" / "config.json").read_text()), "use_image_cross_attention": True}
    model = SeeSRUNet(config)
    turbo = _safetensors(sd_turbo / "unet" / "diffusion_pytorch_model.safetensors")
    seesr = load_state_dict(find_weights(seesr_unet_folder, "diffusion_pytorch_model", "SeeSR UNet"))
    with torch.no_grad():
        for key, value in model.state_dict().items():
            value.copy_(seesr[key] if ".image_attentions." in key else turbo[key])
    return model.eval(), turbo, seesr


def test_composed_unet_equals_explicit_reconstruction(tiny_checkout, sd_turbo):
    composed = compose_turbo_unet(sd_turbo / "unet", tiny_checkout.unet)
    expected, turbo, seesr = _explicit_turbo_unet(sd_turbo, tiny_checkout.unet)
    got = composed.state_dict()
    assert got.keys() == expected.state_dict().keys()
    for key, value in expected.state_dict().items():
        assert torch.equal(got[key], value), key
    image_keys = [k for k in got if is_image_attention(k)]
    assert image_keys and set(image_keys) == {k for k in seesr if is_image_attention(k)}
    assert set(got) - set(image_keys) == set(turbo)
    # Sources told apart: the SeeSR UNet's non-image weights are not used.
    assert not torch.equal(got["conv_in.weight"], seesr["conv_in.weight"])
    # Same outputs, not just the same tensors.
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=gen)
    text = torch.randn(1, 77, config_dim(sd_turbo), generator=gen)
    image = torch.randn(1, 145, 512, generator=gen)
    t = torch.tensor([999])
    with torch.no_grad():
        np.testing.assert_array_equal(
            composed(sample, t, text, image).numpy(), expected(sample, t, text, image).numpy()
        )


def config_dim(sd_turbo) -> int:
    return json.loads((sd_turbo / "unet" / "config.json").read_text())["cross_attention_dim"]


@pytest.fixture
def turbo_copy(tiny_checkout, sd_turbo, tmp_path):
    """A writable copy of the sd-turbo folder and of SeeSR's UNet folder."""
    shutil.copytree(sd_turbo, tmp_path / "sd-turbo")
    shutil.copytree(tiny_checkout.unet, tmp_path / "seesr-unet")
    return tmp_path / "sd-turbo", tmp_path / "seesr-unet"


def test_missing_sd_turbo_folder_is_refused_naming_it(tiny_checkout, tmp_path):
    missing = tmp_path / "no-such-sd-turbo"
    with pytest.raises(CheckpointError, match=f"sd-turbo folder not found: {missing}"):
        turbo_paths(tiny_checkout, missing)


def test_missing_safetensors_is_refused_naming_it(tiny_checkout, turbo_copy):
    sd_turbo, seesr_unet = turbo_copy
    weights = sd_turbo / "unet" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    with pytest.raises(CheckpointError, match=f"file not found: {weights}"):
        turbo_paths(tiny_checkout, sd_turbo)
    with pytest.raises(CheckpointError, match=f"file not found: {weights}"):
        compose_turbo_unet(sd_turbo / "unet", seesr_unet)


def test_missing_seesr_unet_weights_are_refused_naming_the_folder(turbo_copy):
    sd_turbo, seesr_unet = turbo_copy
    for weights in seesr_unet.glob("diffusion_pytorch_model.*"):
        weights.unlink()
    with pytest.raises(CheckpointError, match=f"no weights in {seesr_unet}"):
        compose_turbo_unet(sd_turbo / "unet", seesr_unet)


def _rewrite(path, change):
    from safetensors.torch import save_file

    state = change(_safetensors(path))
    path.unlink()
    save_file(state, str(path))


def test_key_accounting_names_every_missing_and_unexpected_key(turbo_copy):
    sd_turbo, seesr_unet = turbo_copy
    weights = sd_turbo / "unet" / "diffusion_pytorch_model.safetensors"

    def damage(state):
        state.pop("conv_in.bias")
        state["conv_in.extra"] = torch.zeros(3)
        state["down_blocks.0.image_attentions.0.proj_in.weight"] = torch.zeros(1)
        return state

    _rewrite(weights, damage)
    with pytest.raises(CheckpointError) as caught:
        compose_turbo_unet(sd_turbo / "unet", seesr_unet)
    message = str(caught.value)
    assert f"{weights}: missing key 'conv_in.bias'" in message
    assert f"{weights}: unexpected key 'conv_in.extra'" in message
    assert "has image-attention key 'down_blocks.0.image_attentions.0.proj_in.weight'" in message


def test_key_accounting_refuses_a_seesr_unet_without_image_attention(turbo_copy):
    from seesr_export.checkpoints import find_weights, load_state_dict

    sd_turbo, seesr_unet = turbo_copy
    original = find_weights(seesr_unet, "diffusion_pytorch_model", "SeeSR UNet")
    state = {k: v for k, v in load_state_dict(original).items() if "image_attentions.1." not in k}
    original.unlink()
    torch.save(state, seesr_unet / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"missing key 'down_blocks\.0\.image_attentions\.1\."):
        compose_turbo_unet(sd_turbo / "unet", seesr_unet)


# ---------------------------------------------------------------- the schedule


def test_trailing_schedule_as_the_official_ddpm_reads_it(sd_turbo):
    from diffusers import DDPMScheduler as DiffusersDDPM

    config = turbo_scheduler_config(sd_turbo)
    assert config["timestep_spacing"] == "trailing" and config["clip_sample"] is False
    scheduler = DDPMScheduler(config)
    expected = {2: [999, 499], 3: [999, 666, 332], 4: [999, 749, 499, 249]}
    for steps, timesteps in expected.items():
        assert scheduler.set_timesteps(steps).tolist() == timesteps
        reference = DiffusersDDPM.from_config(config)
        reference.set_timesteps(steps)
        assert reference.timesteps.tolist() == timesteps
    # The previous timestep is t - 1000 // steps (diffusers 0.21), not the next element: 666 -> 333.
    scheduler.set_timesteps(3)
    assert [scheduler.previous_timestep(t) for t in (999, 666, 332)] == [666, 333, -1]
    scheduler.set_timesteps(2)
    assert [scheduler.previous_timestep(t) for t in (999, 499)] == [499, -1]


# ---------------------------------------------------------------- the torch reference in turbo mode


@pytest.fixture(scope="module")
def turbo_reference(tiny_checkout, sd_turbo):
    from seesr_export.turbo import turbo_reference

    return turbo_reference(tiny_checkout, sd_turbo)


class BatchRecorder:
    """Records the batch and spatial size of every call of a network (a forward pre-hook on the real module)."""

    def __init__(self, *modules):
        self.calls = []
        self.handles = [m.register_forward_pre_hook(self._record) for m in modules]

    def _record(self, module, args):
        self.calls.append((type(module).__name__, tuple(args[0].shape)))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def test_turbo_reference_uses_the_turbo_parts(turbo_reference, reference, tiny_checkout, sd_turbo):
    composed = compose_turbo_unet(sd_turbo / "unet", tiny_checkout.unet)
    for key, value in composed.state_dict().items():
        assert torch.equal(turbo_reference.unet.state_dict()[key], value), key
    turbo_text = _safetensors(sd_turbo / "text_encoder" / "model.safetensors")
    key = "text_model.final_layer_norm.weight"
    text_state = turbo_reference.text_encoder.state_dict()
    assert torch.equal(text_state.get(key, text_state.get(key.removeprefix("text_model."))), turbo_text[key])
    # ControlNet and DAPE are SeeSR's, unchanged.
    for key, value in reference.controlnet.state_dict().items():
        assert torch.equal(turbo_reference.controlnet.state_dict()[key], value), key
    assert turbo_reference.scheduler.config.timestep_spacing == "trailing"


def test_turbo_reference_defaults_two_steps_at_batch_one(turbo_reference, lr_image):
    steps = []
    with BatchRecorder(turbo_reference.unet, turbo_reference.controlnet) as recorder:
        result = turbo_reference(lr_image, seed=3, callback=lambda i, t: steps.append(t))
    assert steps == [999, 499]
    assert len(result.latents) == 2
    assert {name for name, _ in recorder.calls} == {"SeeSRUNet", "SeeSRControlNet"}
    assert all(shape[0] == 1 for _, shape in recorder.calls), recorder.calls
    assert len(recorder.calls) == 4  # untiled at this size: ControlNet and UNet once per step


def test_turbo_reference_guidance_above_one_runs_batch_two(turbo_reference, lr_image):
    with BatchRecorder(turbo_reference.unet) as recorder:
        turbo_reference(lr_image, seed=3, guidance=2.0, steps=1)
    assert [shape[0] for _, shape in recorder.calls] == [2]


def test_turbo_reference_tiles_with_overlap_32(turbo_reference, lr_image):
    from seesr_runtime.imaging import tile_origins, working_image

    work = working_image(lr_image, 512, 4)
    h, w = work.size[1] // 8, work.size[0] // 8
    tile = 48
    assert h * w > tile * tile
    with BatchRecorder(turbo_reference.unet) as recorder:
        turbo_reference(lr_image, seed=3, steps=1, latent_tile_size=tile)
    assert len(recorder.calls) == len(tile_origins(h, w, tile, 32)) != len(tile_origins(h, w, tile, 4))


def test_turbo_reference_differs_from_the_standard_one(turbo_reference, reference, lr_image):
    same = dict(seed=3, steps=2, guidance=1.0, latent_tile_overlap=32)
    turbo = turbo_reference(lr_image, **same)
    standard = reference(lr_image, **same)
    assert turbo.tags == standard.tags  # DAPE is shared
    assert not torch.allclose(turbo.latents[-1], standard.latents[-1])
