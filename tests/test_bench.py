"""Benchmarks: `seesr bench` reports, FLOPs in the manifest, the GPU script's CPU dry run.

No timing thresholds: speed lives in benchmarks/results, not in asserts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from seesr_export.export import graph_module, sample_feeds
from seesr_export.export_networks import TorchModels
from seesr_runtime import SeeSRPipeline, machine
from seesr_runtime.cli import main
from seesr_runtime.manifest import Manifest
from seesr_runtime.networks import NETWORK_NAMES
from seesr_runtime.profiling import StageProfiler

ROOT = Path(__file__).resolve().parents[1]
NETWORK_CALLS = {"dape": 1, "text_encoder": 1, "vae_encoder": 1, "vae_decoder": 1}  # + controlnet/unet per step


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


@pytest.mark.slow  # the whole bench command end to end
def test_seesr_bench_smoke(runtime_bundle, tmp_path):
    """The CLI on the tiny bundle: every documented field exists and is positive."""
    out = tmp_path / "bench.json"
    steps = 2
    assert (
        main(
            [
                "bench",
                "--bundle",
                str(runtime_bundle),
                "--size",
                "128",
                "--steps",
                str(steps),
                "--runs",
                "2",
                "--warmup",
                "1",
                "--peak-tflops",
                "1.0",
                "--json",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    summary = json.loads(out.read_text())
    assert summary["format"] == "seesr-bench" and summary["backend"]["name"] == "onnxruntime"
    assert summary["machine"]["cpu_count"] >= 1 and summary["machine"]["cpu"]
    assert summary["machine"]["cpu_features"] == machine.cpu_features(machine.cpu_flags())  # what speed depends on
    assert len(summary["bundle"]["manifest_sha256"]) == 64
    assert summary["versions"]["onnxruntime"]
    [report] = summary["results"]
    assert report["output_size"] == [128, 128] and report["config"]["steps"] == steps
    assert report["end_to_end"]["n"] == 2 and len(report["warmup_s"]) == 1
    assert report["compiles_per_image"] is None  # onnxruntime compiles no shapes
    timings = ("median_ms", "p95_ms", "mean_ms", "min_ms")
    assert [key for key in timings if not _positive(report["end_to_end"][key])] == [], report["end_to_end"]
    assert _positive(report["images_per_second"])
    assert _positive(report["extrapolated"]["end_to_end_s"]) and report["extrapolated"]["steps"] == 50
    assert report["extrapolated"]["end_to_end_s"] > report["end_to_end"]["median_ms"] / 1e3  # 2 -> 50 steps
    assert _positive(report["memory"]["peak_host_mb"]) and report["memory"]["peak_gpu_mb"] is None
    stages = report["stages"]
    expected_calls = {
        **NETWORK_CALLS,
        "controlnet": steps,
        "unet": steps,
        "scheduler_step": steps,
        "denoise_step": steps,
        "postprocess": 1,
    }
    for stage, calls in expected_calls.items():
        assert stages[stage]["calls_per_image"] == calls, stage
        assert _positive(stages[stage]["per_call"]["median_ms"]) and _positive(stages[stage]["per_image"]["p95_ms"])
    for network in (*NETWORK_CALLS, "controlnet", "unet"):
        assert _positive(stages[network]["flops_per_call"]) and _positive(stages[network]["tflops_per_s"])
        assert stages[network]["fraction_of_peak"] == pytest.approx(stages[network]["tflops_per_s"])
    # The stages account for the image: what is left ("other": tokenizing, guidance, copies) is small.
    named = sum(stages[s]["per_image"]["median_ms"] for s in expected_calls if s != "denoise_step")
    assert named <= report["end_to_end"]["median_ms"] * 1.05


def test_bench_rejects_mismatched_steps(runtime_bundle, capsys):
    assert main(["bench", "--bundle", str(runtime_bundle), "--size", "128", "256", "--steps", "1", "2", "3"]) == 2
    assert "one per --size" in capsys.readouterr().err


@pytest.mark.slow
def test_profiling_does_not_change_the_result(runtime_bundle, lr_image):
    plain = SeeSRPipeline.from_bundle(runtime_bundle)(lr_image, seed=5, steps=2)
    profiler = StageProfiler()
    profiled = SeeSRPipeline.from_bundle(runtime_bundle, profiler=profiler)(lr_image, seed=5, steps=2)
    assert np.array_equal(np.asarray(plain.image), np.asarray(profiled.image))
    assert set(profiler.calls()) >= {"dape", "text_encoder", "vae_encoder", "controlnet", "unet", "vae_decoder"}


@pytest.mark.parametrize("network", NETWORK_NAMES)
def test_manifest_flops_cover_every_profile(tiny_bundle, network):
    """Every network has FLOPs at its profiles' opt shapes (or their batch-1 twins)."""
    manifest = Manifest.load(tiny_bundle)
    points = manifest.data["networks"][network]["flops"]["points"]
    assert points and all(p["flops"] > 0 for p in points), points
    envs = [p["env"] for p in points]
    assert all(profile.opt in envs or {**profile.opt, "B": 1} in envs for profile in manifest.spec(network).profiles)


def test_manifest_flops_match_the_counter(tiny_bundle, tiny_checkout):
    """The FLOPs in the manifest scale with the batch and equal a count on real tensors."""
    manifest = Manifest.load(tiny_bundle)
    unet = {tuple(sorted(p["env"].items())): p["flops"] for p in manifest.data["networks"]["unet"]["flops"]["points"]}
    assert unet[(("B", 2), ("h", 64), ("w", 64))] == 2 * unet[(("B", 1), ("h", 64), ("w", 64))]

    spec = manifest.spec("controlnet")
    module = graph_module("controlnet", TorchModels(tiny_checkout))
    env = {"B": 1, "h": 64, "w": 64}  # B=2 is checked above as twice B=1
    feeds = sample_feeds(spec, env)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        module(*(torch.from_numpy(feeds[n]) for n in spec.input_names))
    stored = {
        tuple(sorted(p["env"].items())): p["flops"] for p in manifest.data["networks"]["controlnet"]["flops"]["points"]
    }
    assert stored[tuple(sorted(env.items()))] == counter.get_total_flops()


@pytest.mark.slow
def test_gpu_script_dry_run(tmp_path, tiny_bundle):
    """benchmarks/gpu.sh end to end on the CPU (tiny fixture, PyTorch + onnxruntime fp16 graphs with IOBinding
    and static shapes; the accuracy and shape-memory checks), so the GPU lease never starts with a typo.
    Its parallel export (--jobs 2) writes the same bytes as a serial one."""
    env = {**os.environ, "PYTHON": sys.executable, "SEESR_GPU_WORK": str(tmp_path / "work")}
    out = tmp_path / "results"
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "bench_dry_run.json").read_text())
    labels = [c["label"] for c in summary["configurations"]]
    assert labels[0].startswith("PyTorch") and len(labels) == 2
    for configuration in summary["configurations"]:
        assert [r["config"]["size"] for r in configuration["results"]] == [512, 1024], configuration["label"]
        for result in configuration["results"]:
            assert _positive(result["end_to_end"]["median_ms"])
            assert _positive(result["speedup_vs_torch"]["end_to_end"])
    assert labels[1].endswith("[iobinding+static]"), labels
    for configuration in summary["configurations"]:
        for result in configuration["results"]:
            split = result["per_step"]
            assert split["step_ms"] >= split["controlnet_ms"] > 0 and split["unet_ms"] > 0, configuration["label"]
            assert split["host_glue_ms"] >= 0
    assert (out / "bench_dry_run.md").read_text().count("| per step: host glue (ms) |") == 2
    accuracy = json.loads((out / "gpu_validate_onnxruntime_dry_run.json").read_text())
    assert {r["network"] for r in accuracy["networks"]} == set(Manifest.load(tiny_bundle).data["networks"])
    assert all(r["graph"] == "fp16" and r["within_tolerance"] for r in accuracy["networks"])
    assert accuracy["end_to_end"]["psnr_vs_fp32_db"]["fp16 (plain graphs)"] > 20
    memory = json.loads((out / "ort_shapes_memory_dry_run.json").read_text())
    assert [row["shapes"] for row in memory["after_shapes"]] == [1, 2, 3]
    assert [row["sessions"] for row in memory["after_shapes"]] == [2, 4, 6]  # ControlNet + UNet per shape
    merged = json.loads((out / "merged_denoiser_dry_run.json").read_text())
    assert [row["latent_side"] for row in merged["sides"]] == [16] and merged["graphs"] == "fp32"
    assert merged["sides"][0]["rel_l2_merged_vs_two_calls"] < 1e-6
    tiled = summary["configurations"][1]["results"][1]["stages"]
    assert tiled["unet"]["calls_per_image"] == 4  # 1024 px: 128x128 latent in four 96-latent tiles, one step
    assert (out / "bench_dry_run.md").read_text().count("| **end to end (s)** |") == 2
    assert (out / "environment.txt").exists() and (out / "gpu.log").exists()
    if (out / "bench_dry_run.png").exists():  # matplotlib is optional
        assert (out / "bench_dry_run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    built = Manifest.load(tmp_path / "work" / "engines" / "tiny").data["networks"]
    serial = Manifest.load(tiny_bundle).data["networks"]
    assert {n for n, e in built.items() if "fp16_gpu" in e["files"]} == {
        "unet",
        "controlnet",
        "vae_encoder",
        "vae_decoder",
    }
    for name in serial:
        for precision in ("fp32", "fp16"):
            assert built[name]["files"][precision]["sha256"] == serial[name]["files"][precision]["sha256"], name
