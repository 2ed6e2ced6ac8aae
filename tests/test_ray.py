"""``seesr upscale --ray`` on a real two-node Ray cluster (tests/ray_cluster.py): the work spread over both
nodes with the CLI's bytes, a corrupt file as an error row, a SIGKILLed worker whose images are retried with
every output present once, and a resumed job that skips finished images. The cluster and its clients run in
a network namespace of their own (loopback only); one cluster serves the module."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from seesr_runtime.cli import main

pytest.importorskip("ray", reason="the 'ray' extra is not installed (pip install '.[ray]')")

from ray_cluster import ADDRESS, Cluster, namespace_unavailable

# Ray clusters and command-line batches in subprocesses: integration, not the inner loop (`make test-fast`).
pytestmark = pytest.mark.slow

# The same options on both sides; one thread each, so onnxruntime's sums run in the same order.
OPTIONS = ["--backend", "onnxruntime", "--precision", "fp32", "--threads", "1", "--process-size", "64"]
GOOD = 6
# Enough steps that one actor cannot finish the first batch alone while the other is still loading its
# pipeline (Ray Data starts using a pool's actors as each becomes ready).
STEPS = 8


@pytest.fixture(scope="module")
def cluster():
    why = namespace_unavailable()
    if why:
        pytest.skip(f"the Ray cluster runs in a network namespace of its own: {why}")
    # One core per node, one core per actor: the two actors cannot share a node.
    started = Cluster(node_cpus=(1, 1)).start()
    yield started
    started.stop()


def write_images(folder, names, seed):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / name)


def ray_upscale(cluster, inputs, out, *extra, steps=STEPS) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "seesr_runtime.cli", "upscale", str(inputs), "-o", str(out)]
    argv += [*OPTIONS, "--steps", str(steps), "--ray", ADDRESS, *extra]
    return subprocess.run(cluster.command(argv), env=cluster.env, capture_output=True, text=True, timeout=600)


def record_rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "seesr-job.jsonl").read_text().splitlines()]


def last_job(rows) -> list[dict]:
    return [row for row in rows if row["job"] == rows[-1]["job"]]


@pytest.fixture(scope="module")
def first_job(cluster, runtime_bundle, tmp_path_factory):
    """A batch of six good images and a corrupt one, run once on the cluster."""
    inputs = tmp_path_factory.mktemp("ray-in")
    write_images(inputs, [f"img{i}.png" for i in range(GOOD)], seed=1)
    (inputs / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png at all")
    out = tmp_path_factory.mktemp("ray-out")
    done = ray_upscale(cluster, inputs, out, "--bundle", str(runtime_bundle))
    return inputs, out, done


def test_batch_spreads_over_both_nodes_with_the_clis_bytes(first_job, cluster, runtime_bundle, tmp_path):
    inputs, out, done = first_job
    rows = record_rows(out)
    used = {cluster.nodes[row["node"]] for row in rows if row["status"] == "done"}
    assert used == {"head_node", "second_node"}, (rows, done.stderr[-3000:])
    assert len({row["pid"] for row in rows}) == 2  # two actors, one pipeline each

    cli_out = tmp_path / "cli"
    code = main(
        ["upscale", str(inputs), "-o", str(cli_out), "--bundle", str(runtime_bundle), *OPTIONS, "--steps", str(STEPS)]
    )
    assert code == 1  # the corrupt file, as on the cluster
    for i in range(GOOD):
        assert (out / f"img{i}.png").read_bytes() == (cli_out / f"img{i}.png").read_bytes(), f"img{i}.png"


def test_corrupt_file_is_an_error_row_and_the_rest_complete(first_job, cluster):
    inputs, out, done = first_job
    assert done.returncode == 1, done.stderr[-3000:]
    summary = done.stderr.strip().splitlines()
    assert f"{GOOD} upscaled, 0 skipped, 1 failed: {inputs / 'corrupt.png'}" in summary, done.stderr[-3000:]
    rows = record_rows(out)
    assert sorted(row["input"] for row in rows) == sorted(str(p) for p in inputs.iterdir())  # one row each
    (bad,) = [row for row in rows if row["status"] != "done"]
    assert bad["status"] == "error" and bad["input"].endswith("corrupt.png") and bad["output"] is None
    assert "not a readable image" in bad["error"]
    for row in rows:
        assert row["seconds"] >= 0 and row["node"] in cluster.nodes and row["host"]
        assert row["engine"] == "onnxruntime fp32"
        if row["status"] == "done":
            assert row["error"] is None and os.path.isfile(row["output"])
    assert sorted(p.name for p in out.iterdir()) == sorted([f"img{i}.png" for i in range(GOOD)] + ["seesr-job.jsonl"])


def test_resumed_job_skips_finished_images(first_job, cluster, runtime_bundle, tmp_path):
    inputs, first_out, _ = first_job
    resumed_in, out = tmp_path / "in", tmp_path / "out"
    shutil.copytree(inputs, resumed_in)
    shutil.copytree(first_out, out)
    write_images(resumed_in, ["new0.png", "new1.png"], seed=2)
    (out / "img0.png").unlink()  # as if the first job had stopped before it
    # Given as a list file this time: relative paths, and one URL the actors read through fsspec.
    listed = sorted(p.name for p in resumed_in.iterdir() if p.name != "new1.png")
    batch = resumed_in / "batch.txt"
    batch.write_text("\n".join([*listed, f"file://{resumed_in / 'new1.png'}"]) + "\n")

    done = ray_upscale(cluster, batch, out, "--bundle", str(runtime_bundle), "--skip-existing")

    assert done.returncode == 1, done.stderr[-3000:]  # the corrupt file again
    assert f"3 upscaled, {GOOD - 1} skipped, 1 failed" in done.stderr
    status = {os.path.basename(row["input"]): row["status"] for row in last_job(record_rows(out))}
    assert status == {
        **{f"img{i}.png": "skipped" for i in range(1, GOOD)},
        "img0.png": "done",
        "new0.png": "done",
        "new1.png": "done",
        "corrupt.png": "error",
    }
    assert (out / "img0.png").read_bytes() == (first_out / "img0.png").read_bytes()
    assert (out / "new1.png").is_file()


def test_killed_worker_images_are_retried_and_written_once(cluster, runtime_bundle, tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    names = [f"img{i:02d}.png" for i in range(12)]
    write_images(inputs, names, seed=3)
    argv = [sys.executable, "-m", "seesr_runtime.cli", "upscale", str(inputs), "-o", str(out), *OPTIONS]
    argv += ["--steps", "4", "--bundle", str(runtime_bundle), "--ray", ADDRESS]
    job = subprocess.Popen(cluster.command(argv), env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        victim = wait_for_first_row(out / "seesr-job.jsonl", job)["pid"]
        os.kill(victim, signal.SIGKILL)  # a worker process of the cluster, mid-batch
        _, stderr = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()

    assert job.returncode == 0, stderr.decode()[-3000:]
    rows = record_rows(out)
    assert sorted(os.path.basename(row["input"]) for row in rows) == names  # one row per image
    assert {row["status"] for row in rows} == {"done"}
    assert any(row["pid"] != victim for row in rows)
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "seesr-job.jsonl"])  # no temporaries
    for name in names:
        with Image.open(out / name) as image:
            image.load()  # a partial PNG fails here
            assert image.size == (96, 80)


def wait_for_first_row(record, job, timeout=300.0) -> dict:
    deadline = time.monotonic() + timeout
    while not (record.is_file() and record.read_text().strip()):
        assert job.poll() is None, job.communicate()[1].decode()[-3000:]
        assert time.monotonic() < deadline, "no image finished"
        time.sleep(0.05)
    return json.loads(record.read_text().splitlines()[0])
