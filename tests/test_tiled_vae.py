"""The official tiled VAE: tile geometry, the torch task list, the exported segments and the runtime."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from seesr_export.models.sd2 import load_vae
from seesr_export.parity import relative_l2
from seesr_export.tiled_vae import group_stats, split_segments, tiled_forward, vae_tasks
from seesr_runtime import SeeSRPipeline
from seesr_runtime.backends import OnnxRuntimeBackend
from seesr_runtime.manifest import BundleError, Manifest
from seesr_runtime.profiling import StageProfiler
from seesr_runtime.tiled_vae import TiledVaeLayout, TileStates, run_tiled_vae, split_tiles, tile_stats

# (height, width, tile, half) -> (input boxes, output boxes) as [x0, x1, y0, y1], read off the official
# tiler (utils/vaehook.py, VAEHook.split_tiles) for these arguments: shrunk and rounded tile sizes, cores
# pushed to the border within pad, odd sizes, a long thin strip.
OFFICIAL_SPLITS = {
    (40, 52, 16, "decoder"): (
        [[0, 38, 0, 38], [16, 52, 0, 38], [0, 38, 16, 40], [16, 52, 16, 40]],
        [[0, 216, 0, 216], [216, 416, 0, 216], [0, 216, 216, 320], [216, 416, 216, 320]],
    ),
    (23, 61, 10, "decoder"): (
        [[0, 32, 0, 23], [10, 42, 0, 23], [20, 52, 0, 23], [30, 61, 0, 23]],
        [[0, 168, 0, 184], [168, 248, 0, 184], [248, 328, 0, 184], [328, 488, 0, 184]],
    ),
    (30, 17, 7, "decoder"): ([[0, 17, 0, 26], [0, 17, 4, 30]], [[0, 136, 0, 120], [0, 136, 120, 240]]),
    (1200, 1600, 1024, "encoder"): (
        [[0, 832, 0, 640], [768, 1600, 0, 640], [0, 832, 576, 1200], [768, 1600, 576, 1200]],
        [[0, 100, 0, 76], [100, 200, 0, 76], [0, 100, 76, 150], [100, 200, 76, 150]],
    ),
    (1088, 1096, 1024, "encoder"): ([[0, 608, 0, 1088], [544, 1096, 0, 1088]], [[0, 72, 0, 136], [72, 137, 0, 136]]),
    (250, 250, 224, "decoder"): (
        [[0, 150, 0, 150], [128, 250, 0, 150], [0, 150, 128, 250], [128, 250, 128, 250]],
        [[0, 1112, 0, 1112], [1112, 2000, 0, 1112], [0, 1112, 1112, 2000], [1112, 2000, 1112, 2000]],
    ),
    (64, 2000, 224, "decoder"): (
        [
            [0, 246, 0, 64],
            [224, 470, 0, 64],
            [448, 694, 0, 64],
            [672, 918, 0, 64],
            [896, 1142, 0, 64],
            [1120, 1366, 0, 64],
            [1344, 1590, 0, 64],
            [1568, 1814, 0, 64],
            [1792, 2000, 0, 64],
        ],
        [
            [0, 1880, 0, 512],
            [1880, 3672, 0, 512],
            [3672, 5464, 0, 512],
            [5464, 7256, 0, 512],
            [7256, 9048, 0, 512],
            [9048, 10840, 0, 512],
            [10840, 12632, 0, 512],
            [12632, 14424, 0, 512],
            [14424, 16000, 0, 512],
        ],
    ),
}


@pytest.mark.parametrize("case", sorted(OFFICIAL_SPLITS), ids=str)
def test_split_tiles_matches_the_official_layout(case):
    height, width, tile, half = case
    inputs, outputs = split_tiles(height, width, tile, TiledVaeLayout.for_half(half))
    assert (inputs, outputs) == OFFICIAL_SPLITS[case]


@pytest.mark.parametrize(
    "half, size, tile, tiles",
    [
        ("encoder", (1088, 1088), 1024, False),
        ("encoder", (1088, 1096), 1024, True),
        ("decoder", (246, 200), 224, False),
        ("decoder", (100, 247), 224, True),
    ],
)
def test_threshold_is_tile_plus_twice_the_pad(half, size, tile, tiles):
    assert TiledVaeLayout.for_half(half).needs_tiling(*size, tile) is tiles


@pytest.fixture(scope="module")
def vae(tiny_checkout):
    return load_vae(tiny_checkout.sd2)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, 200, 264, generator=g) * 2 - 1, torch.randn(1, 4, 23, 61, generator=g)


@torch.no_grad()
def test_one_tile_reproduces_the_untiled_vae(vae):
    # With a single tile the shared statistics are the exact GroupNorm statistics: the task list must then
    # be the network itself (every layer, residual and quant convolution in place).
    image, latent = _inputs()
    posterior = vae.encode(image).latent_dist
    mean, logvar = tiled_forward(vae, "encoder", image, 4096)
    assert torch.allclose(mean, posterior.mean, atol=1e-5)
    assert torch.allclose(logvar, posterior.logvar.clamp(-30, 20), atol=1e-5)
    (decoded,) = tiled_forward(vae, "decoder", latent, 4096)
    assert torch.allclose(decoded, vae.decode(latent).sample, atol=1e-5)


@torch.no_grad()
def test_small_tiles_change_the_output(vae):
    # Tiles see only their padded neighbourhood: the official output differs from the untiled one.
    image, latent = _inputs()
    (decoded,) = tiled_forward(vae, "decoder", latent, 10)
    assert relative_l2(decoded.numpy(), vae.decode(latent).sample.numpy()) > 1e-2
    mean, _ = tiled_forward(vae, "encoder", image, 64)
    assert relative_l2(mean.numpy(), vae.encode(image).latent_dist.mean.numpy()) > 1e-2


@pytest.mark.parametrize("half", ["encoder", "decoder"])
def test_segments_cut_before_every_group_norm(vae, half):
    tasks = vae_tasks(vae, half)
    segments = split_segments(tasks)
    assert sum(len(s) for s in segments) == len(tasks)
    assert len(segments) == 1 + sum(t.kind == "norm" for t in tasks)
    assert all(any(t.kind == "norm" for t in s[:2]) for s in segments[1:])


def test_tile_statistics_match_torch():
    x = np.random.default_rng(0).normal(3.0, 2.0, (1, 32, 37, 41)).astype(np.float32)
    mean, var = tile_stats(x, 8)
    t_mean, t_var = group_stats(torch.from_numpy(x), 8)
    assert np.allclose(mean, t_mean.numpy(), rtol=1e-6) and np.allclose(var, t_var.numpy(), rtol=1e-5)


@pytest.mark.parametrize("half, tile", [("encoder", 64), ("decoder", 10)])
def test_runtime_segments_match_the_torch_tiler(tiny_bundle, vae, half, tile):
    # Non-square inputs, uneven tiles (12 for the encoder, 4 for the decoder): the bundle's segment graphs
    # driven by the runtime against the reference's torch tiler on the same input.
    network = f"vae_{half}"
    manifest = Manifest.load(tiny_bundle)
    image, latent = _inputs(1)
    x = image if half == "encoder" else latent
    ours = run_tiled_vae(OnnxRuntimeBackend(manifest).run, network, manifest.tiled_vae(network), x.numpy(), tile)
    theirs = tiled_forward(vae, half, x, tile)
    assert [o.shape for o in ours] == [tuple(t.shape) for t in theirs]
    for a, b in zip(ours, theirs):
        assert relative_l2(a, b.numpy()) < 1e-5


@pytest.mark.parametrize("network", ["vae_encoder", "vae_decoder"])
def test_build_checked_every_segment(tiny_bundle, network):
    manifest = Manifest.load(tiny_bundle)
    tiled = manifest.tiled_vae(network)
    assert tiled["pad"] == TiledVaeLayout.for_half(network[4:]).pad and tiled["eps"] == 1e-6
    assert tiled["parity"]["max_rel_l2"] < 1e-5
    for k in range(len(tiled["segments"])):
        assert manifest.graph_path(f"{network}#{k}", "fp16").is_file()  # segments are fp32 only


@pytest.mark.slow
def test_decoded_image_within_one_level_of_the_reference(runtime_pipeline, reference, tiny_bundle):
    latent = np.random.default_rng(2).standard_normal((1, 4, 44, 70)).astype(np.float32)
    ours = np.asarray(runtime_pipeline.decode(latent, tile=16), dtype=int)
    with torch.no_grad():
        theirs = np.asarray(reference._decode(torch.from_numpy(latent), 16), dtype=int)
        untiled = np.asarray(reference._decode(torch.from_numpy(latent), None), dtype=int)
    assert ours.shape == (352, 560, 3)
    assert np.abs(ours - theirs).max() <= 1
    assert np.abs(untiled - theirs).max() > 1  # the tiled path was taken


@pytest.fixture
def bundle_without_segments(tiny_bundle, tmp_path):
    """A copy of the tiny bundle as an older exporter wrote it: no tiled-VAE segment graphs."""
    copy = tmp_path / "old"
    shutil.copytree(tiny_bundle, copy, copy_function=os.link)
    manifest = json.loads((copy / "manifest.json").read_text())
    for network in ("vae_encoder", "vae_decoder"):
        del manifest["networks"][network]["tiled"]
    (copy / "manifest.json").unlink()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_bundle_without_segments_needs_untiled_or_rebuild(bundle_without_segments):
    pipe = SeeSRPipeline.from_bundle(bundle_without_segments)
    latent = np.zeros((1, 4, 40, 40), np.float32)
    with pytest.raises(BundleError, match="no tiled-VAE graphs for vae_decoder.*--no-tiled-vae"):
        pipe.decode(latent, tile=16)
    assert pipe.decode(latent, tile=16, tiled=False).size == (320, 320)
    assert pipe.decode(latent, tile=224).size == (320, 320)  # below the threshold: untiled anyway


def test_segments_are_profiled_as_their_vae_half(tiny_bundle):
    profiler = StageProfiler()
    pipe = SeeSRPipeline.from_bundle(tiny_bundle, profiler=profiler)
    pipe.decode(np.zeros((1, 4, 40, 40), np.float32), tile=16)
    assert set(profiler.calls()) == {"vae_decoder"}
    assert len(profiler.calls()["vae_decoder"]) == 4 * len(
        Manifest.load(tiny_bundle).tiled_vae("vae_decoder")["segments"]
    )


def test_spilled_tile_states_give_the_same_image(runtime_pipeline, tiny_bundle, tmp_path):
    latent = np.random.default_rng(3).standard_normal((1, 4, 40, 52)).astype(np.float32)
    spilled = SeeSRPipeline.from_bundle(tiny_bundle, tiled_vae_spill_dir=tmp_path)
    assert np.array_equal(
        np.asarray(spilled.decode(latent, tile=16)), np.asarray(runtime_pipeline.decode(latent, tile=16))
    )
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_tile_states_spill_to_files_and_clean_up(tmp_path):
    states = TileStates(tmp_path)
    first = np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4)
    states.put(("hidden", 0), first)
    states.put(("residual", 0), None)
    (folder,) = tmp_path.iterdir()
    assert len(list(folder.glob("*.npy"))) == 1
    assert np.array_equal(states.get(("hidden", 0)), first) and states.get(("residual", 0)) is None
    states.put(("hidden", 0), first * 2)  # replaced: the old file goes
    assert len(list(folder.glob("*.npy"))) == 1 and np.array_equal(states.get(("hidden", 0)), first * 2)
    states.close()
    assert not folder.exists()


def test_openvino_reads_spilled_tile_states(runtime_pipeline, tiny_bundle, tmp_path):
    """Spilled states come back as read-only memory maps, which OpenVINO cannot share as input tensors."""
    pytest.importorskip("openvino", reason="the OpenVINO backend needs the openvino extra")
    latent = np.random.default_rng(5).standard_normal((1, 4, 40, 52)).astype(np.float32)
    plain = SeeSRPipeline.from_bundle(tiny_bundle, backend="openvino", precision="fp32")
    spilled = SeeSRPipeline.from_bundle(tiny_bundle, backend="openvino", precision="fp32", tiled_vae_spill_dir=tmp_path)
    assert np.array_equal(np.asarray(spilled.decode(latent, tile=16)), np.asarray(plain.decode(latent, tile=16)))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_openvino_runs_the_same_tiled_vae(runtime_pipeline, tiny_bundle):
    pytest.importorskip("openvino", reason="the OpenVINO backend needs the openvino extra")
    latent = np.random.default_rng(4).standard_normal((1, 4, 40, 52)).astype(np.float32)
    openvino = SeeSRPipeline.from_bundle(tiny_bundle, backend="openvino", precision="fp32")
    ours = openvino.run_vae("vae_decoder", latent, 16)[0]
    assert relative_l2(ours, runtime_pipeline.run_vae("vae_decoder", latent, 16)[0]) < 1e-5
