"""Loading the official layout: every key accounted for, clear errors on bad files."""

import shutil

import pytest
import torch
from conftest import TOKENIZER_TEXTS
from tokenizers import Tokenizer

from seesr_export.checkpoints import load_state_dict
from seesr_export.errors import CheckpointError
from seesr_export.layout import SeeSRPaths
from seesr_export.manifest_writer import write_tokenizer_json
from seesr_export.models import sd2
from seesr_export.models.denoiser import load_seesr_controlnet, load_seesr_unet
from seesr_export.testing.fixtures import clip_bpe_merges, write_clip_tokenizer


def _copy_checkout(paths: SeeSRPaths, tmp_path) -> SeeSRPaths:
    root = paths.sd2.parent.parent.parent
    shutil.copytree(root, tmp_path / "copy")
    return SeeSRPaths.from_root(tmp_path / "copy")


@pytest.mark.parametrize(
    "network, loader, weights",
    [
        ("unet", load_seesr_unet, "diffusion_pytorch_model.safetensors"),
        ("controlnet", load_seesr_controlnet, "diffusion_pytorch_model.safetensors"),
    ],
    ids=["unet", "controlnet"],
)
def test_denoisers_round_trip_every_key(tiny_checkout, network, loader, weights):
    folder = getattr(tiny_checkout, network)
    model = loader(folder)
    on_disk = load_state_dict(folder / weights)
    assert set(model.state_dict()) == set(on_disk)
    for key, value in on_disk.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert any(".image_attentions." in k for k in on_disk)


def test_unet_takes_one_residual_per_controlnet_output(tiny_checkout):
    unet, controlnet = load_seesr_unet(tiny_checkout.unet), load_seesr_controlnet(tiny_checkout.controlnet)
    x = torch.randn(1, 4, 9, 7)
    down, mid = controlnet(
        x, torch.tensor([500.0]), torch.randn(1, 77, 32), torch.randn(1, 145, 512), torch.rand(1, 3, 72, 56)
    )
    assert len(down) == unet.num_residuals == 12
    assert unet(x, torch.tensor([500.0]), torch.randn(1, 77, 32), torch.randn(1, 145, 512), down, mid).shape == x.shape


def test_sd2_parts_load(tiny_checkout):
    vae = sd2.load_vae(tiny_checkout.sd2)
    assert vae.config.scaling_factor == pytest.approx(0.18215)
    text = sd2.load_text_encoder(tiny_checkout.sd2)
    assert text(torch.zeros(1, 77, dtype=torch.long))[0].shape == (1, 77, 32)
    config = sd2.load_scheduler_config(tiny_checkout.sd2)
    assert config["steps_offset"] == 1 and config["clip_sample"] is False


def test_tokenizer_pads_with_zero(tiny_checkout):
    tokenizer = sd2.load_tokenizer(tiny_checkout.sd2)
    ids = tokenizer("a cat, dog", padding="max_length", max_length=77, truncation=True).input_ids
    # The fixture's own merges (fixture_bpe_merges) split "cat" as "c" + "at</w>"; ids as in CLIP's layout.
    assert tokenizer.convert_ids_to_tokens(ids[:6]) == ["<|startoftext|>", "a</w>", "c", "at</w>", ",</w>", "dog</w>"]
    assert ids[0] == 49406 and ids[6] == 49407 and set(ids[7:]) == {0} and len(ids) == 77


@pytest.fixture(scope="module")
def clip_tokenizers(tmp_path_factory):
    """CLIP's own merges (as SD2 ships them) through the fixture's tokenizer writer: CLIPTokenizer and the
    bundle's tokenizer.json of that folder."""
    try:
        merges = clip_bpe_merges()
    except FileNotFoundError as missing:
        pytest.skip(str(missing))
    folder = tmp_path_factory.mktemp("clip")
    write_clip_tokenizer(folder / "sd2" / "tokenizer", merges)
    write_tokenizer_json(folder / "sd2", folder / "tokenizer.json")
    return sd2.load_tokenizer(folder / "sd2"), Tokenizer.from_file(str(folder / "tokenizer.json"))


def test_clip_vocabulary_gives_clip_ids(clip_tokenizers):
    tokenizer, _ = clip_tokenizers
    ids = tokenizer("a cat, dog", padding="max_length", max_length=77, truncation=True).input_ids
    assert ids[:6] == [49406, 320, 2368, 267, 1929, 49407]  # BOS, "a", "cat", ",", "dog", EOS in CLIP's vocabulary


@pytest.mark.parametrize("text", TOKENIZER_TEXTS)
def test_clip_vocabulary_tokenizer_json_matches(clip_tokenizers, text):
    tokenizer, runtime = clip_tokenizers
    expected = tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids
    assert runtime.encode(text).ids == expected


def test_broken_unet_names_each_bad_key(tiny_checkout, tmp_path):
    paths = _copy_checkout(tiny_checkout, tmp_path)
    (paths.unet / "diffusion_pytorch_model.safetensors").unlink()  # the .bin form, as a re-saved folder has
    weights = paths.unet / "diffusion_pytorch_model.bin"
    state = load_state_dict(tiny_checkout.unet / "diffusion_pytorch_model.safetensors")
    removed = "down_blocks.0.image_attentions.0.proj_in.weight"
    renamed = "mid_block.attentions.0.proj_out.bias"
    misshaped = "conv_in.weight"
    del state[removed]
    state["mid_block.attentions.0.proj_out.bias_renamed"] = state.pop(renamed)
    state[misshaped] = torch.zeros(3, 3)
    torch.save(state, weights)
    with pytest.raises(CheckpointError) as err:
        load_seesr_unet(paths.unet)
    message = str(err.value)
    assert str(weights) in message
    assert f"missing key '{removed}'" in message
    assert (
        f"missing key '{renamed}'" in message
        and "unexpected key 'mid_block.attentions.0.proj_out.bias_renamed'" in message
    )
    assert f"key '{misshaped}' has shape (3, 3), expected (32, 4, 3, 3)" in message


def test_missing_and_unreadable_files_name_the_path(tiny_checkout, tmp_path):
    paths = _copy_checkout(tiny_checkout, tmp_path)
    (paths.controlnet / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=str(paths.controlnet)):
        load_seesr_controlnet(paths.controlnet)
    (paths.sd2 / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read .*vae"):
        sd2.load_vae(paths.sd2)
    empty = SeeSRPaths.from_root(tmp_path / "nowhere")
    with pytest.raises(CheckpointError) as err:
        empty.check()
    assert str(empty.ram) in str(err.value) and "preset/models/seesr/{unet,controlnet}" in str(err.value)


class NotATensor:
    """Unpickling this would run arbitrary code paths; weights_only loading must refuse it."""


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": NotATensor()}, path)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_state_dict(path)
