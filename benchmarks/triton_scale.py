"""Triton scale-up on one machine: throughput and server memory of the generated model at 1 and 2 instances under
concurrent clients, onnxruntime fp32 against OpenVINO (precision auto: bf16 on CPUs with bf16 units).

    # in the Triton env (`make test-triton` builds .venv-triton: tritonclient, the tritonserver binary, openvino)
    .venv-triton/bin/python benchmarks/triton_scale.py --bundle out/triton-test/engines/tiny \
        --out benchmarks/results/cpu --name triton_scale

For each backend and instance count: ``seesr-export triton`` writes a repository (threads per instance: cores /
instances, the generator's default), a real ``tritonserver`` (tests/triton_server.py: 127.0.0.1, the binary of
the nvidia-pytriton wheel) serves it, ``--warmup`` requests compile what each instance compiles on first use
(OpenVINO: each shape), then ``--requests`` requests of one ``--size`` image, ``--concurrency`` at a time, each
client thread with its own connection. Recorded: requests/s, latency p50/p95, the server's resident memory
(tritonserver and its stub processes) once ready, after the warm-up and at its peak during the load (sampled every
0.1 s), and the startup and warm-up seconds. Writes NAME.json and NAME.md into ``--out``, with the CPU (lscpu).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "runtime"), str(ROOT)]
from triton_server import TritonServer  # the tests' real-server harness: one way to run tritonserver here

from seesr_export.cli import main as export_main
from seesr_runtime.triton_client import build_inputs, connect, encode_png, infer

FORMAT = "seesr-triton-scale"
MiB = 1024 * 1024
CONFIGS = {
    "onnxruntime fp32": ["--backend", "onnxruntime", "--precision", "fp32"],
    "openvino auto": ["--backend", "openvino"],
}


def machine() -> dict[str, object]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    return {
        "cpu": fields.get("Model name", platform.processor()).strip(),
        "cores": os.cpu_count(),
        "bf16_flags": [f for f in flags if f in ("avx512_bf16", "amx_bf16", "amx_tile")],
        "loadavg_start": os.getloadavg(),
    }


class PeakMemory:
    """The server's resident memory, sampled on a thread until stopped; the highest value seen."""

    def __init__(self, server: TritonServer, interval: float = 0.1):
        self.server, self.interval, self.peak = server, interval, server.resident_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.server.resident_bytes())

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_load(server: TritonServer, image: bytes, count: int, concurrency: int, steps: int) -> list[float]:
    """``count`` requests, ``concurrency`` at a time; each one's seconds. A failed request raises."""
    local = threading.local()
    clients = []
    lock = threading.Lock()

    def one(index: int) -> float:
        if not hasattr(local, "client"):
            local.client = connect("http", server.http_url, timeout=600)
            with lock:
                clients.append(local.client)
        began = time.perf_counter()
        infer(local.client, "http", build_inputs("http", image, seed=index, steps=steps), timeout=600)
        return time.perf_counter() - began

    try:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            return list(pool.map(one, range(count)))
    finally:
        for client in clients:
            client.close()


def measure(args: argparse.Namespace, config: str, instances: int, work: Path) -> dict[str, object]:
    repo = work / f"{config.replace(' ', '-')}-{instances}"
    options = ["--instances", str(instances), "--option", f"process_size={args.process_size}", "-q"]
    if export_main(["triton", "--bundle", str(args.bundle), "--out", str(repo), *CONFIGS[config], *options]) != 0:
        raise SystemExit(f"seesr-export triton failed for {config}")
    height, width = args.size
    rng = np.random.default_rng(0)
    image = encode_png(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
    load_before = os.getloadavg()[0]
    with TritonServer(repo, repo.parent / f"{repo.name}-server", start_timeout=600) as server:
        ready = server.resident_bytes()
        began = time.perf_counter()
        run_load(server, image, args.warmup * instances, instances, args.steps)  # every instance warms up
        warmup_s = time.perf_counter() - began
        warm = server.resident_bytes()
        with PeakMemory(server) as memory:
            began = time.perf_counter()
            seconds = run_load(server, image, args.requests, args.concurrency, args.steps)
            elapsed = time.perf_counter() - began
        log = server.log_tail(1_000_000)
    precision = next(
        (line.split("'precision': '")[1].split("'")[0] for line in log.splitlines() if "ready: bundle" in line), None
    )
    p50, p95 = np.percentile(np.array(seconds) * 1000, [50, 95])
    row = {
        "config": config,
        "precision": precision,
        "instances": instances,
        "threads_per_instance": max(1, (os.cpu_count() or 1) // instances),
        "requests": args.requests,
        "concurrency": args.concurrency,
        "throughput_rps": args.requests / elapsed,
        "latency_ms": {"p50": float(p50), "p95": float(p95), "mean": statistics.fmean(seconds) * 1000},
        "startup_s": server.startup_seconds,
        "warmup_s": warmup_s,
        "rss_mib": {"ready": ready / MiB, "warm": warm / MiB, "peak": memory.peak / MiB},
        "loadavg_1min": {"before": load_before, "after": os.getloadavg()[0]},  # other work on a shared machine
    }
    print(
        f"{config:>17} ({precision}) x{instances}: {row['throughput_rps']:.2f} req/s, p50 {p50:.0f} ms, "
        f"p95 {p95:.0f} ms; RSS ready {ready / MiB:.0f} MiB, peak {memory.peak / MiB:.0f} MiB; "
        f"startup {server.startup_seconds:.1f} s, warm-up {warmup_s:.1f} s",
        flush=True,
    )
    return row


def _load(run: dict) -> str:
    load = run.get("loadavg_1min")  # absent from runs of the first version of this script
    return f"{load['before']:.1f} / {load['after']:.1f}" if load else "not recorded"


def markdown(data: dict) -> str:
    m, w = data["machine"], data["workload"]
    lines = [
        f"# Triton scale-up: {m['cpu']}, {m['cores']} cores",
        "",
        f"{w['bundle_kind']} bundle, {w['size'][1]}x{w['size'][0]} px input (x4 out), process_size "
        f"{w['process_size']}, {w['steps']} steps; {w['requests']} requests, {w['concurrency']} concurrent "
        f"HTTP clients, after {w['warmup']} warm-up requests per instance. Threads per instance: cores / "
        f"instances. Server RSS: tritonserver and its Python-backend stubs. Load average at start "
        f"{', '.join(f'{v:.2f}' for v in m['loadavg_start'])} (a shared machine). `{data['command']}`",
        "",
        "| backend (precision) | instances | req/s | p50 ms | p95 ms | RSS ready MiB | RSS peak MiB | startup s "
        "| warm-up s | load avg before / after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["runs"]:
        lines.append(
            f"| {r['config'].split()[0]} ({r['precision']}) | {r['instances']} | {r['throughput_rps']:.2f} | "
            f"{r['latency_ms']['p50']:.0f} | {r['latency_ms']['p95']:.0f} | {r['rss_mib']['ready']:.0f} | "
            f"{r['rss_mib']['peak']:.0f} | {r['startup_s']:.1f} | {r['warmup_s']:.1f} | "
            f"{_load(r)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--bundle-kind", default="tiny", help="what the bundle is, for the report (tiny, SD2)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu")
    parser.add_argument("--name", default="triton_scale")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--size", type=int, nargs=2, default=[48, 64], metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--process-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="warm-up requests per instance")
    args = parser.parse_args()
    data = {
        "format": FORMAT,
        "version": 1,
        "machine": machine(),
        "command": " ".join(["python", "benchmarks/triton_scale.py", *sys.argv[1:]]),
        "workload": {
            "bundle_kind": args.bundle_kind,
            "size": args.size,
            "process_size": args.process_size,
            "steps": args.steps,
            "requests": args.requests,
            "concurrency": args.concurrency,
            "warmup": args.warmup,
        },
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="seesr-triton-scale-") as work:
        for config in args.configs:
            for instances in args.instances:
                data["runs"].append(measure(args, config, instances, Path(work)))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(data, indent=1) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(data))
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
