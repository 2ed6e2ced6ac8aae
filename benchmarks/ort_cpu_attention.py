"""Does onnxruntime's fused attention make the CPU provider faster at the 96-latent tile?

At 1024 px (four 96-latent tiles) the runtime on onnxruntime CPU fp32 is slower than PyTorch: the exported
graphs compute attention unfused, so each call materialises the full score and softmax tensors (9216
tokens). onnxruntime's transformer optimizer can fuse that attention into its contrib ops ``Attention``
(self-attention, fused QKV weights) and ``MultiHeadAttention`` (cross-attention), which have CPU kernels;
the other Stable Diffusion fusions (GroupNorm, BiasSplitGelu, packed QKV/KV, ...) have CUDA kernels only
and are left out (``seesr_export.gpu_graph.write_cpu_fused_graph``).

This fuses one network's fp32 graph that way and times one call of the plain and the fused graph, each in
its own process (2 threads, no CPU arena, as the runtime's default), at each latent side; it reports the
median call, the process's peak RSS and the fused graph's error against the plain one.

    python benchmarks/ort_cpu_attention.py --bundle /work/engines/sd2-fp32 --network controlnet --sides 96 64 \\
        --runs 3 --out benchmarks/results/cpu

The ControlNet stands in for the UNet: it has the same attention blocks at the 96-tile's full resolution
(its down blocks and mid block); the optimizer needs about 5x a graph's size in memory, 10.7 GB for the
ControlNet, so the 4.5 GB UNet cannot be fused on a 24 GB machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "runtime")]

from seesr_runtime.bench import machine_info
from seesr_runtime.lazy import lazy_import
from seesr_runtime.manifest import Manifest

# Loads torch (through the exporter's graph helpers): only the fusing worker uses it, never a timing worker.
gpu_graph = lazy_import("seesr_export.gpu_graph", extra="export")


def call_feeds(manifest: Manifest, network: str, side: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(side)
    feeds = {}
    for tensor in manifest.spec(network).inputs:
        shape = tensor.concrete_shape({"B": 2, "h": side, "w": side})
        feeds[tensor.name] = rng.standard_normal(shape).astype(np.float32)
    feeds["timestep"] = np.full((2,), 499.0, np.float32)
    if "conditioning_scale" in feeds:
        feeds["conditioning_scale"] = np.array(1.0, np.float32)
    return feeds


def worker(bundle: str, network: str, graph: str, side: int, runs: int, threads: int, out: str) -> None:
    """One process: a session on ``graph``, ``runs`` timed calls after one warm-up; outputs saved."""
    manifest = Manifest.load(bundle)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_cpu_mem_arena = False
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    feeds = call_feeds(manifest, network, side)
    session.run(None, feeds)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        outputs = session.run(None, feeds)
        times.append(time.perf_counter() - started)
    np.savez(out + ".npz", *outputs)
    Path(out + ".json").write_text(json.dumps({"times_s": times, "peak_rss_gb": peak_rss_gb()}))


def peak_rss_gb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it does not start from the parent's at fork)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def fuse_worker(plain: str, fused: str) -> None:
    """Its own process, so the optimizer's memory (about 5x the graph) is gone before the timing."""
    started = time.perf_counter()
    gpu_graph.write_cpu_fused_graph(Path(plain), Path(fused), "unet")
    report = {
        "fuse_s": time.perf_counter() - started,
        "peak_rss_gb": peak_rss_gb(),
        "fused_ops": gpu_graph.fused_op_counts(onnx.load(fused, load_external_data=False)),
    }
    Path(fused + ".json").write_text(json.dumps(report))


def measure(args, graph: Path, side: int, tag: str, work: Path) -> dict:
    out = str(work / f"{tag}_{side}")
    subprocess.run(
        [
            sys.executable,
            __file__,
            "--worker",
            str(args.bundle),
            args.network,
            str(graph),
            str(side),
            str(args.runs),
            str(args.threads),
            out,
        ],
        check=True,
    )
    report = json.loads(Path(out + ".json").read_text())
    return {
        "median_s": statistics.median(report["times_s"]),
        "times_s": report["times_s"],
        "peak_rss_gb": report["peak_rss_gb"],
    }


def relative_l2_worst(plain: Path, fused: Path) -> float:
    a, b = np.load(plain), np.load(fused)
    return max(float(np.linalg.norm(a[k] - b[k]) / max(np.linalg.norm(a[k]), 1e-30)) for k in a.files)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--fuse-worker":
        fuse_worker(*sys.argv[2:4])
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        bundle, network, graph, side, runs, threads, out = sys.argv[2:]
        worker(bundle, network, graph, int(side), int(runs), int(threads), out)
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--network", default="controlnet", choices=("controlnet", "unet"))
    parser.add_argument("--sides", type=int, nargs="+", default=[96, 64], help="latent sides (96: the 1024 px tile)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu")
    args = parser.parse_args()

    manifest = Manifest.load(args.bundle)
    plain = manifest.graph_path(args.network, "fp32")
    with tempfile.TemporaryDirectory(prefix="seesr-attn-") as tmp:
        work = Path(tmp)
        fused = work / f"{args.network}_fused.onnx"
        subprocess.run([sys.executable, __file__, "--fuse-worker", str(plain), str(fused)], check=True)
        fusing = json.loads(Path(str(fused) + ".json").read_text())
        rows = []
        for side in args.sides:
            a = measure(args, plain, side, "plain", work)
            b = measure(args, fused, side, "fused", work)
            error = relative_l2_worst(work / f"plain_{side}.npz", work / f"fused_{side}.npz")
            rows.append(
                {
                    "side": side,
                    "plain": a,
                    "fused": b,
                    "speedup": a["median_s"] / b["median_s"],
                    "rel_l2_worst_output": error,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    report = {
        "network": args.network,
        "machine": machine_info(),
        "threads": args.threads,
        "fusing": fusing,
        "rows": rows,
        "command": " ".join(["python", *sys.argv]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ort_cpu_attention.json").write_text(json.dumps(report, indent=1))
    lines = [
        f"# onnxruntime CPU: fused attention vs the plain fp32 graph ({args.network}, SD2 size, random weights)",
        "",
        f"{report['machine'].get('cpu')}, {args.threads} threads, no CPU arena; fused ops {fusing['fused_ops']} "
        f"(the optimizer took {fusing['fuse_s']:.0f} s and {fusing['peak_rss_gb']:.1f} GB); "
        f"one warm-up, then {args.runs} calls (median).",
        "",
        "| latent side | plain call (s) | fused call (s) | fused vs plain | peak RSS plain / fused (GB) | rel L2 |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['side']} | {r['plain']['median_s']:.2f} | {r['fused']['median_s']:.2f} | {r['speedup']:.2f}x | "
            f"{r['plain']['peak_rss_gb']:.2f} / {r['fused']['peak_rss_gb']:.2f} | {r['rel_l2_worst_output']:.1e} |"
        )
    lines += ["", f"Reproduce: `{report['command']}`", ""]
    (args.out / "ort_cpu_attention.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
