"""OpenVINO bf16 precision policy, measured: which operations must stay f32 so that one UNet / ControlNet
call in bf16 stays within PyTorch bf16 autocast's error against fp32, and what each choice costs.

For each network and each candidate policy (groups of ``seesr_runtime.openvino_backend.KEEP_F32_GROUPS``
kept in f32), one guided call at 512 px (batch 2, 64x64 latent) is compiled through the runtime's own
``OpenVINOBackend`` and compared with the same call in OpenVINO f32: relative L2 of every output, and the
median call time. The UNet's residual inputs are the f32 ControlNet's outputs on the same inputs (their
real scale). With ``--seesr-root`` the same calls also run in PyTorch fp32 and under bf16 autocast (the
yardstick), in a separate process.

    python benchmarks/openvino_precision.py --bundle /work/engines/sd2-fp32 --seesr-root /work/fixtures/sd2 \\
        --threads 2 --runs 2 --name openvino_precision
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "runtime")]

from seesr_export.layout import SeeSRPaths
from seesr_runtime.bench import machine_info
from seesr_runtime.lazy import lazy_import
from seesr_runtime.manifest import Manifest
from seesr_runtime.openvino_backend import OpenVINOBackend

ov = lazy_import("openvino", extra="openvino")
# PyTorch autocast is measured in its own process (torch_worker): the OpenVINO timings never share one with torch.
torch = lazy_import("torch", extra="export")
export = lazy_import("seesr_export.export", extra="export")
export_networks = lazy_import("seesr_export.export_networks", extra="export")

ENV = {"B": 2, "h": 64, "w": 64}  # one guided step at 512 px
NETWORKS = ("controlnet", "unet")
POLICIES = (
    "none",
    "timestep",
    "softmax,norm,timestep",
    "softmax,norm,timestep,attention",
    "add,timestep",
    "add,softmax,norm,timestep",
    "all_but_matmul",
)


def relative_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(b.ravel()), 1e-30))


def feeds_for(manifest: Manifest, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """ControlNet inputs in their real ranges; the UNet's residuals are filled in later."""
    rng = np.random.default_rng(seed)
    dims = manifest.dims
    b, h, w = ENV["B"], ENV["h"], ENV["w"]
    shared = {
        "sample": rng.standard_normal((b, dims.latent_channels, h, w)).astype(np.float32),
        "timestep": np.full((b,), 499.0, np.float32),
        "encoder_hidden_states": rng.standard_normal((b, dims.text_tokens, dims.text_dim)).astype(np.float32),
        "image_embeds": rng.standard_normal((b, dims.image_tokens, dims.image_embed_dim)).astype(np.float32),
    }
    control = {
        **shared,
        "controlnet_cond": rng.random((b, 3, 8 * h, 8 * w), dtype=np.float32),
        "conditioning_scale": np.array(1.0, np.float32),
    }
    return {"controlnet": control, "unet": dict(shared)}


def timed(backend, network: str, feeds: dict, runs: int) -> tuple[list[np.ndarray], dict]:
    started = time.perf_counter()
    outputs = backend.run(network, feeds)  # compiles, then the first call
    first = time.perf_counter() - started
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        outputs = backend.run(network, feeds)
        times.append(time.perf_counter() - started)
    return outputs, {"compile_and_first_s": round(first, 2), "median_s": round(float(np.median(times)), 3)}


def measure(manifest: Manifest, args) -> tuple[list[dict], dict]:
    feeds = feeds_for(manifest)
    rows, reference = [], {}
    for network in NETWORKS:
        backend = OpenVINOBackend(manifest, precision="fp32", threads=args.threads)
        outputs, timing = timed(backend, network, feeds[network], args.runs)
        del backend
        reference[network] = outputs
        if network == "controlnet":  # the UNet gets the real residuals
            names = manifest.spec("controlnet").output_names
            feeds["unet"].update(dict(zip(names, outputs)))
        rows.append({"network": network, "precision": "f32", "keep_f32": [], "rel_l2": 0.0, **timing})
        print(json.dumps(rows[-1]), flush=True)
        for policy in args.policies:
            groups = [] if policy == "none" else policy.split(",")
            backend = OpenVINOBackend(manifest, precision="bf16", threads=args.threads, keep_f32={network: groups})
            outputs, timing = timed(backend, network, feeds[network], args.runs)
            del backend
            error = max(relative_l2(o, r) for o, r in zip(outputs, reference[network]))
            rows.append({"network": network, "precision": "bf16", "keep_f32": groups, "rel_l2": error, **timing})
            print(json.dumps(rows[-1]), flush=True)
    return rows, feeds


# ---------------------------------------------------------------- PyTorch autocast (own process)


def torch_worker(seesr_root: Path, feeds_path: Path, out: Path) -> None:
    torch.set_num_threads(int(os.environ.get("SEESR_THREADS", "0")) or torch.get_num_threads())
    saved = np.load(feeds_path)
    models, result = export_networks.TorchModels(SeeSRPaths.from_root(seesr_root)), {}
    for network in NETWORKS:
        module = export.graph_module(network, models)
        names = [n for n in saved.files if n.startswith(network + "/")]
        inputs = {n.split("/", 1)[1]: torch.from_numpy(saved[n]) for n in names}
        order = [name for name in _input_order(network, inputs)]
        with torch.no_grad():
            fp32 = _as_list(module(*(inputs[n] for n in order)))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                started = time.perf_counter()
                mixed = _as_list(module(*(inputs[n] for n in order)))
                seconds = time.perf_counter() - started
        result[network] = {
            "rel_l2": max(relative_l2(m.float().numpy(), f.numpy()) for m, f in zip(mixed, fp32)),
            "autocast_call_s": round(seconds, 3),
        }
        del module
        models.drop(network)
    out.write_text(json.dumps(result))


def _input_order(network: str, inputs: dict) -> list[str]:
    manifest = Manifest.load(os.environ["SEESR_BUNDLE"])
    return manifest.spec(network).input_names


def _as_list(outputs) -> list:
    return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]


def torch_autocast_errors(args, feeds: dict) -> dict | None:
    if args.seesr_root is None:
        return None
    with tempfile.TemporaryDirectory(prefix="seesr-ovp-") as tmp:
        feeds_path, out = Path(tmp) / "feeds.npz", Path(tmp) / "torch.json"
        np.savez(feeds_path, **{f"{n}/{k}": v for n, f in feeds.items() for k, v in f.items()})
        env = {
            **os.environ,
            "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'runtime'}",
            "SEESR_BUNDLE": str(args.bundle),
            "SEESR_THREADS": str(args.threads or 0),
        }
        subprocess.run(
            [sys.executable, __file__, "--torch-worker", str(args.seesr_root), str(feeds_path), str(out)],
            check=True,
            env=env,
        )
        return json.loads(out.read_text())


# ---------------------------------------------------------------- report


def markdown(result: dict) -> str:
    machine = result["machine"]
    lines = [
        f"# OpenVINO bf16 precision policy, SD2 size, random weights ({machine['cpu']}, "
        f"{result['threads'] or machine['cpu_count']} threads)",
        "",
        f"OpenVINO {result['openvino']}; CPU capabilities {result['capabilities']}; one guided call at 512 px "
        "(batch 2, 64x64 latent); rel L2: the worst output against OpenVINO f32 on the same inputs. "
        f"Load average before/after: {result['load_average']['before'][0]:.1f}/"
        f"{result['load_average']['after'][0]:.1f} (above the thread count, other jobs shared the cores "
        "and the times are inflated; the errors are not).",
        "",
    ]
    torch_errors = result.get("torch_autocast") or {}
    for network in NETWORKS:
        rows = [r for r in result["rows"] if r["network"] == network]
        f32 = rows[0]["median_s"]
        lines += [
            f"## {network}",
            "",
            "| precision | kept in f32 | rel L2 vs f32 | call (s) | speed-up vs f32 |",
            "|---|---|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(
                f"| {r['precision']} | {', '.join(r['keep_f32']) or '—'} | {r['rel_l2']:.2e} | "
                f"{r['median_s']:.2f} | {f32 / r['median_s']:.2f}x |"
            )
        if network in torch_errors:
            t = torch_errors[network]
            lines.append(
                f"| PyTorch bf16 autocast (vs PyTorch fp32) | softmax, norms (autocast's own list) | "
                f"{t['rel_l2']:.2e} | {t['autocast_call_s']:.2f} | |"
            )
        lines.append("")
    lines += ["Reproduce: `" + result["command"] + "`", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--torch-worker":
        torch_worker(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True, help="a bundle with fp32 unet and controlnet graphs")
    parser.add_argument("--seesr-root", type=Path, default=None, help="also measure PyTorch bf16 autocast")
    parser.add_argument(
        "--policies",
        nargs="+",
        default=list(POLICIES),
        help="comma-separated groups kept in f32 per candidate; 'none' keeps nothing",
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--runs", type=int, default=2, help="timed calls per candidate (after one untimed)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu")
    parser.add_argument("--name", default="openvino_precision")
    args = parser.parse_args(argv)
    manifest = Manifest.load(args.bundle)
    load_before = os.getloadavg()  # other jobs on the machine inflate the times (never the errors)
    rows, feeds = measure(manifest, args)
    result = {
        "benchmark": "openvino_precision",
        "machine": machine_info(),
        "openvino": ov.__version__,
        "capabilities": sorted(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
        "threads": args.threads,
        "env": ENV,
        "rows": rows,
        "platform": platform.platform(),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "command": "python benchmarks/openvino_precision.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")  # before torch: keep what ran
    result["torch_autocast"] = torch_autocast_errors(args, feeds)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    (args.out / f"{args.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
