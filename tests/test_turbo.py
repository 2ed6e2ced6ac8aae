"""SeeSR-turbo: the sd-turbo fixture, the composed UNet, the trailing DDPM schedule."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_calibration_images
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers import DDPMScheduler as DiffusersDDPM
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTokenizer

from seesr_export.bundle import BuildOptions, build_bundle
from seesr_export.checkpoints import find_weights, load_state_dict
from seesr_export.cli import build_parser
from seesr_export.cli import main as export_main
from seesr_export.errors import BuildError, CheckpointError
from seesr_export.models import sd2 as sd2_parts
from seesr_export.models.denoiser import SeeSRUNet, _diffusers_kwargs
from seesr_export.parity import relative_l2
from seesr_export.quantize import psnr
from seesr_export.testing.fixtures import sd_turbo_unet_config
from seesr_export.turbo import compose_turbo_unet, is_image_attention, turbo_scheduler_config
from seesr_export.turbo import turbo_reference as build_turbo_reference
from seesr_export.turbo_build import reusable
from seesr_export.turbo_options import TURBO_DEFAULTS, default_sd_turbo, sd_turbo_from_args, turbo_paths
from seesr_runtime import SeeSRPipeline
from seesr_runtime.cli import main as runtime_main
from seesr_runtime.imaging import tile_origins, working_image
from seesr_runtime.manifest import Manifest
from seesr_runtime.networks import INT8_NETWORKS
from seesr_runtime.scheduler import DDPMScheduler


@pytest.fixture(scope="module")
def sd_turbo(tiny_checkout):
    root = tiny_checkout.sd2.parent.parent.parent  # sd2 is ROOT/preset/models/stable-diffusion-2-base
    return default_sd_turbo(root)


def _safetensors(path):
    return load_file(str(path))


# ---------------------------------------------------------------- the fixture


def test_fixture_writes_sd_turbo_in_the_official_layout(sd_turbo):
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
    scheduler = DiffusersDDPM.from_pretrained(str(sd_turbo), subfolder="scheduler")
    scheduler.set_timesteps(2)
    assert scheduler.timesteps.tolist() == [999, 499]


def test_fixture_sd_turbo_weights_differ_from_sd2(tiny_checkout, sd_turbo):
    # Loaded, not as files: SD2's VAE file names its attention as diffusers 0.8 did, sd-turbo's as 0.24 does.
    for load in (sd2_parts.load_vae, sd2_parts.load_text_encoder):
        turbo, sd2 = load(sd_turbo).state_dict(), load(tiny_checkout.sd2).state_dict()
        assert set(turbo) == set(sd2)
        assert all(not torch.equal(turbo[k], sd2[k]) for k in turbo if k.endswith("weight") and turbo[k].ndim >= 2)


# ---------------------------------------------------------------- the composed UNet


def _explicit_turbo_unet(sd_turbo, seesr_unet_folder):
    """The composition spelled out: a SeeSR UNet on sd-turbo's config, every weight set by hand."""
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
    sd_turbo, seesr_unet = turbo_copy
    original = find_weights(seesr_unet, "diffusion_pytorch_model", "SeeSR UNet")
    state = {k: v for k, v in load_state_dict(original).items() if "image_attentions.1." not in k}
    original.unlink()
    torch.save(state, seesr_unet / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"missing key 'down_blocks\.0\.image_attentions\.1\."):
        compose_turbo_unet(sd_turbo / "unet", seesr_unet)


# ---------------------------------------------------------------- the schedule


def test_trailing_schedule_as_the_official_ddpm_reads_it(sd_turbo):
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
    return build_turbo_reference(tiny_checkout, sd_turbo)


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
        result = turbo_reference(lr_image, seed=3, process_size=128, callback=lambda i, t: steps.append(t))
    assert steps == [999, 499]
    assert len(result.latents) == 2
    assert {name for name, _ in recorder.calls} == {"SeeSRUNet", "SeeSRControlNet"}
    assert all(shape[0] == 1 for _, shape in recorder.calls), recorder.calls
    assert len(recorder.calls) == 4  # untiled at this size: ControlNet and UNet once per step


def test_turbo_reference_guidance_above_one_runs_batch_two(turbo_reference, lr_image):
    with BatchRecorder(turbo_reference.unet) as recorder:
        turbo_reference(lr_image, seed=3, guidance=2.0, steps=1, process_size=128)
    assert [shape[0] for _, shape in recorder.calls] == [2]


def test_turbo_reference_tiles_with_overlap_32(turbo_reference, lr_image):
    work = working_image(lr_image, 512, 4)
    h, w = work.size[1] // 8, work.size[0] // 8
    tile = 48
    assert h * w > tile * tile
    with BatchRecorder(turbo_reference.unet) as recorder:
        turbo_reference(lr_image, seed=3, steps=1, latent_tile_size=tile)
    assert len(recorder.calls) == len(tile_origins(h, w, tile, 32)) != len(tile_origins(h, w, tile, 4))


def test_turbo_reference_differs_from_the_standard_one(turbo_reference, reference, lr_image):
    same = dict(seed=3, steps=2, guidance=1.0, latent_tile_overlap=32, process_size=128)
    turbo = turbo_reference(lr_image, **same)
    standard = reference(lr_image, **same)
    assert turbo.tags == standard.tags  # DAPE is shared
    assert not torch.allclose(turbo.latents[-1], standard.latents[-1])


# ---------------------------------------------------------------- the turbo bundle and the runtime


@pytest.fixture(scope="module")
def turbo_bundle(tiny_checkout, sd_turbo, tmp_path_factory):
    out = tmp_path_factory.mktemp("turbo") / "tiny-turbo"
    build_bundle(tiny_checkout, out, BuildOptions(precision="fp32", sd_turbo=sd_turbo))
    return out


@pytest.fixture(scope="module")
def turbo_pipeline(turbo_bundle):
    return SeeSRPipeline.from_bundle(turbo_bundle)


class RecordingBackend:
    """The real backend, with the batch of every denoiser call written down."""

    def __init__(self, backend):
        self.backend, self.batches = backend, []

    def run(self, network, feeds):
        if network in ("controlnet", "unet"):
            self.batches.append((network, feeds["sample"].shape[0]))
        return self.backend.run(network, feeds)


@pytest.mark.slow
def test_turbo_bundle_manifest(turbo_bundle, sd_turbo):
    manifest = Manifest.load(turbo_bundle)
    pipeline = manifest.data["pipeline"]
    assert pipeline["variant"] == "turbo"
    assert {k: pipeline["defaults"][k] for k in ("steps", "guidance", "latent_tile_overlap")} == {
        "steps": 2,
        "guidance": 1.0,
        "latent_tile_overlap": 32,
    }
    described = {o["name"]: o["default"] for o in pipeline["options"]}
    assert (described["steps"], described["guidance"], described["latent_tile_overlap"]) == (2, 1.0, 32)
    assert described["latent_tile_size"] == 96 and described["color_fix"] == "adain"  # the rest as test_seesr.py
    scheduler = pipeline["scheduler"]
    assert scheduler["type"] == "DDPMScheduler"
    assert scheduler["timestep_spacing"] == "trailing" and scheduler["clip_sample"] is False
    sources = manifest.data["provenance"]["sources"]
    assert "sd-turbo/diffusion_pytorch_model.safetensors" in sources["unet"]
    for network in ("controlnet", "unet"):
        for profile in manifest.spec(network).profiles:
            assert profile.opt["B"] == 1 and profile.max["B"] == 2, (network, profile)


@pytest.mark.slow
def test_turbo_runtime_defaults_run_two_steps_at_batch_one(turbo_pipeline, lr_image):
    recorder = RecordingBackend(turbo_pipeline.backend)
    turbo_pipeline.backend = recorder
    try:
        steps = []
        turbo_pipeline(lr_image, seed=0, process_size=128, callback=lambda i, t: steps.append(t))
        assert steps == [999, 499]
        assert recorder.batches == [("controlnet", 1), ("unet", 1)] * 2
        assert turbo_pipeline.resolve_options({})["latent_tile_overlap"] == 32
        recorder.batches.clear()
        turbo_pipeline(lr_image, seed=0, process_size=128, steps=1, guidance=2.0)
        assert recorder.batches == [("controlnet", 2), ("unet", 2)]
    finally:
        turbo_pipeline.backend = recorder.backend


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [
        dict(process_size=128, color_fix="none"),  # the turbo defaults: 2 steps, batch 1
        dict(process_size=128, color_fix="adain", guidance=2.0, steps=3),  # guided, 3 trailing steps
    ],
    ids=["defaults", "guided-3-steps"],
)
def test_turbo_runtime_matches_the_turbo_reference(turbo_pipeline, turbo_reference, lr_image, options):
    def noise():
        rng = np.random.default_rng(0)
        return lambda kind, shape: rng.standard_normal(shape).astype(np.float32)

    ours = turbo_pipeline(lr_image, noise_fn=noise(), **options)
    theirs = turbo_reference(lr_image, noise_fn=noise(), **options)
    assert ours.prompt == theirs.prompt
    assert len(ours.latents) == len(theirs.latents) == options.get("steps", 2)
    assert max(relative_l2(a, b.numpy()) for a, b in zip(ours.latents, theirs.latents)) <= 1e-4
    diff = np.abs(np.asarray(ours.image, dtype=int) - np.asarray(theirs.image, dtype=int))
    assert diff.max() <= (2 if options["color_fix"] == "adain" else 1)  # the standard mode's tolerances


def test_build_refuses_a_missing_sd_turbo_folder(tiny_checkout, tmp_path):
    missing = tmp_path / "sd-turbo"
    with pytest.raises(CheckpointError, match=f"sd-turbo folder not found: {missing}"):
        build_bundle(tiny_checkout, tmp_path / "out", BuildOptions(sd_turbo=missing))
    assert not (tmp_path / "out").exists()


def test_cli_turbo_flags(tmp_path):
    parse = build_parser().parse_args
    base = ["build", "--out", str(tmp_path / "b"), "--seesr-root", str(tmp_path)]
    assert sd_turbo_from_args(parse(base)) is None
    assert sd_turbo_from_args(parse([*base, "--turbo"])) == tmp_path / "preset" / "models" / "sd-turbo"
    assert sd_turbo_from_args(parse([*base, "--sd-turbo", "/x/sd-turbo"])) == Path("/x/sd-turbo")
    with pytest.raises(BuildError, match="--sd2 /x/sd2: the turbo mode reads"):
        sd_turbo_from_args(parse([*base, "--turbo", "--sd2", "/x/sd2"]))


def test_sd2_size_sd_turbo_unet_has_the_release_architecture():
    """The sd2-size fixture's sd-turbo UNet is SD 2.1's (865,910,724 parameters in 686 tensors), and the
    composed UNet adds one image transformer per text transformer (416 tensors), as SeeSR's UNet has."""
    config = sd_turbo_unet_config("sd2")
    with torch.device("meta"):  # structure only
        plain = UNet2DConditionModel(**_diffusers_kwargs(UNet2DConditionModel, config, "sd-turbo"))
        composed = SeeSRUNet({**config, "use_image_cross_attention": True})
    assert sum(p.numel() for p in plain.parameters()) == 865_910_724
    assert len(plain.state_dict()) == 686
    image = [k for k in composed.state_dict() if is_image_attention(k)]
    assert len(image) == 416 and set(composed.state_dict()) - set(image) == set(plain.state_dict())


def test_reference_cli_turbo_mode(turbo_reference, sd_turbo, lr_image, tmp_path):
    """``seesr-export reference --turbo`` is the turbo reference with the turbo defaults."""
    lr_image.save(tmp_path / "lr.png")
    root = sd_turbo.parent.parent.parent
    argv = ["reference", str(tmp_path / "lr.png"), "-o", str(tmp_path / "out"), "--seesr-root", str(root)]
    assert export_main([*argv, "--turbo", "--process-size", "128", "-q"]) == 0
    expected = turbo_reference(lr_image, seed=0, process_size=128).image
    with Image.open(tmp_path / "out" / "lr.png") as written:
        assert np.array_equal(np.asarray(written.convert("RGB")), np.asarray(expected))


@pytest.mark.slow
def test_standard_and_turbo_bundles_never_reuse_each_other(turbo_bundle, sd_turbo):
    """They share the ControlNet's and DAPE's cache keys but not the shape profiles."""
    previous = Manifest.load(turbo_bundle)
    assert reusable(previous, BuildOptions(sd_turbo=sd_turbo)) is previous
    assert reusable(previous, BuildOptions()) is None


@pytest.mark.slow
def test_parallel_turbo_export_traces_the_composed_unet(turbo_bundle, tiny_checkout, sd_turbo, tmp_path):
    """Export workers (--jobs) compose the UNet too: their graph is the serial build's, byte for byte."""
    options = BuildOptions(precision="fp32", sd_turbo=sd_turbo, jobs=2, networks=("controlnet", "unet"))
    build_bundle(tiny_checkout, tmp_path / "parallel", options)
    parallel, serial = Manifest.load(tmp_path / "parallel"), Manifest.load(turbo_bundle)
    for network in ("controlnet", "unet"):
        files = parallel.data["networks"][network]["files"]["fp32"]
        assert files["sha256"] == serial.data["networks"][network]["files"]["fp32"]["sha256"], network


@pytest.mark.slow
def test_bench_runs_a_turbo_bundle_at_its_default_steps(turbo_bundle, tmp_path):
    report = tmp_path / "bench.json"
    argv = ["bench", "--bundle", str(turbo_bundle), "--size", "64", "--runs", "1", "--warmup", "0", "-q"]
    assert runtime_main([*argv, "--json", str(report)]) == 0
    (result,) = json.loads(report.read_text())["results"]
    assert result["config"]["steps"] == 2 and result["config"]["guidance"] is None  # the bundle's: 2, 1.0
    assert result["stages"]["unet"]["calls_per_image"] == 2
    assert result["extrapolated"]["steps"] == 2  # extrapolated to the bundle's default, not the standard 50


@pytest.mark.slow
def test_bench_script_runs_the_turbo_reference_beside_the_runtime(turbo_bundle, sd_turbo, tmp_path):
    """benchmarks/bench.py on a turbo bundle: its PyTorch side is the turbo reference (batch-1 calls at the
    bundle's 2 steps), both sides are extrapolated to 2 steps, not the standard 50."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, str(root / "benchmarks" / "bench.py"), "--bundle", str(turbo_bundle)]
    command += ["--seesr-root", str(sd_turbo.parents[2]), "--sd-turbo", str(sd_turbo), "--torch", "cpu:fp32"]
    command += ["--runtime", "onnxruntime:fp32:cpu", "--sizes", "64", "--steps", "2", "--runs", "1"]
    command += ["--warmup", "0", "--name", "turbo", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "bench_turbo.json").read_text())
    assert [c["label"] for c in summary["configurations"]] == ["PyTorch fp32 (cpu)", "onnxruntime fp32 (cpu)"]
    for configuration in summary["configurations"]:
        (result,) = configuration["results"]
        assert result["stages"]["unet"]["calls_per_image"] == 2, configuration["label"]
        assert result["extrapolated"]["steps"] == 2, configuration["label"]
    # The PyTorch side reads the sd-turbo folder it is given (a standard reference would not look for it).
    missing = tmp_path / "no-sd-turbo"
    command[command.index(str(sd_turbo))] = str(missing)
    del command[command.index("--runtime") + 1]  # no runtime configuration: the PyTorch side only
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and f"sd-turbo folder not found: {missing}" in done.stderr, done.stderr[-3000:]


# ---------------------------------------------------------------- int8


@pytest.fixture(scope="module")
def int8_turbo_bundle(tiny_checkout, sd_turbo, tmp_path_factory):
    """An int8 turbo bundle calibrated at the turbo default of 2 steps, with the quantizer a plain
    ``--precision int8`` picks (ModelOpt where installed, else onnxruntime's)."""
    images = write_calibration_images(tmp_path_factory.mktemp("calib"), 2)
    out = tmp_path_factory.mktemp("turbo-int8") / "tiny-turbo-int8"
    options = BuildOptions(
        precision="int8", sd_turbo=sd_turbo, calib_images=images, calib_size=2, calib_steps=2, verify=False
    )
    build_bundle(tiny_checkout, out, options)
    return out


@pytest.mark.slow
def test_int8_turbo_bundle_is_a_turbo_bundle(int8_turbo_bundle, turbo_bundle):
    manifest, fp32 = Manifest.load(int8_turbo_bundle), Manifest.load(turbo_bundle)
    pipeline = manifest.data["pipeline"]
    assert pipeline["variant"] == "turbo"
    assert pipeline["scheduler"] == fp32.data["pipeline"]["scheduler"]
    assert pipeline["scheduler"]["timestep_spacing"] == "trailing"
    assert {k: pipeline["defaults"][k] for k in TURBO_DEFAULTS} == TURBO_DEFAULTS
    quality = manifest.data["quality"]["int8"]
    for network in INT8_NETWORKS:
        files = manifest.data["networks"][network]["files"]
        assert "int8" in files, network
        # Quantized from the fp32 turbo bundle's very graphs (the composed UNet, not SeeSR's own).
        assert files["fp32"]["sha256"] == fp32.data["networks"][network]["files"]["fp32"]["sha256"], network
        assert 0 < quality["network_rel_l2_vs_fp32"][network] < 0.25  # as test_int8.py
        assert all(profile.opt["B"] == 1 for profile in manifest.spec(network).profiles), network


# The int8 image against the fp32 turbo bundle's, same LR image and seed, at the turbo defaults, measured on
# the tiny random-weight fixture: 45.3 dB with ModelOpt (final latents' rel L2 0.025), 42.1 dB with
# onnxruntime's quantizer (0.038). Denoisers broken on purpose give at most 37 dB: UNet output x1.2 37.0 dB
# (rel L2 0.10), ControlNet residuals x2 29.1, zeroed 23.2, UNet output zeroed 21.3, noise 17.8; another
# seed's image 12.3. (An unrelated LR image is no yardstick here: random weights keep little of the input
# beyond its colour statistics, which the colour fix restores, so the mirrored image scores 44.7 dB.)
# Thresholds: 7 dB below the worse quantizer, 6 dB above a broken ControlNet; rel L2 under a UNet off by 20 %.
INT8_TURBO_MIN_PSNR_DB = 35.0
INT8_TURBO_MAX_LATENT_REL_L2 = 0.07


@pytest.mark.slow
def test_int8_turbo_bundle_runs_at_the_turbo_defaults_close_to_fp32(int8_turbo_bundle, turbo_pipeline, lr_image):
    int8 = SeeSRPipeline.from_bundle(int8_turbo_bundle, precision="int8")
    int8.backend = recorder = RecordingBackend(int8.backend)
    steps = []
    quantized = int8(lr_image, seed=0, callback=lambda i, t: steps.append(t))
    assert steps == [999, 499] and recorder.batches == [("controlnet", 1), ("unet", 1)] * 2
    fp32 = turbo_pipeline(lr_image, seed=0)
    another_picture = turbo_pipeline(lr_image, seed=1).image
    assert not np.array_equal(np.asarray(quantized.image), np.asarray(fp32.image))  # the int8 graphs ran
    assert psnr(quantized.image, fp32.image) > INT8_TURBO_MIN_PSNR_DB > psnr(another_picture, fp32.image)
    assert relative_l2(quantized.latents[-1], fp32.latents[-1]) < INT8_TURBO_MAX_LATENT_REL_L2
