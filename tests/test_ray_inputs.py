"""``seesr upscale --ray``'s driver side without a cluster: what it reads as inputs (folders, list files, fsspec
URLs), the outputs they map to, how many actors it asks for, and its refusals. The cluster itself:
tests/test_ray.py."""

import argparse
from pathlib import Path

import pytest

from seesr_runtime import ray_batch
from seesr_runtime.cli import build_parser, main
from seesr_runtime.errors import InputError

pytest.importorskip("fsspec", reason="the 'ray' extra is not installed (pip install '.[ray]')")


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_folders_list_files_and_urls(tmp_path):
    folder = tmp_path / "photos"
    for name in ("b.png", "a.JPG", "notes.txt"):
        touch(folder / name)
    listed = tmp_path / "lists" / "batch.txt"
    touch(tmp_path / "lists" / "rel.png")
    listed.write_text(f"# a comment\nrel.png\n\n{folder / 'b.png'}\nfile://{folder / 'a.JPG'}\n")

    assert ray_batch.list_sources([folder]) == [str(folder / "a.JPG"), str(folder / "b.png")]
    assert ray_batch.list_sources([listed]) == [
        str(tmp_path / "lists" / "rel.png"),  # relative to the list file
        str(folder / "b.png"),
        f"file://{folder / 'a.JPG'}",
    ]
    assert ray_batch.list_sources([f"file://{folder}"]) == [f"file://{folder / 'a.JPG'}", f"file://{folder / 'b.png'}"]
    assert ray_batch.list_sources([f"file://{folder / 'b.png'}"]) == [f"file://{folder / 'b.png'}"]


def test_two_inputs_that_would_write_one_output_are_refused(tmp_path):
    sources = [str(tmp_path / "a" / "x.png"), "file:///elsewhere/x.jpg"]
    with pytest.raises(InputError, match=r"x\.png and file:///elsewhere/x\.jpg would both write .*x\.png"):
        ray_batch.targets_of(sources, tmp_path / "out")
    assert ray_batch.targets_of(sources[:1], tmp_path / "out") == {sources[0]: tmp_path / "out" / "x.png"}


def placement_args(**given) -> argparse.Namespace:
    fields = {"backend": None, "precision": None, "providers": None, "device": None, "threads": None}
    return argparse.Namespace(**{**fields, "ray_actors": None, **given})


def test_cpu_actors_take_the_smallest_nodes_cores_and_fill_the_nodes():
    args = placement_args()
    placed = ray_batch.actor_placement(args, {"CPU": 12.0}, [8.0, 4.0])
    assert placed == {"actors": 3, "num_gpus": 0, "num_cpus": 4} and args.threads == 4
    threads = ray_batch.actor_placement(placement_args(threads=2, ray_actors=5), {"CPU": 12.0}, [8.0, 4.0])
    assert threads == {"actors": 5, "num_gpus": 0, "num_cpus": 2}
    with pytest.raises(InputError, match="no Ray node can hold an actor of 16 CPUs"):
        ray_batch.actor_placement(placement_args(threads=16), {"CPU": 12.0}, [8.0, 4.0])


def test_gpu_actors_take_one_gpu_each():
    cuda = placement_args(backend="onnxruntime", providers=["cuda", "cpu"])
    assert ray_batch.actor_placement(cuda, {"CPU": 32.0, "GPU": 4.0}, [16.0, 16.0])["actors"] == 4
    assert ray_batch.actor_placement(cuda, {"CPU": 32.0, "GPU": 4.0}, [16.0, 16.0])["num_gpus"] == 1
    assert ray_batch.wants_gpu(placement_args(), {"GPU": 1.0})  # no backend option: the cluster's GPUs
    assert not ray_batch.wants_gpu(placement_args(backend="openvino"), {"GPU": 1.0})


def test_urls_reach_the_driver_whole_and_are_no_output(tmp_path, capsys):
    args = build_parser().parse_args(["upscale", "s3://archive/lr/", "-o", "out", "--bundle", "b", "--ray"])
    assert args.inputs == ["s3://archive/lr/"] and args.ray == "auto"
    code = main(["upscale", str(tmp_path), "-o", "s3://bucket/out", "--bundle", str(tmp_path), "--ray"])
    assert code == 2
    assert "the output must be a folder every node can write" in capsys.readouterr().err


def test_ray_options_need_ray(tmp_path, capsys):
    code = main(["upscale", str(tmp_path), "-o", str(tmp_path / "o"), "--bundle", str(tmp_path), "--ray-actors", "2"])
    assert code == 2
    assert "--ray-actors and --job-record are options of --ray" in capsys.readouterr().err


def test_the_job_waits_for_ray_datas_threads_before_leaving_the_cluster():
    """ray.shutdown() under a Ray Data thread still at work ends the process with status 1: settle_ray_data waits
    for those (by their names), and only for those."""
    import threading
    import time

    release = threading.Event()
    executor = threading.Thread(target=lambda: time.sleep(0.5), name="StreamingExecutor-dataset_1", daemon=True)
    unrelated = threading.Thread(target=release.wait, name="ray_print_logs", daemon=True)
    executor.start()
    unrelated.start()
    started = time.monotonic()
    ray_batch.settle_ray_data()
    assert not executor.is_alive() and time.monotonic() - started >= 0.4
    assert unrelated.is_alive()  # Ray's own threads live until shutdown: not waited for
    release.set()
