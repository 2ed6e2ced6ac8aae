"""The torch-free runtime on its own (these tests also run in a venv without torch: see .ci/run)."""

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from no_torch import PRELUDE

from seesr_runtime.backends import create_backend
from seesr_runtime.errors import OptionError
from seesr_runtime.imaging import gaussian_tile_weights, tile_origins
from seesr_runtime.manifest import BundleError, Manifest
from seesr_runtime.networks import NETWORK_NAMES, NETWORK_TABLE, dummy_feeds, network_specs
from seesr_runtime.pipeline import SeeSRPipeline


def test_pipeline_runs_where_importing_torch_raises(runtime_bundle, tmp_path):
    script = PRELUDE + textwrap.dedent(f"""
        import numpy as np
        from PIL import Image
        from seesr_runtime import SeeSRPipeline
        pipe = SeeSRPipeline.from_bundle({str(runtime_bundle)!r}, verify=True)
        lr = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8))
        result = pipe(lr, steps=2, process_size=64)
        assert result.image.size == (128, 96), result.image.size
        assert "torch" not in sys.modules
        print("OK", result.image.size, len(result.tags.split(", ")))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("OK")


def test_seeded_runs_repeat_and_seeds_differ(runtime_pipeline, lr_image):
    a = runtime_pipeline(lr_image, steps=2, process_size=128, seed=3)
    b = runtime_pipeline(lr_image, steps=2, process_size=128, seed=3)
    c = runtime_pipeline(np.asarray(lr_image), steps=2, process_size=128, seed=4)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert not np.array_equal(a.latents[-1], c.latents[-1])
    assert a.prompt.endswith(", ,clean, high-resolution, 8k") and a.tags


def test_noise_is_drawn_in_the_official_order(runtime_pipeline, lr_image):
    calls = []

    def noise_fn(kind, shape):
        calls.append((kind, shape))
        return np.zeros(shape, np.float32)

    runtime_pipeline(lr_image, steps=3, process_size=128, noise_fn=noise_fn)
    assert calls == [("initial", (1, 4, 20, 28)), ("posterior", (1, 4, 20, 28))] + [("step", (1, 4, 20, 28))] * 3


def test_bad_arguments_are_named(runtime_pipeline, lr_image):
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        runtime_pipeline(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="color_fix"):
        runtime_pipeline(lr_image, color_fix="sepia")
    with pytest.raises(OptionError, match="unknown option"):
        runtime_pipeline(lr_image, stepz=3)
    with pytest.raises(ValueError, match="noise_fn returned shape"):
        runtime_pipeline(lr_image, steps=1, process_size=128, noise_fn=lambda k, s: np.zeros((1,), np.float32))


@pytest.mark.parametrize(
    "h, w, tile, overlap", [(20, 28, 16, 4), (100, 130, 48, 4), (96, 96, 96, 4), (150, 200, 96, 4)]
)
def test_tiles_cover_the_latent(h, w, tile, overlap):
    tile = min(tile, h, w)
    covered = np.zeros((h, w), bool)
    for y, x in tile_origins(h, w, tile, overlap):
        assert 0 <= y <= h - tile and 0 <= x <= w - tile
        covered[y : y + tile, x : x + tile] = True
    assert covered.all()


def test_tile_weights_are_positive():
    weights = gaussian_tile_weights(16)
    assert weights.shape == (16, 16) and (weights > 0).all()


def test_manifest_errors_are_clear(runtime_bundle, tmp_path):
    with pytest.raises(BundleError, match="not a SeeSR bundle"):
        Manifest.load(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(runtime_bundle, copy)
    graph = Manifest.load(copy).graph_path("vae_decoder")
    graph.write_bytes(graph.read_bytes()[:-10])
    with pytest.raises(BundleError, match="sha256 mismatch for onnx/fp32/vae_decoder.onnx"):
        Manifest.load(copy)  # verified on load by default
    with pytest.raises(BundleError, match="sha256 mismatch for onnx/fp32/vae_decoder.onnx"):
        Manifest.load(copy, verify="never").verify_files()
    with pytest.raises(BundleError, match="no int8 graph"):
        Manifest.load(copy, verify="never").graph_path("unet", "int8")


def test_tiled_vae_runs_its_segments(runtime_pipeline):
    # Above tile + 2 * pad the VAE runs as the official tiled VAE (exact parity with the torch tiler is in
    # test_tiled_vae.py): shapes follow the untiled VAE, the output is deterministic and close to it.
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((1, 4, 60, 44)).astype(np.float32)
    full = np.asarray(runtime_pipeline.decode(latents, tile=224), dtype=np.float64)
    tiled = np.asarray(runtime_pipeline.decode(latents, tile=16), dtype=np.float64)
    assert full.shape == tiled.shape == (480, 352, 3)
    assert np.array_equal(tiled, np.asarray(runtime_pipeline.decode(latents, tile=16)))
    assert 0 < np.linalg.norm(tiled - full) / np.linalg.norm(full) < 0.1
    image = rng.random((1, 3, 480, 352), dtype=np.float32) * 2 - 1
    mean, logvar = runtime_pipeline.run_vae("vae_encoder", image, tile=1024)
    tiled_mean, tiled_logvar = runtime_pipeline.run_vae("vae_encoder", image, tile=128)
    assert tiled_mean.shape == mean.shape == (1, 4, 60, 44) and np.isfinite(tiled_logvar).all()
    assert 0 < np.linalg.norm(tiled_mean - mean) / np.linalg.norm(mean) < 0.5


def test_pipeline_refuses_a_bundle_whose_inputs_it_does_not_feed(runtime_bundle):
    manifest = Manifest.load(runtime_bundle)
    SeeSRPipeline(manifest, create_backend("onnxruntime", manifest))  # the bundle as built: accepted
    renamed = json.loads(json.dumps(manifest.data))
    renamed["networks"]["controlnet"]["spec"]["inputs"][-1]["name"] = "scale"
    other = Manifest(manifest.root, renamed)
    with pytest.raises(
        BundleError,
        match=r"controlnet graph takes inputs \[.*'scale'\], but this runtime feeds it "
        r"\[.*'conditioning_scale'\]",
    ):
        SeeSRPipeline(other, create_backend("onnxruntime", other))


def test_dummy_feeds_follow_the_spec(runtime_bundle):
    manifest = Manifest.load(runtime_bundle)
    specs = network_specs(manifest.dims)
    assert tuple(specs) == NETWORK_NAMES == tuple(NETWORK_TABLE) == tuple(manifest.data["networks"])
    env = {"B": 2, "h": 8, "w": 12}
    feeds = dummy_feeds(specs["controlnet"], env, seed=3)
    assert list(feeds) == specs["controlnet"].input_names
    assert all(feeds[t.name].shape == t.concrete_shape(env) for t in specs["controlnet"].inputs)
    assert feeds["conditioning_scale"].shape == () and feeds["conditioning_scale"] == 1.0
    timestep = feeds["timestep"]
    assert (
        timestep.dtype == np.float32 and ((timestep >= 1) & (timestep <= 999) & (timestep == np.round(timestep))).all()
    )
    assert 0.0 <= feeds["controlnet_cond"].min() and feeds["controlnet_cond"].max() <= 1.0
    ids = dummy_feeds(specs["text_encoder"], {"B": 1}, seed=0, vocab=100)["input_ids"]
    assert ids.dtype == np.int64 and 0 <= ids.min() and ids.max() < 100
    again = dummy_feeds(specs["controlnet"], env, seed=3)
    assert all(np.array_equal(feeds[n], again[n]) for n in feeds)
