"""``seesr upscale INPUT -o OUT --ray [ADDRESS]``: the batch on a Ray cluster (Ray Data, the ``ray`` extra).

The driver (where the command runs) lists the inputs, leaves out those already done (``--skip-existing``)
and hands the rest to a Ray Data ``map_batches`` over a pool of actors. Each actor holds one pipeline, built
from the same flags as ``seesr upscale`` (``upscaling.open_pipeline``), and runs each image through the
same code as the one-machine batch (``upscaling.upscale_and_write``): the same options and seed give the
same bytes. Every node must see the bundle and the output folder at the same path (shared storage); inputs
may also be any fsspec URL the nodes can read (``s3://``, ``gs://``, ...).

Failures, as a long batch meets them:

- a bad image is an ``error`` row in the job record, and the job goes on;
- a worker that dies (killed, out of memory, its node lost) is restarted by Ray and its images are retried;
  outputs are written atomically (``filemodes.write_atomically``), so a retry replaces a file with the same
  bytes and never leaves a partial one, the driver keeps one row per image, and at the end it removes the
  temporary files killed writers left;
- a stopped job resumes with ``--skip-existing``.

The job record (``--job-record``, default ``OUT/seesr-job.jsonl``) gets one JSON line per image, appended as
results arrive: ``job``, ``input``, ``output``, ``status`` (``done``, ``skipped`` or ``error``), ``seconds``,
``node`` (Ray's node id), ``host``, ``pid`` (the worker process), ``engine`` and ``error``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from . import logs
from .errors import BackendError, InputError, OptionError, SeeSRError
from .inputs import IMAGE_SUFFIXES, load_lr_image, load_lr_image_bytes
from .lazy import lazy_import
from .upscaling import open_pipeline, output_png, summary_line, upscale_and_write

log = logging.getLogger(__name__)

ray = lazy_import("ray", extra="ray")
ray_data = lazy_import("ray.data", extra="ray")
fsspec = lazy_import("fsspec", extra="ray")
tqdm = lazy_import("tqdm")

RECORD_NAME = "seesr-job.jsonl"
RECORD_FIELDS = ("input", "output", "status", "seconds", "node", "host", "pid", "engine", "error")
# One image per Ray Data block, so a retried task redoes one image; past this many images, several share one.
MAX_BLOCKS = 100_000
# Backends and onnxruntime providers that run on an NVIDIA GPU: their actors ask Ray for one GPU each.
GPU_PROVIDERS = ("cuda", "tensorrt")
# Ray Data's threads that release object references after the last row (its executor's scheduling loop and the
# metadata prefetcher), and how long to wait for them before leaving the cluster
RAY_DATA_THREADS = ("StreamingExecutor-", "ray-data-metadata-prefetch")
RAY_DATA_SETTLE_S = 30.0
# An output given as a URL ("s3://b/x" reaches us as the Path "s3:/b/x").
URL_LIKE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")


def run_ray_batch(args: argparse.Namespace, given: dict[str, Any]) -> int:
    """``seesr upscale ... --ray``: the whole job; returns the exit status (0, or 1 when an image failed)."""
    if URL_LIKE.match(str(args.output)):
        raise OptionError(
            f"-o {args.output}: the output must be a folder every node can write at the same path (shared "
            "storage), not a URL; mount the object store, or copy the results up after the job"
        )
    sources = list_sources(args.inputs)
    if not sources:
        print("error: no input images found", file=sys.stderr)
        return 2
    targets = targets_of(sources, args.output.resolve())
    args = absolute_paths(args)
    record_path = (args.job_record or args.output / RECORD_NAME).resolve()
    args.output.mkdir(parents=True, exist_ok=True)
    job = uuid.uuid4().hex[:12]
    finished = {s for s in sources if args.skip_existing and targets[s].exists()}
    todo = [s for s in sources if s not in finished]
    skipped = [s for s in sources if s in finished]
    failed: list[str] = []
    with open(record_path, "a", encoding="utf-8") as record:
        for source in skipped:
            write_row(record, job, {"input": source, "output": str(targets[source]), "status": "skipped"})
        done = run_on_cluster(args, given, todo, job, record, failed) if todo else 0
    remove_job_temporaries(args.output, [targets[s] for s in todo])
    print(summary_line(done, len(skipped), failed), file=sys.stderr)
    log.info(f"job record: {record_path}")
    return 1 if failed else 0


def run_on_cluster(
    args: argparse.Namespace, given: dict[str, Any], todo: list[str], job: str, record: IO[str], failed: list[str]
) -> int:
    """Upscale ``todo`` on the cluster, appending a row per image to ``record`` as results arrive and the
    failed inputs to ``failed``; returns how many were upscaled."""
    connect(args.ray)
    try:
        placement = actor_placement(args, ray.cluster_resources(), alive_node_cpus())
        log.info(
            f"ray: {len(todo)} images on {placement['actors']} actors "
            f"({placement['num_gpus']} GPU, {placement['num_cpus']} CPU each)"
        )
        seen: set[str] = set()
        with tqdm.tqdm(
            total=len(todo), desc="images", unit="img", disable=not logs.progress_enabled(), file=sys.stderr
        ) as bar:
            for row in upscaled_rows(args, given, todo, placement):
                if row["input"] in seen:  # a retried task's second answer for an image: one row per image
                    continue
                seen.add(row["input"])
                write_row(record, job, row)
                report_row(row, failed)
                bar.update(1)
        return len(seen) - len(failed)
    except ray.exceptions.RayError as exc:  # no pipeline could start, the cluster went away: the job fails
        raise BackendError(f"the Ray job stopped: {cause_line(exc)} (the workers' logs say more)") from exc
    finally:
        settle_ray_data()
        ray.shutdown()


def settle_ray_data() -> None:
    """Wait (bounded) for Ray Data's background threads to finish before ``ray.shutdown()``: one still touching
    the core worker after it ends the process with status 1 ("The core worker has already been shutdown ...
    The process will exit"), which a job whose every image was written then reports as failed (seen after a
    worker was killed mid-batch, when the pool's teardown takes longer)."""
    gc.collect()  # a finished dataset's executor shuts down when it is collected
    deadline = time.monotonic() + RAY_DATA_SETTLE_S
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and thread.name.startswith(RAY_DATA_THREADS):
            thread.join(max(0.0, deadline - time.monotonic()))


def cause_line(exc: BaseException) -> str:
    """The last line of a Ray error that says something (its root cause, after the tracebacks)."""
    lines = [line.strip() for line in str(exc).splitlines()]
    meaningful = [line for line in lines if line and not set(line) <= set("^~ ")]
    return meaningful[-1] if meaningful else type(exc).__name__


def connect(address: str) -> None:
    """Join the cluster at ``address`` ("auto": RAY_ADDRESS or a cluster already running here, else a new
    local one; ``HOST:PORT`` or ``ray://HOST:PORT`` otherwise), with Ray's own progress bars off: the job
    draws the CLI's."""
    ray.init(
        address=None if address == "auto" else address,
        logging_level=logging.WARNING,
        configure_logging=True,
    )
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its notes on each execution
    context = ray_data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


def alive_node_cpus() -> list[float]:
    return [node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"]]


def actor_placement(args: argparse.Namespace, cluster: dict[str, float], node_cpus: list[float]) -> dict[str, Any]:
    """How many actors, and what each asks of Ray: one GPU on GPU nodes (``--providers cuda``, ``--backend
    tensorrt``, or no backend option on a cluster with GPUs), else ``--threads`` cores (default: the
    smallest node's cores, one actor per node). Sets ``args.threads`` for the CPU case, so each pipeline
    runs as many threads as its actor holds cores. Default count: every GPU, or as many actors as the nodes'
    cores hold; ``--ray-actors`` overrides."""
    if wants_gpu(args, cluster):
        per_actor = {"num_gpus": 1, "num_cpus": 1}
        fits = int(cluster.get("GPU", 0))
    else:
        smallest = int(min(node_cpus, default=1)) or 1
        args.threads = args.threads or smallest
        per_actor = {"num_gpus": 0, "num_cpus": args.threads}
        fits = sum(int(cpus // args.threads) for cpus in node_cpus)
    actors = args.ray_actors or fits
    if actors < 1:
        raise InputError(
            f"no Ray node can hold an actor of {per_actor['num_cpus']} CPUs and {per_actor['num_gpus']} GPUs "
            f"(nodes' CPUs: {node_cpus}); lower --threads or add nodes"
        )
    return {"actors": actors, **per_actor}


def wants_gpu(args: argparse.Namespace, cluster: dict[str, float]) -> bool:
    if args.backend == "tensorrt" or any(p.lower() in GPU_PROVIDERS for p in args.providers or ()):
        return True
    no_backend_option = args.backend is None and args.precision is None and args.providers is None
    return no_backend_option and args.device is None and cluster.get("GPU", 0) > 0


def upscaled_rows(
    args: argparse.Namespace, given: dict[str, Any], todo: list[str], placement: dict[str, Any]
) -> Iterator[dict[str, Any]]:
    """The rows of ``todo`` as the actors finish them (any order)."""
    items = [{"source": source} for source in todo]
    dataset = ray_data.from_items(items, override_num_blocks=min(len(items), MAX_BLOCKS))
    # Ray Data's defaults for an actor pool are what a long batch needs: actors spread over the nodes, a dead
    # one restarted, and its images retried (max_restarts and max_task_retries -1).
    upscaled = dataset.map_batches(
        upscaler_for(args, given),
        batch_size=1,
        batch_format="numpy",
        # two images in flight per actor: the next one's file is read while one runs, and a dead actor
        # takes at most two back to the pool
        compute=ray_data.ActorPoolStrategy(size=placement["actors"], max_tasks_in_flight_per_actor=2),
        num_cpus=placement["num_cpus"],
        num_gpus=placement["num_gpus"] or None,
    )
    for row in upscaled.iter_rows():
        yield {field: _plain(row[field]) for field in RECORD_FIELDS}


def _plain(value: Any) -> Any:
    """A value of a Ray Data row as JSON takes it: numpy scalars as Python's, "" (no error) as None."""
    value = value.item() if hasattr(value, "item") else value
    return None if value == "" else value


def upscaler_for(args: argparse.Namespace, given: dict[str, Any]) -> type[Upscaler]:
    """``Upscaler`` with the job's settings as class attributes. Ray pickles the class with them, so a
    restarted actor needs no constructor arguments from the object store (which may be gone by then:
    ray-project/ray#53727)."""
    return type("Upscaler", (Upscaler,), {"settings": (args, given)})


class Upscaler:
    """A Ray Data actor: one pipeline, made once, then one image per call."""

    settings: tuple[argparse.Namespace, dict[str, Any]]  # set by ``upscaler_for``

    def __init__(self) -> None:
        args, given = self.settings
        logs.configure(quiet=not args.verbose, verbose=args.verbose)  # the driver reports each image
        self.args = args
        self.pipe, self.options = open_pipeline(args, given)  # the backend chosen on this actor's node
        self.node = ray.get_runtime_context().get_node_id()
        self.engine = f"{args.backend} {args.precision}"

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        rows = [self.upscale(str(source)) for source in batch["source"]]
        return {field: [row[field] for row in rows] for field in RECORD_FIELDS}

    def upscale(self, source: str) -> dict[str, Any]:
        start = time.perf_counter()
        row = {"input": source, "output": "", "status": "done", "error": ""}
        try:
            lr, note = read_lr_image(source, self.options["max_pixels"])
            if note:
                log.info(f"note: {source}: {note}")
            target, _ = upscale_and_write(
                self.pipe, lr, source_name(source), self.options, self.args.output, self.args.save_prompts
            )
            row["output"] = str(target)
        except (SeeSRError, OSError) as exc:  # this image's fault (or its file's): a row, not a failed job
            row.update(status="error", error=str(exc))
        seconds = round(time.perf_counter() - start, 3)
        where = {"node": self.node, "host": socket.gethostname(), "pid": os.getpid(), "engine": self.engine}
        return {**row, "seconds": seconds, **where}


def read_lr_image(source: str, max_pixels: int) -> tuple[Any, str | None]:
    """The LR image at ``source`` (a path, or a URL read through fsspec), as ``load_lr_image`` opens it."""
    if is_url(source):
        with fsspec.open(source, "rb") as handle:
            return load_lr_image_bytes(handle.read(), max_pixels)
    return load_lr_image(Path(source), max_pixels)


def is_url(source: str) -> bool:
    return "://" in source


def source_name(source: str) -> str:
    return source.rstrip("/").rsplit("/", 1)[-1] if is_url(source) else Path(source).name


def list_sources(inputs: Iterable[Path | str]) -> list[str]:
    """The images to upscale, as absolute paths or URLs: folders expanded to their images (sorted, not
    recursive), list files (any file that is not an image: one path or URL a line, ``#`` comments; relative
    paths are relative to the list file) read, URLs listed through fsspec."""
    sources: list[str] = []
    for given in inputs:
        text = str(given)
        if is_url(text):
            sources.extend(list_url(text))
            continue
        path = Path(text).resolve()
        if path.is_dir():
            sources.extend(str(p) for p in sorted(path.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file() and path.suffix.lower() not in IMAGE_SUFFIXES:
            sources.extend(read_list_file(path))
        else:
            sources.append(str(path))
    return sources


def read_list_file(path: Path) -> list[str]:
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    entries = [line for line in lines if line and not line.startswith("#")]
    return [entry if is_url(entry) else str((path.parent / entry).resolve()) for entry in entries]


def list_url(url: str) -> list[str]:
    """A URL's images: the folder's (sorted, not recursive) or the one file."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.isdir(path):
        return [url]
    names = sorted(str(p) for p in fs.ls(path, detail=False) if Path(str(p)).suffix.lower() in IMAGE_SUFFIXES)
    return [fs.unstrip_protocol(name) for name in names]


def targets_of(sources: list[str], output: Path) -> dict[str, Path]:
    """Each source's output PNG; two sources that would write the same file are refused before any work."""
    targets: dict[str, Path] = {}
    by_target: dict[Path, str] = {}
    for source in sources:
        target = output_png(output, source_name(source))
        if target in by_target:
            raise InputError(f"{by_target[target]} and {source} would both write {target}: rename one")
        by_target[target] = source
        targets[source] = target
    return targets


def absolute_paths(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of ``args`` for the actors: paths absolute (a Ray worker's working folder is not the
    driver's), the command's function left out."""
    fields = {k: v for k, v in vars(args).items() if k != "func"}
    for name in ("output", "bundle", "cache_dir", "tiled_vae_spill_dir", "job_record"):
        if fields.get(name) is not None:
            fields[name] = Path(fields[name]).resolve()
    return argparse.Namespace(**fields)


def write_row(record: IO[str], job: str, row: dict[str, Any]) -> None:
    """One line of the job record, flushed: a stopped job keeps every row written before it stopped."""
    full = {"job": job, **{field: row.get(field) for field in RECORD_FIELDS}}
    record.write(json.dumps(full) + "\n")
    record.flush()


def report_row(row: dict[str, Any], failed: list[str]) -> None:
    if row["status"] == "error":
        log.error(f"{row['input']}: {row['error']}")
        failed.append(row["input"])
    else:
        log.info(f"{row['input']} -> {row['output']} ({row['seconds']:.1f} s on {row['host']}, pid {row['pid']})")


def remove_job_temporaries(output: Path, targets: list[Path]) -> None:
    """Temporary files that writers killed mid-write left for this job's outputs. Every actor has stopped
    by now, so any left is a dead writer's, whichever node it ran on (``remove_stale_temporaries`` can only
    ask this machine whether a process lives); another job writing the same names at once would lose its
    unfinished ones."""
    names = {t.name for t in targets} | {f"{t.stem}.txt" for t in targets}
    for folder in (output, output / "txt"):
        for tmp in folder.glob(".*.tmp") if folder.is_dir() else ():
            if any(tmp.name.startswith(f".{name}.") for name in names):
                tmp.unlink(missing_ok=True)
