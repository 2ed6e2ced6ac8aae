"""Each quirk of the released checkpoint files, held by name (seesr_export/testing/released.py mirrors them;
docs/checkpoints.md says where each was learnt). The tests' tiny checkout is written in the released layout,
so every other test builds from these files too; here each quirk is checked on its own, and the simplified
layout of re-saved checkpoints is checked to keep building."""

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from seesr_export.checkpoints import find_weights, load_state_dict
from seesr_export.errors import CheckpointError
from seesr_export.manifest_writer import write_tokenizer_json
from seesr_export.models import sd2
from seesr_export.models.denoiser import load_seesr_controlnet, load_seesr_unet
from seesr_export.testing import fixtures, released
from seesr_export.turbo_options import default_sd_turbo

# Prompts that spell the special tokens as users might: other cases, whitespace around them, glued to words.
SPECIAL_TOKEN_TEXTS = [
    "a cat",
    "<|startoftext|> a cat",
    "<|STARTOFTEXT|> a cat",
    "a <|EndOfText|> b",
    "a<|endoftext|>b",
    "  <|endoftext|>\t\n<|startoftext|>  ",
    "wow! such ! marks!!",
    "clean, high-resolution, 8k",
]


def _read(path):
    return json.loads(path.read_text())


def _ids(tokenizer, text):
    return tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids


@pytest.fixture(scope="module")
def simplified_checkout(tmp_path_factory):
    files = fixtures.FixtureFiles(layout="simplified", weights="bin")
    return fixtures.write_fixture(tmp_path_factory.mktemp("simplified"), size="tiny", seed=0, files=files)


# ------------------------------------------------------------------ SD2-base tokenizer


def test_sd2_special_tokens_are_normalized_added_token_objects(tiny_checkout):
    config = _read(tiny_checkout.sd2 / "tokenizer" / "tokenizer_config.json")
    special = _read(tiny_checkout.sd2 / "tokenizer" / "special_tokens_map.json")
    for name in ("bos_token", "eos_token", "unk_token"):
        assert config[name]["__type"] == "AddedToken" and config[name]["normalized"] is True
        assert "__type" not in special[name] and special[name]["normalized"] is True
    assert config == released.SD2_TOKENIZER_CONFIG and special == released.SD2_SPECIAL_TOKENS_MAP


def test_sd2_bundle_tokenizer_keeps_normalized_specials_and_matches_clip_tokenizer(tiny_checkout, tmp_path):
    write_tokenizer_json(tiny_checkout.sd2, tmp_path / "tokenizer.json")
    added = {t["content"]: t for t in _read(tmp_path / "tokenizer.json")["added_tokens"]}
    assert added[released.BOS]["normalized"] and added[released.EOS]["normalized"]
    official, bundled = sd2.load_tokenizer(tiny_checkout.sd2), Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in SPECIAL_TOKEN_TEXTS:
        assert bundled.encode(text).ids == _ids(official, text), text
    # Normalized specials are found after lowercasing: an upper-case spelling is the token itself.
    assert bundled.encode("<|STARTOFTEXT|>").ids[:3] == [49406, 49406, 49407]


def test_sd2_pad_token_from_special_tokens_map_wins(tiny_checkout, tmp_path):
    config = _read(tiny_checkout.sd2 / "tokenizer" / "tokenizer_config.json")
    assert config["pad_token"] == released.EOS  # the config says EOS ...
    tokenizer = sd2.load_tokenizer(tiny_checkout.sd2)
    assert tokenizer.pad_token == "!" and tokenizer.pad_token_id == 0  # ... the map's "!" is what loads
    write_tokenizer_json(tiny_checkout.sd2, tmp_path / "tokenizer.json")
    padding = _read(tmp_path / "tokenizer.json")["padding"]
    assert padding["pad_id"] == 0 and padding["pad_token"] == "!"


def test_unsupported_added_token_flag_is_refused_at_build_time(tiny_checkout, tmp_path):
    folder = tmp_path / "sd2"
    shutil.copytree(tiny_checkout.sd2 / "tokenizer", folder / "tokenizer")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        data = _read(folder / "tokenizer" / name)
        data["bos_token"]["lstrip"] = True
        (folder / "tokenizer" / name).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json.*'<\|startoftext\|>' sets lstrip: true"):
        write_tokenizer_json(folder, tmp_path / "tokenizer.json")
    assert not (tmp_path / "tokenizer.json").exists()


# ------------------------------------------------------------------ SD2-base folders and weights


def test_sd2_model_index_names_pndm_and_the_build_still_reads_ddpm(tiny_checkout):
    index = _read(tiny_checkout.sd2 / "model_index.json")
    assert index["_class_name"] == "StableDiffusionPipeline" and index["scheduler"] == ["diffusers", "PNDMScheduler"]
    assert index["requires_safety_checker"] is False
    config = sd2.load_scheduler_config(tiny_checkout.sd2)
    assert config["steps_offset"] == 1 and "skip_prk_steps" not in config  # DDPM's keys only


@pytest.mark.parametrize(
    "folder, stems", [("vae", fixtures.DIFFUSERS_STEMS), ("text_encoder", fixtures.TRANSFORMERS_STEMS)]
)
def test_sd2_ships_safetensors_and_bin_and_safetensors_loads(tiny_checkout, folder, stems):
    where = tiny_checkout.sd2 / folder
    assert {p.name for p in where.iterdir()} == {"config.json", f"{stems[0]}.safetensors", f"{stems[1]}.bin"}
    assert find_weights(where, stems[0], folder).name == f"{stems[0]}.safetensors"
    full, pickled = load_file(str(where / f"{stems[0]}.safetensors")), load_state_dict(where / f"{stems[1]}.bin")
    assert full.keys() == pickled.keys() and all(torch.equal(full[k], pickled[k]) for k in full)


def test_only_an_fp16_variant_is_named_in_the_error(tiny_checkout, tmp_path):
    turbo = default_sd_turbo(tiny_checkout.sd2.parent.parent.parent)
    shutil.copy(turbo / "vae" / "diffusion_pytorch_model.fp16.safetensors", tmp_path)
    with pytest.raises(CheckpointError, match=r"found only the variant diffusion_pytorch_model\.fp16\.safetensors"):
        find_weights(tmp_path, "diffusion_pytorch_model", "SD2 VAE")


def test_sd2_vae_keys_use_pre_0_14_attention_names(tiny_checkout, simplified_checkout):
    legacy = load_file(str(tiny_checkout.sd2 / "vae" / "diffusion_pytorch_model.safetensors"))
    assert any(k.endswith("attentions.0.query.weight") for k in legacy)
    assert not any(".to_q." in k for k in legacy)
    # Loaded, they are the same weights the simplified (re-saved) layout holds under today's names.
    old, new = sd2.load_vae(tiny_checkout.sd2).state_dict(), sd2.load_vae(simplified_checkout.sd2).state_dict()
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)


def test_sd2_configs_of_diffusers_0_8_and_transformers_4_25_load(tiny_checkout):
    config = _read(tiny_checkout.sd2 / "text_encoder" / "config.json")
    assert config["transformers_version"] == "4.25.0.dev0" and config["architectures"] == ["CLIPTextModel"]
    assert config["_name_or_path"].startswith("/home/")  # the uploader's cache, meaningless here
    assert set(_read(tiny_checkout.sd2 / "unet" / "config.json")) == set(released.SD2_UNET_KEYS)
    assert "scaling_factor" not in _read(tiny_checkout.sd2 / "vae" / "config.json")  # 0.18215 by default
    assert "prediction_type" not in _read(tiny_checkout.sd2 / "scheduler" / "scheduler_config.json")
    state = load_file(str(tiny_checkout.sd2 / "text_encoder" / "model.safetensors"))
    assert "text_model.embeddings.position_ids" in state
    sd2.load_text_encoder(tiny_checkout.sd2)  # the extra fields and the buffer are accepted


# ------------------------------------------------------------------ SeeSR release


@pytest.mark.parametrize("load, name", [(load_seesr_unet, "unet"), (load_seesr_controlnet, "controlnet")])
def test_seesr_denoisers_of_diffusers_0_21_load_from_safetensors_or_bin_alike(
    tiny_checkout, simplified_checkout, load, name
):
    released_folder, resaved_folder = tiny_checkout.unet.parent / name, simplified_checkout.unet.parent / name
    config = _read(released_folder / "config.json")
    assert config["_diffusers_version"] == "0.21.0" and config["use_image_cross_attention"] is True
    assert "transformer_layers_per_block" in config  # every constructor argument, defaults included
    assert (released_folder / "diffusion_pytorch_model.safetensors").is_file()
    assert (resaved_folder / "diffusion_pytorch_model.bin").is_file()
    a, b = load(released_folder).state_dict(), load(resaved_folder).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_seesr_folder_keeps_the_training_checkpoints_scaler(tiny_checkout):
    assert (tiny_checkout.unet.parent / released.SEESR_SCALER).is_file()  # ignored: nothing reads it


def test_tag_list_without_final_newline_reads_every_tag(tiny_checkout):
    from seesr_export.models.dape import load_tag_list

    text = tiny_checkout.tag_list.read_text(encoding="utf-8")
    assert not text.endswith("\n") and tiny_checkout.tag_thresholds.read_text().endswith("\n")
    tags, _ = load_tag_list(tiny_checkout.tag_list, tiny_checkout.tag_thresholds, len(text.split("\n")))
    assert tags[-1] == text.split("\n")[-1]


# ------------------------------------------------------------------ sd-turbo


def test_sd_turbo_tokenizer_declares_the_pad_token_as_an_unnormalized_added_token(tiny_checkout, tmp_path):
    turbo = default_sd_turbo(tiny_checkout.sd2.parent.parent.parent)
    config = _read(turbo / "tokenizer" / "tokenizer_config.json")
    assert config["added_tokens_decoder"]["0"]["content"] == "!"
    assert config["added_tokens_decoder"]["0"]["normalized"] is False
    write_tokenizer_json(turbo, tmp_path / "tokenizer.json")
    official, bundled = sd2.load_tokenizer(turbo), Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in SPECIAL_TOKEN_TEXTS:
        assert bundled.encode(text).ids == _ids(official, text), text


def test_sd_turbo_ships_safetensors_with_fp16_variants_and_no_feature_extractor(tiny_checkout):
    turbo = default_sd_turbo(tiny_checkout.sd2.parent.parent.parent)
    names = {p.name for p in (turbo / "unet").iterdir()}
    assert names == {"config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"}
    assert find_weights(turbo / "unet", "diffusion_pytorch_model", "sd-turbo UNet").name.count(".") == 1
    assert not (turbo / "feature_extractor").exists()  # the turbo build must not need it
    assert _read(turbo / "model_index.json")["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]


# ------------------------------------------------------------------ both layouts build the same bundle


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_simplified_layout_builds_the_same_bundle(simplified_checkout, tiny_bundle, tmp_path):
    """Re-saved checkpoints (plain tokens, today's VAE names, one format) still build, to the same graphs; each
    bundle's tokenizer gives its own folder's CLIPTokenizer ids (the plain specials are matched as spelt, so
    only an upper-case spelling of them tells the two layouts apart)."""
    from seesr_export import bundle

    out = tmp_path / "simplified"
    bundle.build_bundle(simplified_checkout, out, bundle.BuildOptions(precision="fp32", verify=False))
    graphs = sorted(p.relative_to(out) for p in (out / "onnx" / "fp32").rglob("*") if p.is_file())
    assert graphs
    for graph in graphs:
        assert _sha256(out / graph) == _sha256(tiny_bundle / graph), graph
    official = sd2.load_tokenizer(simplified_checkout.sd2)
    plain, normalized = (Tokenizer.from_file(str(b / "tokenizer.json")) for b in (out, tiny_bundle))
    for text in SPECIAL_TOKEN_TEXTS:
        assert plain.encode(text).ids == _ids(official, text), text
        if text == text.lower():
            assert plain.encode(text).ids == normalized.encode(text).ids, text
