"""The torch reference pipeline: official geometry, sampler, tiling and colour fix."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from seesr_export import reference as ref
from seesr_export.cli import main
from seesr_export.testing.fixtures import SD2_SCHEDULER


def recorded_noise(seed=0):
    """A noise_fn that draws from numpy and remembers every call (kind, shape)."""
    rng = np.random.default_rng(seed)
    calls = []

    def noise_fn(kind, shape):
        calls.append((kind, shape))
        return rng.standard_normal(shape).astype(np.float32)

    return noise_fn, calls


def test_working_image_follows_official_geometry():
    # short side 40 < 512//4: scale 3.2 -> 179x128, x4 -> 716x512, resampled to multiples of 8.
    assert ref.working_image(Image.new("RGB", (56, 40)), 512, 4).size == (712, 512)  # int(3.2*56)=179 -> 716 -> 712
    assert ref.working_image(Image.new("RGB", (200, 150)), 512, 4).size == (800, 600)
    assert ref.working_image(Image.new("RGB", (1000, 37)), 512, 4).size == (13832, 512)


def test_tile_origins_cover_and_align_last_tile():
    origins = ref.tile_origins(height=100, width=130, tile=48, overlap=4)
    xs = sorted({x for _, x in origins})
    ys = sorted({y for y, _ in origins})
    assert xs == [0, 44, 82] and ys == [0, 44, 52]  # last tiles pushed against the far edge
    assert origins[:3] == [(0, 0), (44, 0), (52, 0)]  # y varies fastest, as in the official loop


def test_gaussian_weights_are_asymmetric_like_the_official_code():
    w = ref.gaussian_tile_weights(8)
    assert np.allclose(w[:, 0], w[:, -1])  # x centred at (T-1)/2
    assert not np.allclose(w[0, :], w[-1, :])  # y centred at T/2
    assert np.argmax(w[:, 0]) == 4


@pytest.mark.parametrize("t", [981, 501, 21, 1])
def test_ddpm_step_matches_diffusers(t):
    scheduler = DDPMScheduler.from_config({k: v for k, v in SD2_SCHEDULER.items() if not k.startswith("_")})
    scheduler.set_timesteps(50)
    assert scheduler.timesteps[0] == 981 and scheduler.timesteps[-1] == 1
    sample, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    generator = torch.Generator().manual_seed(t)
    expected = scheduler.step(eps, t, sample, generator=generator).prev_sample
    noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(t))
    assert torch.allclose(ref.ddpm_step(scheduler, eps, t, sample, noise), expected, atol=1e-6)


def test_adain_truncates_and_matches_statistics():
    rng = np.random.default_rng(0)
    target = Image.fromarray(rng.integers(0, 256, (32, 24, 3), dtype=np.uint8))
    source = Image.fromarray((rng.integers(0, 64, (32, 24, 3)) + 100).astype(np.uint8))
    fixed = np.asarray(ref.adain_color_fix(target, source), dtype=np.float64) / 255
    src = np.asarray(source, dtype=np.float64) / 255
    assert np.allclose(fixed.mean(axis=(0, 1)), src.mean(axis=(0, 1)), atol=3 / 255)


def test_wavelet_keeps_low_frequency_of_source():
    flat = Image.new("RGB", (40, 40), (200, 30, 30))
    target = Image.new("RGB", (40, 40), (10, 10, 250))
    fixed = np.asarray(ref.wavelet_color_fix(target, flat))
    assert np.abs(fixed.astype(int) - [200, 30, 30]).max() <= 1


def test_reference_is_deterministic_and_draws_noise_in_official_order(reference, lr_image):
    noise_a, calls = recorded_noise()
    noise_b, _ = recorded_noise()
    a = reference(lr_image, steps=3, noise_fn=noise_a, process_size=128)
    b = reference(lr_image, steps=3, noise_fn=noise_b, process_size=128)
    assert [kind for kind, _ in calls] == ["initial", "posterior", "step", "step", "step"]
    assert all(shape == (1, 4, 20, 28) for _, shape in calls)  # 224x160 working image
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.image.size == (56 * 4, 40 * 4)
    assert len(a.latents) == 3 and all(torch.equal(x, y) for x, y in zip(a.latents, b.latents))
    assert a.prompt == f"{a.tags}, ,clean, high-resolution, 8k"
    c = reference(lr_image, steps=3, noise_fn=recorded_noise(seed=1)[0], process_size=128)
    assert not torch.equal(a.latents[-1], c.latents[-1])


def test_reference_runs_tiled_and_untiled(reference, lr_image):
    untiled = reference(lr_image, steps=2, noise_fn=recorded_noise()[0], process_size=128, latent_tile_size=96)
    tiled = reference(
        lr_image, steps=2, noise_fn=recorded_noise()[0], process_size=128, latent_tile_size=16, latent_tile_overlap=4
    )
    assert tiled.image.size == untiled.image.size
    # Tiling changes the receptive field, so results differ, but stay finite and close in scale.
    assert not torch.equal(tiled.latents[-1], untiled.latents[-1])
    assert torch.isfinite(tiled.latents[-1]).all()


def test_guidance_one_skips_unconditional_batch(reference, lr_image):
    noise_fn, calls = recorded_noise()
    result = reference(lr_image, steps=2, guidance=1.0, noise_fn=noise_fn, process_size=128, color_fix="none")
    assert result.image.size == (224, 160) and len(calls) == 4


def test_noise_start_point_skips_posterior(reference, lr_image):
    noise_fn, calls = recorded_noise()
    reference(lr_image, steps=1, start_point="noise", noise_fn=noise_fn, process_size=128)
    assert [k for k, _ in calls] == ["initial", "step"]


def test_bad_noise_shape_is_named(reference, lr_image):
    with pytest.raises(ValueError, match="noise_fn returned shape"):
        reference(lr_image, steps=1, noise_fn=lambda kind, shape: np.zeros((1, 4, 2, 2), np.float32), process_size=128)


def test_reference_cli_writes_pngs_and_reports_bad_files(tiny_checkout, lr_image, tmp_path, capsys):
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    lr_image.save(good)
    bad.write_bytes(b"not an image")
    root = tiny_checkout.sd2.parents[2]
    code = main(
        [
            "reference",
            str(good),
            str(bad),
            "-o",
            str(tmp_path / "out"),
            "--seesr-root",
            str(root),
            "--steps",
            "1",
            "--process-size",
            "64",
            "-q",
        ]
    )
    assert code == 1
    assert "bad.png: not a readable image" in capsys.readouterr().err
    assert Image.open(tmp_path / "out" / "good.png").size == (224, 160)
