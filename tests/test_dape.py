"""DAPE loading, LoRA merging and tag selection, on real files from the tiny fixture."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from seesr_export.errors import CheckpointError
from seesr_export.models.dape import (
    DAPE,
    IGNORED_PREFIXES,
    LORA_SCALE,
    RECOMPUTED_BUFFER_SUFFIXES,
    DAPEConfig,
    LoRALinear,
    load_dape,
    load_tag_list,
    merge_lora,
    select_tags,
)
from seesr_export.testing.dape_fixture import (
    NUM_CLASSES,
    calibrate_tag_bias,
    ram_layout,
    sample_image,
    write_dape_lora,
    write_ram_checkpoint,
    write_tag_files,
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dape")
    files = SimpleNamespace(
        ram=write_ram_checkpoint(folder / "ram_swin_large_14m.pth", "tiny", seed=0),
        dape=write_dape_lora(folder / "DAPE.pth", "tiny", seed=1),
        tags=write_tag_files(folder / "ram_tag_list.txt", folder / "ram_tag_list_threshold.txt", seed=2),
    )
    calibrate_tag_bias(files.ram, files.dape, files.tags[1])
    return files


@pytest.fixture(scope="module")
def model(files) -> DAPE:
    return load_dape(files.ram, files.dape)


def ram_state_dict(files) -> dict[str, torch.Tensor]:
    return torch.load(files.ram, weights_only=True)["model"]


def lora_state_dict(files) -> dict[str, torch.Tensor]:
    return torch.load(files.dape, weights_only=True)


# --- Round trip ---------------------------------------------------------------------------


def test_every_checkpoint_key_is_used_except_the_ignored_parts(files, model):
    used = {
        key
        for key in ram_state_dict(files)
        if not key.startswith(IGNORED_PREFIXES) and not key.endswith(RECOMPUTED_BUFFER_SUFFIXES)
    }
    assert used == set(model.state_dict())


@torch.no_grad()
def test_outputs_have_official_shapes_and_are_batch_independent(model):
    image = sample_image(seed=0, batch=2)
    embeds, logits = model(image)
    assert embeds.shape == (2, 145, 512) and logits.shape == (2, NUM_CLASSES)
    assert torch.isfinite(embeds).all() and torch.isfinite(logits).all()
    single_embeds, single_logits = model(image[1:])
    torch.testing.assert_close(single_embeds[0], embeds[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(single_logits[0], logits[1], atol=1e-5, rtol=1e-5)


def test_sd2_layout_gives_swin_large_and_every_key_is_a_dape_key():
    layout = ram_layout("sd2")
    state = {key: torch.empty(entry.shape, device="meta") for key, entry in layout.items()}
    config = DAPEConfig.from_state_dict(state, "sd2 layout")
    assert (config.embed_dim, config.depths, config.swin_heads, config.window_size) == (
        192,
        (2, 2, 18, 2),
        (6, 12, 24, 48),
        12,
    )
    assert (config.tag_hidden, config.tag_heads, config.num_classes, config.num_image_tokens) == (768, 4, 4585, 145)
    with torch.device("meta"):
        keys = set(DAPE(config).state_dict())
    used = {k for k in layout if not k.startswith(IGNORED_PREFIXES) and not k.endswith(RECOMPUTED_BUFFER_SUFFIXES)}
    assert keys == used


def test_checkpoint_of_another_window_is_rejected():
    state = {key: torch.empty(entry.shape, device="meta") for key, entry in ram_layout("tiny").items()}
    state["visual_encoder.layers.1.blocks.0.attn.relative_position_bias_table"] = torch.empty(13 * 13, 2, device="meta")
    with pytest.raises(CheckpointError, match=r"visual_encoder\.layers\.1 .* 169 rows, expected 529 for window 12"):
        DAPEConfig.from_state_dict(state, "window 7")


def test_attn_mask_of_another_geometry_is_rejected(files, tmp_path):
    state = ram_state_dict(files)
    key = "visual_encoder.layers.0.blocks.1.attn_mask"
    state[key] = state[key][:16]  # as for a 192px input
    path = tmp_path / "ram_192.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError) as error:
        load_dape(path, files.dape)
    assert str(path) in str(error.value)
    assert f"{key!r} has shape (16, 144, 144), expected (64, 144, 144)" in str(error.value)


@pytest.mark.parametrize("write", [write_ram_checkpoint, write_dape_lora], ids=["ram", "lora"])
def test_fixture_files_are_deterministic(tmp_path, write):
    def written(folder: str, seed: int) -> bytes:
        (tmp_path / folder).mkdir()
        # Same file names: torch.save records the file's stem inside the archive.
        return write(tmp_path / folder / "weights.pth", "tiny", seed).read_bytes()

    first = written("a", 5)
    assert written("b", 5) == first
    assert written("c", 6) != first


# --- LoRA ----------------------------------------------------------------------------------


def test_swin_qkv_lora_changes_only_q_and_v(files, model):
    name = "visual_encoder.layers.2.blocks.1.attn.qkv"
    base, lora = ram_state_dict(files)[name + ".weight"], lora_state_dict(files)
    a, b = lora[name + ".lora_A"], lora[name + ".lora_B"]
    dim = base.shape[1]
    merged = model.state_dict()[name + ".weight"]
    torch.testing.assert_close(merged[:dim], base[:dim] + b[:dim] @ a[:8] * LORA_SCALE)
    assert torch.equal(merged[dim : 2 * dim], base[dim : 2 * dim])
    torch.testing.assert_close(merged[2 * dim :], base[2 * dim :] + b[dim:] @ a[8:] * LORA_SCALE)
    assert not torch.allclose(merged[:dim], base[:dim])


@pytest.mark.parametrize("part", ["query", "key"])
def test_tag_head_lora_changes_query_and_key(files, model, part):
    base, lora, merged = ram_state_dict(files), lora_state_dict(files), model.state_dict()
    layer = "tagging_head.encoder.layer.1.crossattention.self."
    a, b = lora[layer + part + ".lora_A"], lora[layer + part + ".lora_B"]
    expected = base[layer + part + ".weight"] + b @ a * LORA_SCALE
    torch.testing.assert_close(merged[layer + part + ".weight"], expected)


def test_tag_head_lora_leaves_value_alone(files, model):
    base, merged = ram_state_dict(files), model.state_dict()
    layer = "tagging_head.encoder.layer.1.crossattention.self."
    assert torch.equal(merged[layer + "value.weight"], base[layer + "value.weight"])


@torch.no_grad()
def test_merged_lora_equals_lora_applied_at_forward_time(files):
    # float64: in float32 the two orders of summation differ by ~5e-6 (1e-6 relative) at the
    # outputs; in float64 they agree to ~1e-14, so 1e-12 also catches any float32 rounding.
    merged = load_dape(files.ram, files.dape, dtype=torch.float64)
    unmerged = load_dape(files.ram, files.dape, merge=False, dtype=torch.float64)
    assert sum(isinstance(m, LoRALinear) for m in unmerged.modules()) == 8 + 4  # Swin blocks + tag-head q/k
    image = sample_image(seed=3).double()
    for merged_out, unmerged_out in zip(merged(image), unmerged(image)):
        error = (merged_out - unmerged_out).abs().max()
        assert error <= 1e-12 and error / unmerged_out.abs().max() <= 1e-12


def test_tied_tag_encoder_lora_is_merged_into_the_tagging_head(files, tmp_path):
    """Official quirk: tagging_head layer i shares its weights with tag_encoder layer i."""
    lora = lora_state_dict(files)
    tied = "tag_encoder.encoder.layer.0.crossattention.self.query"
    untied = ("tag_encoder.encoder.layer.2.crossattention.self.key", "tag_encoder.encoder.layer.0.attention.self.query")
    for name in (tied, *untied):
        lora[name + ".lora_B"] = torch.randn(lora[name + ".lora_B"].shape, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "DAPE_tied.pth"
    torch.save(lora, path)
    merged = load_dape(files.ram, path).state_dict()
    plain = load_dape(files.ram, files.dape).state_dict()
    target = "tagging_head.encoder.layer.0.crossattention.self.query.weight"
    tied_delta = lora[tied + ".lora_B"] @ lora[tied + ".lora_A"] * LORA_SCALE
    torch.testing.assert_close(merged[target], plain[target] + tied_delta)
    assert all(torch.equal(merged[key], plain[key]) for key in plain if key != target)


def test_merge_lora_consumes_every_key(files):
    base, lora = ram_state_dict(files), lora_state_dict(files)
    merged = merge_lora(base, lora, files.dape)
    assert set(merged) == set(base)
    changed = {key for key in base if not torch.equal(merged[key], base[key])}
    assert changed == {
        key[: -len(".lora_A")] + ".weight"
        for key in lora
        if key.endswith(".lora_A") and key.startswith(("visual_encoder.", "tagging_head."))
    }


# --- Rejections ------------------------------------------------------------------------------


def test_broken_ram_checkpoint_is_rejected_naming_each_key(files, tmp_path):
    state = ram_state_dict(files)
    removed = "visual_encoder.layers.1.blocks.0.mlp.fc2.bias"
    renamed = "image_proj.bias"
    misshaped = "tagging_head.encoder.layer.0.output.dense.weight"
    del state[removed]
    state[renamed + "_renamed"] = state.pop(renamed)
    state[misshaped] = torch.zeros(state[misshaped].shape[0], state[misshaped].shape[1] + 1)
    path = tmp_path / "broken_ram.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError) as error:
        load_dape(path, files.dape)
    message = str(error.value)
    fragments = (str(path), removed, repr(renamed), renamed + "_renamed", misshaped)
    assert [fragment for fragment in fragments if fragment not in message] == [], message


@pytest.mark.parametrize(
    "key, tensor, expected",
    [
        ("visual_encoder.layers.0.blocks.0.mlp.fc1.lora_A", torch.zeros(8, 32), "unknown LoRA key"),
        ("tagging_head.encoder.layer.0.attention.self.query.lora_A", torch.zeros(8, 64), "no base weight"),
        ("tagging_head.encoder.layer.0.crossattention.self.key.lora_A", torch.zeros(8, 64), "expected (8, 512)"),
        ("visual_encoder.layers.0.blocks.0.attn.qkv.lora_B", torch.zeros(96, 8), "expected (64, 8)"),
        ("fc.weight", torch.zeros(1, 64), "not a LoRA tensor"),
    ],
)
def test_bad_lora_file_is_rejected_naming_file_and_key(files, tmp_path, key, tensor, expected):
    lora = lora_state_dict(files)
    lora[key] = tensor
    path = tmp_path / "DAPE_bad.pth"
    torch.save(lora, path)
    with pytest.raises(CheckpointError) as error:
        load_dape(files.ram, path)
    message = str(error.value)
    assert str(path) in message and key in message and expected in message


def test_lora_without_partner_is_rejected(files, tmp_path):
    lora = lora_state_dict(files)
    del lora["visual_encoder.layers.3.blocks.1.attn.qkv.lora_B"]
    path = tmp_path / "DAPE_half.pth"
    torch.save(lora, path)
    with pytest.raises(CheckpointError, match=r"visual_encoder\.layers\.3\.blocks\.1\.attn\.qkv\.lora_B.*missing"):
        load_dape(files.ram, path)


def test_missing_files_are_named(files, tmp_path):
    missing = tmp_path / "nowhere" / "ram_swin_large_14m.pth"
    with pytest.raises(CheckpointError, match=str(missing)):
        load_dape(missing, files.dape)
    with pytest.raises(CheckpointError, match=str(missing)):
        load_dape(files.ram, missing)
    with pytest.raises(CheckpointError, match=str(missing)):
        load_tag_list(missing, files.tags[1], NUM_CLASSES)


# --- Tags --------------------------------------------------------------------------------------


def test_tag_list_of_wrong_length_is_rejected_naming_file_and_counts(tmp_path):
    tags, thresholds = write_tag_files(tmp_path / "tags.txt", tmp_path / "thresholds.txt", seed=0, count=4584)
    with pytest.raises(CheckpointError) as error:
        load_tag_list(tags, thresholds, NUM_CLASSES)
    assert str(tags) in str(error.value) and "4584" in str(error.value) and "4585" in str(error.value)


def test_unparsable_threshold_is_rejected_naming_file_and_line(files, tmp_path):
    lines = files.tags[1].read_text().splitlines()
    lines[41] = "0.7x"
    path = tmp_path / "thresholds.txt"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CheckpointError, match=rf"{path}: line 42 is not a number: '0.7x'"):
        load_tag_list(files.tags[0], path, NUM_CLASSES)


def test_tag_files_round_trip(files):
    tags, thresholds = load_tag_list(*files.tags, NUM_CLASSES)
    assert len(set(tags)) == NUM_CLASSES and all(tags)
    assert thresholds.dtype == np.float32 and 0.6 <= thresholds.min() and thresholds.max() <= 0.9


def test_select_tags_is_strict_and_in_class_order():
    tags = ["sky", "living room", "tree", "dog"]
    logits = torch.tensor([0.0, 0.0, 10.0, -10.0])  # sigmoid(0) is exactly 0.5
    thresholds = np.array([0.5, 0.4999, 0.5, 0.5], dtype=np.float32)
    assert select_tags(logits, tags, thresholds) == "living room, tree"
    assert select_tags(logits.numpy(), tags, thresholds) == "living room, tree"
    assert select_tags(torch.full((4,), -10.0), tags, thresholds) == ""


@torch.no_grad()
def test_fixture_fires_some_but_not_all_tags(files, model):
    tags, thresholds = load_tag_list(*files.tags, NUM_CLASSES)
    _, logits = model(sample_image(seed=0))
    fired = select_tags(logits[0], tags, thresholds).split(", ")
    assert 5 <= len(fired) <= NUM_CLASSES // 10 and all(fired)
