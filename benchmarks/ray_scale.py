"""``seesr upscale --ray`` against ``seesr upscale`` on one machine: images per minute with 1 and 2 actors, and
Ray's cost per image and per job.

The cluster is tests/ray_cluster.py's: two nodes on this machine in a network namespace of their own (root),
one core each, so every actor has one core, like the one-machine run (``--threads 1``). Each configuration
upscales a batch of N images and a batch of 1; their difference gives the marginal seconds per image (no
start-up in it) and the rest the fixed cost per job (process and Ray start, pipeline load). Memory: the peak
RSS (VmHWM) of the CLI's process and of each actor process, sampled while the job runs, and of the whole
cluster (every process of both nodes) at its highest sample.

    python benchmarks/ray_scale.py --bundle out/test-bundles/*/tiny --images 16 --steps 4 \\
        --json benchmarks/results/cpu/scale_out.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "runtime"), str(ROOT), str(ROOT / "tests")]

import numpy as np
from PIL import Image
from ray_cluster import ADDRESS, Cluster, namespace_unavailable, processes_in_sessions

from seesr_runtime.bench import machine_info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--images", type=int, default=16, help="images in the timed batch (default 16)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--process-size", type=int, default=64)
    parser.add_argument("--lr-side", type=int, default=32, help="side of the LR inputs in pixels (default 32)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    why = namespace_unavailable()
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="seesr-ray-bench-"))
    batch, single = write_batch(work / "batch", args.images, args.lr_side), write_batch(work / "one", 1, args.lr_side)
    options = ["--bundle", str(args.bundle.resolve()), "--backend", "onnxruntime", "--precision", "fp32"]
    options += ["--threads", "1", "--steps", str(args.steps), "--process-size", str(args.process_size)]
    try:
        rows = [measure("seesr upscale (one process)", None, batch, single, options, work)]
        cluster = Cluster(node_cpus=(1, 1)).start()
        try:
            rows.append(cluster_idle(cluster))
            for actors in (1, 2):
                rows.append(measure(f"--ray, {actors} actor(s)", cluster, batch, single, options, work, actors))
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "workload": {
            "images": args.images,
            "steps": args.steps,
            "process_size": args.process_size,
            "lr_side": args.lr_side,
            "bundle": str(args.bundle),
            "backend": "onnxruntime fp32, 1 thread per process",
        },
        "machine": machine_info(),
        "ray": ray_version(),
        "loadavg_after": os.getloadavg(),
        "rows": rows,
    }
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def write_batch(folder: Path, count: int, side: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"img{i:03d}.png")
    return folder


def measure(label, cluster, batch, single, options, work, actors=None) -> dict:
    """The batch and the single image, each timed end to end (command start to exit), with memory."""
    runs = {}
    for name, inputs in (("batch", batch), ("single", single)):
        out = work / f"{label.replace(' ', '_')}-{name}"
        argv = [sys.executable, "-m", "seesr_runtime.cli", "upscale", str(inputs), "-o", str(out), *options]
        if cluster is not None:
            argv = cluster.command([*argv, "-q", "--ray", ADDRESS, "--ray-actors", str(actors)])
        else:
            argv.append("-v")  # each image's pipeline seconds, in the debug lines
        runs[name] = timed(argv, cluster)
        if cluster is None:
            timings = re.findall(r"\] img\d+\.png: ([\d.]+) s", runs[name]["stderr"])
            runs[name]["in_process_s"] = [float(seconds) for seconds in timings]
        else:
            record = [json.loads(line) for line in (out / "seesr-job.jsonl").read_text().splitlines()]
            runs[name]["in_actor_s"] = [row["seconds"] for row in record]
            runs[name]["nodes"] = len({row["node"] for row in record})
    images = len(list(batch.iterdir()))
    marginal = (runs["batch"]["wall_s"] - runs["single"]["wall_s"]) / (images - 1)
    row = {
        "label": label,
        "actors": actors,
        "batch_wall_s": runs["batch"]["wall_s"],
        "single_wall_s": runs["single"]["wall_s"],
        "images_per_min": 60 * images / runs["batch"]["wall_s"],
        "marginal_s_per_image": marginal,
        "steady_images_per_min": 60 / marginal,
        "fixed_s_per_job": runs["single"]["wall_s"] - marginal,
        "peak_process_mb": runs["batch"]["peak_process_mb"],
        "peak_cluster_mb": runs["batch"].get("peak_cluster_mb"),
    }
    if cluster is not None:
        row["per_image_median_s"] = statistics.median(runs["batch"]["in_actor_s"])
        row["nodes_used"] = runs["batch"]["nodes"]
    else:
        row["per_image_median_s"] = statistics.median(runs["batch"]["in_process_s"])
    return row


def timed(argv, cluster) -> dict:
    """Run ``argv``; its wall time, and the peak RSS of the command's process (one process) or of the
    largest actor and of the whole cluster (sampled every 0.1 s)."""
    env = cluster.env if cluster is not None else {**os.environ, "PYTHONPATH": f"{ROOT / 'runtime'}:{ROOT}"}
    sampler = Sampler(cluster) if cluster is not None else None
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: nothing reads while it runs
        start = time.perf_counter()
        process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=log)
        if sampler:
            sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        log.seek(0)
        stderr = log.read().decode(errors="replace")
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{argv} exited {process.returncode}:\n{stderr[-3000:]}")
    if sampler:
        sampler.stop()
        peaks = {"peak_process_mb": sampler.actor_peak_mb, "peak_cluster_mb": sampler.cluster_peak_mb}
        return {"wall_s": wall, "stderr": stderr, **peaks}
    return {"wall_s": wall, "stderr": stderr, "peak_process_mb": usage.ru_maxrss / 1024}


class Sampler(threading.Thread):
    """The cluster's processes, every 0.1 s: the highest VmHWM of an actor (``ray::MapWorker``) and the
    highest sum of VmRSS over every process of both nodes."""

    def __init__(self, cluster):
        super().__init__(daemon=True)
        self.sessions = {p.pid for p in cluster.node_processes}
        self.actor_peak_mb = 0.0
        self.cluster_peak_mb = 0.0
        self.done = threading.Event()

    def run(self):
        while not self.done.wait(0.1):
            total = 0.0
            for pid in processes_in_sessions(self.sessions):
                status = read_status(pid)
                total += status.get("VmRSS", 0.0)
                if status.get("Name", "").startswith("ray::MapWorker"):
                    self.actor_peak_mb = max(self.actor_peak_mb, status.get("VmHWM", 0.0))
            self.cluster_peak_mb = max(self.cluster_peak_mb, total)

    def stop(self):
        self.done.set()
        self.join()


def read_status(pid: int) -> dict:
    fields: dict = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "Name":
                fields[key] = value.strip()
            elif key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024  # kB -> MB
    except OSError:
        pass
    return fields


def cluster_idle(cluster) -> dict:
    total = sum(
        read_status(pid).get("VmRSS", 0.0) for pid in processes_in_sessions({p.pid for p in cluster.node_processes})
    )
    return {"label": "the two idle Ray nodes", "peak_cluster_mb": total}


def ray_version() -> str:
    import ray

    return ray.__version__


def format_table(rows) -> str:
    lines = [
        "| configuration | batch wall | images/min (batch) | s/image (marginal) | images/min (steady) | fixed s/job "
        "| s/image in the pipeline's process (median) | nodes | peak RSS, process/actor | peak RSS, cluster |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if "batch_wall_s" not in row:
            lines.append(f"| {row['label']} | | | | | | | | | {row['peak_cluster_mb']:.0f} MB |")
            continue
        cluster_mb = f"{row['peak_cluster_mb']:.0f} MB" if row.get("peak_cluster_mb") else ""
        in_actor = f"{row['per_image_median_s']:.2f}"
        lines.append(
            f"| {row['label']} | {row['batch_wall_s']:.1f} s | {row['images_per_min']:.1f} | "
            f"{row['marginal_s_per_image']:.2f} | {row['steady_images_per_min']:.1f} | {row['fixed_s_per_job']:.1f} | "
            f"{in_actor} | {row.get('nodes_used', 1)} | {row['peak_process_mb']:.0f} MB | {cluster_mb} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
