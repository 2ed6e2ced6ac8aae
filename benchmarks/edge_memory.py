"""Memory of an upscale on a small machine: `seesr upscale` inside a memory cgroup of a given size.

    python benchmarks/edge_memory.py --bundle engines/sd2 --size 512 \\
        --config default= --config budget-4GB="--memory-budget 4GB" --bisect 2.5GB 12GB --out benchmarks/results/cpu

Whole-process peak RSS overstates what a machine needs: weights an engine maps from files are clean page
cache the kernel can drop. The honest test of "fits a 4 GB box" is a run inside a memory cgroup of that size
with the page cache charged to it and no swap. Each run here:

- makes a cgroup-v1 memory group of its own (below this process's own memory group), sets
  ``memory.limit_in_bytes`` (and ``memory.memsw.limit_in_bytes`` where the kernel accounts swap: no swap), and
  starts the child inside it (the child writes its own pid to ``cgroup.procs`` before it executes anything);
- first drops the bundle's files (and ``--cache-dir``'s) from the page cache (``posix_fadvise DONTNEED``), so
  the child's reads of them are charged to its group, not to whoever read them before;
- samples the child's ``RssAnon`` / ``RssFile`` / ``VmRSS`` (``/proc/PID/status``) and the group's charged
  usage every ``--interval`` seconds, tagging each sample with the stage the child's ``-v`` lines say it is
  in ("memory: stage denoise starts"); the step lines time each denoising step;
- reports whether it completed (exit 0 and an image) or was OOM-killed (the group's ``memory.oom_control``).

Per configuration (``--config NAME=ARGS``: extra ``seesr upscale`` arguments), one run without a limit (time,
peaks, PSNR against ``--reference``'s image) and a bisection over limits (``--bisect LOW HIGH``, ``--probes``)
for the smallest limit it completes in. With fewer steps than 50 the time is also extrapolated to 50 as the
other tables do (measured total + (50 - steps) x the median step after the first, which also loads the
denoisers). Writes edge_memory.{json,md} (``--name``) into ``--out``, with the CPU model and flags.

``--engine native`` runs the native runtime's ``seesr-upscale-cpp`` (``--native-command``, built by ``make cpp``)
with the same budget and ``--common`` / ``--config`` arguments in its own spelling (``--precision bf16``,
``--memory-budget 4GB``; one image per process): the same cgroup, samples, step times (its ``--progress`` lines)
and plan (its ``--print-plan`` JSON), without per-stage marks (the library prints none); its configurations are
named "native NAME" beside the Python ones (``--append`` to one file).

Needs root and the cgroup-v1 memory controller (/sys/fs/cgroup/memory); says so plainly and stops without.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

V1_ROOT = Path("/sys/fs/cgroup/memory")
STAGE_LINE = re.compile(r"memory: stage (\w+) (starts|ends)")
PLAN_LINE = re.compile(r"\[seesr_runtime\.pipeline\] (memory plan \(.*|  .*)$")
STEP_LINE = re.compile(r"step (\d+)/(\d+) done")
GB = 10**9


class NoCgroup(RuntimeError):
    """This machine cannot make a memory cgroup here (not root, no v1 memory controller)."""


# ---------------------------------------------------------------- the cgroup


def own_memory_group() -> Path:
    """This process's cgroup-v1 memory group (new groups are made below it, so they stay inside any limit
    the caller already runs under)."""
    if not (V1_ROOT / "memory.limit_in_bytes").exists():
        raise NoCgroup(
            f"no cgroup-v1 memory controller at {V1_ROOT} (a cgroup-v2-only kernel, or it is not mounted): "
            "this benchmark needs memory.limit_in_bytes"
        )
    if os.geteuid() != 0:
        raise NoCgroup("making a memory cgroup needs root (run this benchmark as root)")
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return V1_ROOT / path.lstrip("/")
    return V1_ROOT


class MemoryGroup:
    """A memory cgroup of its own for one child, limited to ``limit`` bytes (None: no limit, only accounted)."""

    def __init__(self, limit: int | None):
        parent = own_memory_group()
        self.path = Path(tempfile.mkdtemp(prefix="seesr-edge-", dir=parent))  # mkdir in cgroupfs makes a group
        self.swap_accounted = (self.path / "memory.memsw.limit_in_bytes").exists()
        if limit is not None:
            (self.path / "memory.limit_in_bytes").write_text(str(limit))
            if self.swap_accounted:  # memory + swap at the same limit: nothing may go to swap
                (self.path / "memory.memsw.limit_in_bytes").write_text(str(limit))

    def enter(self) -> None:
        """Move the calling process into the group (the child calls it before executing)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def read(self, name: str) -> int:
        return int((self.path / name).read_text().split()[0])

    def stat(self) -> dict[str, int]:
        return {k: int(v) for k, v in (line.split() for line in (self.path / "memory.stat").read_text().splitlines())}

    def oom_killed(self) -> bool:
        text = (self.path / "memory.oom_control").read_text()
        found = re.search(r"oom_kill (\d+)", text)
        return bool(found and int(found[1]) > 0) or self.read("memory.failcnt") > 0 and "under_oom 1" in text

    def remove(self) -> None:
        for _ in range(50):  # the group empties once the child's exit is fully reaped
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def drop_from_page_cache(folders: list[Path]) -> None:
    """Evict the files under ``folders`` from the page cache (clean pages only), so that the child's reads
    of them are charged to its own group."""
    for folder in folders:
        for path in folder.rglob("*") if folder.is_dir() else []:
            if path.is_file():
                with open(path, "rb") as handle:
                    os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


# ---------------------------------------------------------------- one run


@dataclass
class Sample:
    t: float
    stage: str
    rss_anon: int
    rss_file: int
    vm_rss: int
    charged: int  # the group's memory.usage_in_bytes (anonymous + page cache charged to it)


@dataclass
class Run:
    config: str
    limit: int | None
    size: int  # output side in px
    images: int  # upscaled one after the other by one process
    completed: bool
    oom_killed: bool
    returncode: int
    seconds: float
    peak_rss_anon: int = 0
    peak_vm_rss: int = 0
    peak_charged: int = 0  # memory.max_usage_in_bytes
    stages: dict[str, dict[str, float]] = field(default_factory=dict)  # stage -> seconds, peaks
    step_seconds: list[float] = field(default_factory=list)
    image_seconds: list[float] = field(default_factory=list)  # each image, from its first stage to the next's
    extrapolated_50_s: float | None = None
    psnr_db: float | None = None
    plan: list[str] = field(default_factory=list)  # the -v plan lines
    samples: list[Sample] = field(default_factory=list)
    error: str = ""


def status_of(pid: int) -> dict[str, int] | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmRSS"):
            values[key] = int(rest.split()[0]) * 1024
    return values if len(values) == 3 else None


def run_child(
    config: str,
    command: list[str],
    limit: int | None,
    out: Path,
    steps: int,
    interval: float,
    drop: list[Path],
    size: int,
    images: int,
) -> Run:
    group = MemoryGroup(limit)
    drop_from_page_cache(drop)
    start = time.perf_counter()
    # the child's temporary files (OpenVINO's prepared IR, GBs) under the run's folder: an OOM kill leaves them
    temporary = out.parent / f"{out.name}.tmp"
    temporary.mkdir(parents=True)
    env = {**os.environ, "TMPDIR": str(temporary)}
    child = subprocess.Popen(
        command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, preexec_fn=group.enter, env=env
    )
    state = {"stage": "start", "plan": [], "marks": [], "steps": [], "tail": []}

    def read_log() -> None:
        assert child.stderr is not None
        for line in child.stderr:
            now = time.perf_counter() - start
            if "it/s" not in line and "img/s" not in line and "step/s" not in line:  # progress bars
                state["tail"] = (state["tail"] + [line.rstrip()])[-20:]
            planned = PLAN_LINE.search(line)
            if planned:
                state["plan"].append(planned[1].rstrip())
            elif line.startswith("{"):  # seesr-upscale-cpp --print-plan: the plan as JSON
                state["plan"].append(line.rstrip())
            found = STAGE_LINE.search(line)
            if found:
                state["stage"] = found[1] if found[2] == "starts" else f"after {found[1]}"
                state["marks"].append((now, found[1], found[2]))
            if STEP_LINE.search(line):
                state["steps"].append(now)

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    samples = []
    while child.poll() is None:
        status = status_of(child.pid)
        if status is not None:
            samples.append(
                Sample(
                    time.perf_counter() - start,
                    state["stage"],
                    status["RssAnon"],
                    status["RssFile"],
                    status["VmRSS"],
                    group.read("memory.usage_in_bytes"),
                )
            )
        time.sleep(interval)
    seconds = time.perf_counter() - start
    reader.join(timeout=10)
    oom = group.oom_killed()
    run = Run(
        config,
        limit,
        size,
        images,
        completed=child.returncode == 0 and len(list(out.glob("*.png"))) == images,
        oom_killed=oom,
        returncode=child.returncode,
        seconds=seconds,
        peak_rss_anon=max((s.rss_anon for s in samples), default=0),
        peak_vm_rss=max((s.vm_rss for s in samples), default=0),
        peak_charged=group.read("memory.max_usage_in_bytes"),
        plan=state["plan"],
        samples=samples,
    )
    group.remove()
    shutil.rmtree(temporary, ignore_errors=True)
    if not run.completed:
        run.error = "\n".join(state["tail"][-5:])
    run.stages = stage_summary(state["marks"], samples)
    starts = [t for t, name, what in state["marks"] if name == "denoise" and what == "starts"]
    # the first image's steps (the native command marks no stages: its first step, which also loads, is left out)
    ticks = ([starts[0]] if starts else []) + state["steps"][:steps]
    run.step_seconds = [b - a for a, b in zip(ticks, ticks[1:])]
    firsts = [t for t, name, what in state["marks"] if name == "tag" and what == "starts"]
    run.image_seconds = [b - a for a, b in zip(firsts, [*firsts[1:], seconds])]
    if run.completed and run.step_seconds and steps < 50 and images == 1:
        # the first step also loads the denoisers: the others are the step's time
        step = float(np.median(run.step_seconds[1:] or run.step_seconds))
        run.extrapolated_50_s = seconds + (50 - steps) * step
    return run


def stage_summary(marks: list[tuple[float, str, str]], samples: list[Sample]) -> dict[str, dict[str, float]]:
    """Per stage: its seconds and the peaks sampled in it; "start": the process before its first network."""
    before = [s for s in samples if s.stage == "start"]
    summary: dict[str, dict[str, float]] = {
        "start": {
            "seconds": round(marks[0][0], 2) if marks else 0.0,
            "peak_rss_anon": max((s.rss_anon for s in before), default=0),
            "peak_vm_rss": max((s.vm_rss for s in before), default=0),
            "peak_charged": max((s.charged for s in before), default=0),
        }
    }
    opened: dict[str, float] = {}
    for t, name, what in marks:
        if what == "starts":
            opened[name] = t
        elif name in opened:
            inside = [s for s in samples if s.stage == name]
            summary[name] = {
                "seconds": round(t - opened.pop(name), 2),
                "peak_rss_anon": max((s.rss_anon for s in inside), default=0),
                "peak_vm_rss": max((s.vm_rss for s in inside), default=0),
                "peak_charged": max((s.charged for s in inside), default=0),
            }
    return summary


def psnr(a: Path, b: Path) -> float:
    x = np.asarray(Image.open(a).convert("RGB"), dtype=np.float64)
    y = np.asarray(Image.open(b).convert("RGB"), dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


# ---------------------------------------------------------------- the search


def bisect(try_limit, low: int, high: int, probes: int, resolution: int) -> int | None:
    """The smallest limit in [low, high] (to ``resolution``) that ``try_limit(limit) -> bool`` completes in,
    probing at most ``probes`` limits (high first); None if even ``high`` fails."""
    if not try_limit(high):
        return None
    passing, failing = high, low
    for _ in range(probes - 1):
        if passing - failing <= resolution:
            break
        middle = (passing + failing) // 2 // resolution * resolution or resolution
        if middle in (passing, failing):
            break
        if try_limit(middle):
            passing = middle
        else:
            failing = middle
    return passing


def parse_size(text: str) -> int:
    from seesr_runtime.options import parse_byte_size

    return parse_byte_size("size", text)


def machine() -> dict[str, object]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    memory = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    return {
        "cpu": fields.get("Model name", platform.processor()).strip(),
        "cores": os.cpu_count(),
        "memory_gb": round(int(memory) * 1024 / GB, 1),
        "bf16_flags": [f for f in flags if f in ("avx512_bf16", "amx_bf16", "amx_tile", "amx_int8", "avx512_fp16")],
        "kernel": platform.release(),
        "loadavg_start": os.getloadavg(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--size", type=int, default=512, help="output side in px (an LR image of size/4 is upscaled)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument(
        "--images", type=int, default=1, help="images per process (a budget reloads the networks for each one)"
    )
    parser.add_argument(
        "--common",
        default=None,
        help="seesr upscale arguments of every run (default: --backend openvino --precision bf16; native: "
        "--precision bf16)",
    )
    parser.add_argument(
        "--engine",
        choices=("python", "native"),
        default="python",
        help="the runtime measured: `seesr upscale`, or the native seesr-upscale-cpp (one image per process)",
    )
    parser.add_argument(
        "--native-command",
        type=Path,
        default=Path("runtime/cpp/build/seesr-upscale-cpp"),
        help="the native command (make cpp builds it)",
    )
    parser.add_argument(
        "--config", action="append", default=[], help="NAME=ARGS: a configuration (extra seesr upscale arguments)"
    )
    parser.add_argument(
        "--reference",
        default=None,
        help="arguments of the fp32 run the PSNR is measured against (no limit), run by the same runtime (the "
        "native runtime draws its own noise, so only its own fp32 image is comparable); default: --backend "
        "onnxruntime --precision fp32 --memory-budget 20GB, native: --precision fp32; '' for none",
    )
    parser.add_argument("--bisect", nargs=2, metavar=("LOW", "HIGH"), default=None, help="limits to search between")
    parser.add_argument("--limits", nargs="*", default=[], help="limits to try as well (each config)")
    parser.add_argument("--probes", type=int, default=4)
    parser.add_argument("--resolution", default="250MB")
    parser.add_argument("--interval", type=float, default=0.2)
    parser.add_argument("--no-unconstrained", action="store_true", help="skip the run without a limit")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu"))
    parser.add_argument("--name", default="edge_memory")
    parser.add_argument("--append", action="store_true", help="add to an existing --out/NAME.json")
    parser.add_argument("--render", action="store_true", help="only write NAME.md and .png again from NAME.json")
    args = parser.parse_args()
    native = args.engine == "native"
    if args.common is None:
        args.common = "--precision bf16" if native else "--backend openvino --precision bf16"
    if args.reference is None:
        args.reference = "--precision fp32" if native else "--backend onnxruntime --precision fp32 --memory-budget 20GB"
    if native and (args.images != 1 or not args.native_command.is_file()):
        print(
            f"edge_memory: --engine native needs --images 1 and the command {args.native_command} (make cpp)",
            file=sys.stderr,
        )
        return 2
    if args.render:
        target = args.out / f"{args.name}.json"
        data = json.loads(target.read_text())
        target.with_suffix(".md").write_text(markdown(data))
        plot(data, target.with_suffix(".png"))
        return 0
    try:
        own_memory_group()
    except NoCgroup as exc:
        print(f"edge_memory: cannot measure here: {exc}", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="seesr-edge-"))
    side = args.size // 4
    inputs = []
    for i in range(args.images):  # the same synthetic LR image (gradients and noise) under several names
        rng = np.random.default_rng(0)
        y, x = np.mgrid[0:side, 0:side]
        base = np.stack([x * 4, y * 5, (x + y) * 2], -1) % 256 + rng.normal(0, 8, (side, side, 3))
        inputs.append(work / f"lr{i}.png")
        Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(inputs[-1])
    common = ["--bundle", str(args.bundle), "--steps", str(args.steps), "--no-verify"]
    native_common = ["--bundle", str(args.bundle), "--steps", str(args.steps), "--verify", "never", "--progress", "yes"]
    drop = [args.bundle] + [Path(a) for a in _values_of(args.common, "--cache-dir")]
    runs: list[Run] = []
    counter = iter(range(10**6))

    def command(out: Path, given: list[str], images: list[Path]) -> list[str]:
        """The runtime's command upscaling ``images`` into ``out`` with the arguments ``given``."""
        if native:
            out.mkdir(parents=True)
            plan = ["--print-plan", "yes"]
            return [str(args.native_command), str(images[0]), str(out / "lr0.png"), *native_common, *plan, *given]
        return python_upscale([*map(str, images), *common, *given], out)

    def one(config: str, extra: str, limit: int | None) -> Run:
        out = work / f"run{next(counter)}"
        cache = [Path(a) for a in _values_of(extra, "--cache-dir")]
        given = shlex.split(args.common + " " + extra)
        config = f"native {config}" if native else config
        run = run_child(
            config,
            command(out, given, inputs),
            limit,
            out,
            args.steps,
            args.interval,
            drop + cache,
            args.size,
            args.images,
        )
        if run.completed and reference is not None:
            run.psnr_db = round(psnr(out / "lr0.png", reference), 2)
        shown = "no limit" if limit is None else f"limit {limit / GB:.2f} GB"
        print(
            f"{config}, {shown}: {'completed' if run.completed else 'OOM-killed' if run.oom_killed else 'failed'} "
            f"in {run.seconds:.0f} s; peak anon {run.peak_rss_anon / GB:.2f} GB, RSS {run.peak_vm_rss / GB:.2f} GB, "
            f"charged {run.peak_charged / GB:.2f} GB" + (f"; PSNR {run.psnr_db} dB" if run.psnr_db else ""),
            flush=True,
        )
        if run.error:
            print("  " + run.error.replace("\n", "\n  "), flush=True)
        runs.append(run)
        return run

    reference = None
    if args.reference:
        ref_out = work / "reference"
        ref = run_child(
            "native fp32 reference" if native else "fp32 reference",
            command(ref_out, shlex.split(args.reference), inputs[:1]),
            None,
            ref_out,
            args.steps,
            args.interval,
            drop,
            args.size,
            1,
        )
        print(
            f"reference ({args.reference}): {'completed' if ref.completed else 'failed'} in {ref.seconds:.0f} s",
            flush=True,
        )
        if ref.completed:
            reference = ref_out / "lr0.png"
            runs.append(ref)
    smallest: dict[str, int | None] = {}
    for spec in args.config:
        name, _, extra = spec.partition("=")
        if not args.no_unconstrained:
            one(name, extra, None)
        for limit in args.limits:
            one(name, extra, parse_size(limit))
        if args.bisect:
            low, high = (parse_size(v) for v in args.bisect)
            smallest[f"{name}, {args.size} px"] = bisect(
                lambda limit, name=name, extra=extra: one(name, extra, limit).completed,
                low,
                high,
                args.probes,
                parse_size(args.resolution),
            )
    write(args, runs, smallest)
    shutil.rmtree(work, ignore_errors=True)
    return 0


def python_upscale(words: list[str], out: Path) -> list[str]:
    """The `seesr upscale` command of one run, its images into ``out``, with the -v lines the stages are read from."""
    return [sys.executable, "-m", "seesr_runtime.cli", "upscale", *words, "-o", str(out), "-v"]


def _values_of(text: str, flag: str) -> list[str]:
    words = shlex.split(text)
    return [words[i + 1] for i, word in enumerate(words[:-1]) if word == flag]


def write(args: argparse.Namespace, runs: list[Run], smallest: dict[str, int | None]) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / f"{args.name}.json"
    data = {
        "machine": machine(),
        "bundle": str(args.bundle.name),
        "size": args.size,
        "steps": args.steps,
        "common": args.common,
        "configs": args.config,
        "smallest_limit": smallest,
        "runs": [asdict(run) for run in runs],
    }
    for run in data["runs"]:  # this call's samples thinned to one a second in the file
        run["samples"] = [s for i, s in enumerate(run["samples"]) if i % max(1, round(1 / args.interval)) == 0]
    if args.append and target.exists():
        previous = json.loads(target.read_text())
        data["runs"] = previous["runs"] + data["runs"]
        data["smallest_limit"] = {**previous.get("smallest_limit", {}), **smallest}
        data["configs"] = previous.get("configs", []) + args.config
    target.write_text(json.dumps(data, indent=1) + "\n")
    target.with_suffix(".md").write_text(markdown(data))
    plot(data, target.with_suffix(".png"))
    print(f"wrote {target}, .md and .png")


def limits_tried(runs: list[dict]) -> dict[tuple[int, str], tuple[list[int], list[int]]]:
    """(output size, configuration) -> (limits completed, limits failed), single-image runs only."""
    tried: dict[tuple[int, str], tuple[list[int], list[int]]] = {}
    for run in runs:
        if run["limit"] is None or run.get("images", 1) != 1:
            continue
        passed, failed = tried.setdefault((run.get("size"), run["config"]), ([], []))
        (passed if run["completed"] else failed).append(run["limit"])
    return tried


def plot(data: dict, target: Path) -> None:
    """Memory over time of the completed runs without a limit and at the smallest limit found, stages shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    smallest = {key: min(passed, default=None) for key, (passed, _) in limits_tried(data["runs"]).items()}
    chosen = [
        r
        for r in data["runs"]
        if r["completed"]
        and r.get("images", 1) == 1
        and (r["limit"] is None or r["limit"] == smallest.get((r.get("size"), r["config"])))
    ]
    if not chosen:
        return
    figure, axes = plt.subplots(len(chosen), 1, figsize=(10, 2.6 * len(chosen)), squeeze=False)
    colours = {"tag": "#eee", "prompt": "#ddd", "encode": "#cde", "denoise": "#fdd", "decode": "#dfd"}
    for axis, run in zip(axes[:, 0], chosen):
        samples = run["samples"]
        t = [s["t"] for s in samples]
        for key, label in (("rss_anon", "RssAnon"), ("vm_rss", "VmRSS"), ("charged", "charged to the group")):
            axis.plot(t, [s[key] / GB for s in samples], label=label)
        for stage, colour in colours.items():
            inside = [s["t"] for s in samples if s["stage"] == stage]
            if inside:
                axis.axvspan(min(inside), max(inside), color=colour, zorder=0)
                axis.text(min(inside), 0.02, stage, transform=axis.get_xaxis_transform(), fontsize=7)
        if run["limit"] is not None:
            axis.axhline(run["limit"] / GB, color="k", linestyle="--", linewidth=0.8, label="limit")
        limit = "no limit" if run["limit"] is None else f"limit {run['limit'] / GB:.2f} GB"
        axis.set_title(f"{run.get('size')} px, {run['config']}, {limit}", fontsize=9)
        axis.set_ylabel("GB")
    axes[0, 0].legend(fontsize=7, loc="upper left")
    axes[-1, 0].set_xlabel("seconds")
    figure.tight_layout()
    figure.savefig(target, dpi=90)
    plt.close(figure)


def _g(value: float | None) -> str:
    return "—" if value is None else f"{value / GB:.2f}"


def markdown(data: dict) -> str:
    """The runs as tables: one row per run, then each completed run's stages."""
    m = data["machine"]
    lines = [
        "# Memory of an upscale inside a memory cgroup (`benchmarks/edge_memory.py`)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; bf16 flags: "
        f"{', '.join(m['bf16_flags']) or 'none'}; kernel {m['kernel']}; load average at start "
        f"{', '.join(f'{v:.1f}' for v in m['loadavg_start'])}. Bundle `{data['bundle']}`, {data['steps']} steps "
        f"timed, common arguments `{data['common']}`. GB = 10^9 bytes.",
        "",
        "| output | configuration | images | cgroup limit | result | time | 50 steps, extrapolated | peak RssAnon "
        "| peak VmRSS | peak charged to the group | PSNR vs fp32 |",
        "|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run in data["runs"]:
        result = (
            "completed" if run["completed"] else "OOM-killed" if run["oom_killed"] else f"failed ({run['returncode']})"
        )
        limit = "none" if run["limit"] is None else f"{run['limit'] / GB:.2f} GB"
        extrapolated = "—" if run["extrapolated_50_s"] is None else f"{run['extrapolated_50_s']:.0f} s"
        per_image = ", ".join(f"{t:.0f}" for t in run.get("image_seconds", []))
        time_text = f"{run['seconds']:.0f} s" + (f" ({per_image} s each)" if run.get("images", 1) > 1 else "")
        lines.append(
            f"| {run.get('size', data['size'])} px | {run['config']} | {run.get('images', 1)} | {limit} | {result} | "
            f"{time_text} | {extrapolated} | "
            f"{_g(run['peak_rss_anon'])} GB | {_g(run['peak_vm_rss'])} GB | {_g(run['peak_charged'])} GB | "
            f"{'—' if run['psnr_db'] is None else str(run['psnr_db']) + ' dB'} |"
        )
    lines += [
        "",
        "| output | configuration | smallest limit completed | largest limit failed below it |",
        "|---|---|---:|---:|",
    ]
    for (size, config), (passed, failed) in limits_tried(data["runs"]).items():
        smallest = min(passed, default=None)
        below = max((f for f in failed if smallest is None or f < smallest), default=None)
        lines.append(f"| {size} px | {config} | {_g(smallest)} GB | {_g(below)} GB |")
    lines.append("")
    lines += ["## Per stage (first completed run of each configuration and limit)", ""]
    seen = set()
    for run in data["runs"]:
        key = (run["config"], run["limit"], run.get("size"), run.get("images"))
        if not run["completed"] or key in seen:
            continue
        seen.add(key)
        limit = "no limit" if run["limit"] is None else f"limit {run['limit'] / GB:.2f} GB"
        lines += [
            f"**{run.get('size', data['size'])} px, {run['config']}, {limit}, {run.get('images', 1)} image(s)**",
            "",
            "| stage | time | peak RssAnon | peak VmRSS | peak charged |",
            "|---|---:|---:|---:|---:|",
        ]
        for stage, s in run["stages"].items():
            lines.append(
                f"| {stage} | {s['seconds']:.1f} s | {_g(s['peak_rss_anon'])} GB | {_g(s['peak_vm_rss'])} GB | "
                f"{_g(s['peak_charged'])} GB |"
            )
        if run["plan"]:
            lines += ["", "```", *run["plan"], "```"]
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
