"""Triton deployment: the generated model repository served by a real tritonserver on 127.0.0.1.

The repository tests need only the runtime. The server tests need tritonclient and the nvidia-pytriton
wheel (its tritonserver binary, numpy<2) in the interpreter running them: `make test-triton` makes
that environment (.venv-triton/) and runs this file there; CI does the same.
"""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from triton_server import TritonServer, pytriton_dist

MAX_PIXELS = 64 * 64  # small, so that an oversized request is cheap to send
STEPS = 2
PIPELINE = {"process_size": 64}  # tiny working size: seconds per request on CPU


def _server_missing() -> str | None:
    try:
        import tritonclient.grpc
        import tritonclient.http  # noqa: F401
    except ImportError:
        return "tritonclient[http,grpc] is not installed here; run `make test-triton` (builds .venv-triton/)"
    if pytriton_dist() is None:
        return "nvidia-pytriton (the tritonserver binary) is not installed here; run `make test-triton`"
    return None


# `make test-triton` sets SEESR_REQUIRE_TRITON=1: there a missing server is a failure, not a skip.
REQUIRED = os.environ.get("SEESR_REQUIRE_TRITON") == "1"
needs_server = pytest.mark.skipif(_server_missing() is not None and not REQUIRED, reason=_server_missing() or "")


def write_repo(bundle, out, *extra) -> int:
    from seesr_export.cli import main

    return main(["triton", "--bundle", str(bundle), "--out", str(out), "-q", *extra])


# ------------------------------------------------------------------ the repository


def test_repository_layout_and_config(runtime_bundle, tmp_path):
    repo = tmp_path / "model_repository"
    assert write_repo(runtime_bundle, repo, "--instances", "3", "--option", "process_size=64") == 0
    model = repo / "seesr"
    config = (model / "config.pbtxt").read_text()
    assert (model / "1" / "model.py").read_text().startswith('"""Triton Python-backend model')
    assert json.loads((model / "1" / "bundle" / "manifest.json").read_text())["format"] == "seesr-bundle"
    for line in [
        'backend: "python"',
        "max_batch_size: 0",
        "count: 3 kind: KIND_CPU",
        '{ name: "image" data_type: TYPE_UINT8 dims: [ -1, -1, 3 ] }',
        '{ name: "seed" data_type: TYPE_INT64 dims: [ 1 ] optional: true }',
        '{ name: "tags" data_type: TYPE_STRING dims: [ 1 ] }',
        'key: "bundle" value: { string_value: "bundle" }',
        'key: "pipeline_options" value: { string_value: "{\\"process_size\\": 64}" }',
    ]:
        assert line in config
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial directory left


def test_repository_rewrite_keeps_foreign_folders(runtime_bundle, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert write_repo(runtime_bundle, repo) == 0
    assert write_repo(runtime_bundle, repo, "--reference-bundle", "--kind", "gpu") == 0  # replaces its own output
    config = (repo / "seesr" / "config.pbtxt").read_text()
    assert f'string_value: "{Path(runtime_bundle).resolve()}"' in config and "KIND_GPU" in config
    assert 'key: "providers" value: { string_value: "cuda,cpu" }' in config
    assert not (repo / "seesr" / "1" / "bundle").exists()

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    capsys.readouterr()
    assert write_repo(runtime_bundle, precious) == 2
    assert "is not a repository written by seesr-export triton" in capsys.readouterr().err
    assert (precious / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--backend", "tensorrt"], "--backend tensorrt runs TensorRT engines on GPUs: use --kind gpu"),
        (
            ["--backend", "tensorrt", "--kind", "gpu"],
            "no fp16 TensorRT engines (seesr-export build --backend tensorrt) for ['dape'",
        ),
        (["--instances", "0"], "--instances must be at least 1, got 0"),
        (["--option", "procces_size=64"], "--option ['procces_size']: unknown pipeline option(s)"),
    ],
    ids=["tensorrt-on-cpu", "tensorrt-without-engines", "no-instances", "unknown-option"],
)
def test_repository_refusals(runtime_bundle, tmp_path, capsys, extra, message):
    assert write_repo(runtime_bundle, tmp_path / "other", *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_repository_of_a_missing_bundle_is_refused(tmp_path, capsys):
    assert write_repo(tmp_path / "nowhere", tmp_path / "other") == 2
    assert "--bundle: " in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


# ------------------------------------------------------------------ a real server


@pytest.fixture(scope="module")
def server(runtime_bundle, tmp_path_factory, request):
    reason = _server_missing()
    if reason:
        (pytest.fail if REQUIRED else pytest.skip)(reason)
    work = tmp_path_factory.mktemp("triton")
    repo = work / "model_repository"
    # Two instances with one thread each: the load test runs them in parallel on two cores, and the
    # in-process reference below uses one thread too (same arithmetic, same bytes out).
    assert (
        write_repo(
            runtime_bundle,
            repo,
            "--instances",
            "2",
            "--threads",
            "1",
            "--max-pixels",
            str(MAX_PIXELS),
            "--option",
            f"process_size={PIPELINE['process_size']}",
        )
        == 0
    )
    with TritonServer(repo, work) as running:
        say(
            request,
            f"tritonserver ready in {running.startup_seconds:.1f} s on {running.http_url} (HTTP), "
            f"{running.grpc_url} (gRPC)",
        )
        yield running
    assert not running.alive()


@pytest.fixture(scope="module")
def reference_pipeline(runtime_bundle):
    from seesr_runtime import SeeSRPipeline

    return SeeSRPipeline.from_bundle(runtime_bundle, threads=1)


def call(server, protocol, image, **options):
    from seesr_runtime.triton_client import build_inputs, connect, infer

    url = server.http_url if protocol == "http" else server.grpc_url
    client = connect(protocol, url, timeout=120)
    try:
        return infer(client, protocol, build_inputs(protocol, image, **options), timeout=120)
    finally:
        client.close()


@needs_server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_server_matches_in_process_runtime(server, reference_pipeline, lr_image, protocol):
    expected = reference_pipeline(lr_image, seed=3, steps=STEPS, prompt="a red barn", **PIPELINE)
    got = call(server, protocol, np.asarray(lr_image), seed=3, steps=STEPS, prompt="a red barn")
    assert got.image.dtype == np.uint8 and got.image.shape == (160, 224, 3)
    assert np.array_equal(got.image, np.asarray(expected.image))
    assert (got.tags, got.prompt) == (expected.tags, expected.prompt)
    assert "a red barn" in got.prompt


@needs_server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_malformed_requests_are_refused_and_the_server_keeps_serving(server, lr_image, protocol):
    from seesr_runtime.triton_client import ClientError

    good = np.asarray(lr_image)
    bad = [
        (good.astype(np.float32), {}, "inference input 'image' data-type is 'FP32', but model 'seesr' expects 'UINT8'"),
        (good[..., 0], {}, "unexpected shape for input 'image' for model 'seesr'. Expected [-1,-1,3], got [40,56]"),
        (
            np.concatenate([good, good[..., :1]], axis=2),
            {},
            "unexpected shape for input 'image' for model 'seesr'. Expected [-1,-1,3], got [40,56,4]",
        ),
        (
            np.zeros((80, 80, 3), np.uint8),
            {},
            "input 'image': 80x80 is 6400 pixels, over the limit of "
            f"{MAX_PIXELS} (raise it with config.pbtxt parameter max_pixels)",
        ),
        (np.zeros((4, 300, 3), np.uint8), {}, "input 'image': 300x4 is too small (at least 8x8 pixels)"),
        (good, {"guidance": float("nan")}, "guidance must be a finite number >= 0.0, got nan"),
        (good, {"steps": 0}, "steps must be in [1, 1000], got 0"),
        (good, {"seed": -1}, "seed must be >= 0, got -1"),
    ]
    for image, options, message in bad:
        with pytest.raises(ClientError) as refused:
            call(server, protocol, image, **{"steps": 1, **options})
        assert message in str(refused.value), (image.dtype, image.shape, options)
    assert server.alive()
    assert call(server, protocol, good, steps=1).image.shape == (160, 224, 3)
    assert "Stub process" not in server.log_tail(100_000)  # no instance died and was restarted


@needs_server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_concurrent_load_has_no_errors(server, lr_image, tmp_path, capsys, request, protocol):
    from seesr_runtime.triton_client import main

    image = tmp_path / "lr.png"
    lr_image.save(image)
    url = server.http_url if protocol == "http" else server.grpc_url
    code = main(
        [
            "load",
            str(image),
            "--protocol",
            protocol,
            "--url",
            url,
            "--concurrency",
            "32",
            "--requests",
            "64",
            "--steps",
            "1",
            "--timeout",
            "120",
            "--json",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    assert (report["ok"], report["errors"], report["concurrency"]) == (64, 0, 32)
    latency = report["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    say(
        request,
        f"{protocol} load: 64 requests, 32 concurrent, 0 errors, {report['throughput_rps']:.1f} req/s, "
        f"latency p50 {latency['p50']:.0f} ms, p95 {latency['p95']:.0f} ms, p99 {latency['p99']:.0f} ms",
    )


def say(request, line: str) -> None:
    """A line in pytest's own output (CI logs show it) even though output is captured."""
    plugins = request.config.pluginmanager
    with plugins.get_plugin("capturemanager").global_and_fixture_disabled():
        plugins.get_plugin("terminalreporter").write_line(f"\n{line}")


@needs_server
def test_client_upscale_writes_outputs(server, lr_image, tmp_path, capsys):
    from seesr_runtime.triton_client import main

    folder = tmp_path / "in"
    folder.mkdir()
    lr_image.save(folder / "a.png")
    (folder / "b_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    Image.fromarray(np.zeros((80, 80, 3), np.uint8)).save(folder / "c_big.png")
    out = tmp_path / "out"
    code = main(
        [
            "upscale",
            str(folder),
            "-o",
            str(out),
            "--protocol",
            "grpc",
            "--url",
            server.grpc_url,
            "--steps",
            "1",
            "--seed",
            "5",
            "-q",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert Image.open(out / "a.png").size == (224, 160)
    assert (out / "a.txt").read_text().rstrip().endswith("clean, high-resolution, 8k")
    assert "b_corrupt.png: not a readable image" in err
    assert f"c_big.png: input 'image': 80x80 is 6400 pixels, over the limit of {MAX_PIXELS}" in err
    assert "1 upscaled, 2 failed" in err
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "a.txt"]


@needs_server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_client_names_an_unreachable_server(lr_image, tmp_path, capsys, protocol):
    from triton_server import free_port

    from seesr_runtime.triton_client import main

    lr_image.save(tmp_path / "a.png")
    url = f"127.0.0.1:{free_port()}"  # nothing listens there
    code = main(
        [
            "upscale",
            str(tmp_path / "a.png"),
            "-o",
            str(tmp_path / "out"),
            "--protocol",
            protocol,
            "--url",
            url,
            "--timeout",
            "10",
        ]
    )
    assert code == 2
    assert f"error: no Triton server reachable over {protocol} at {url}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@needs_server
def test_server_stops_within_bounds(runtime_bundle, tmp_path):
    """A server of our own (the shared one stays up for the other tests): start, stop, nothing left."""
    repo = tmp_path / "repo"
    assert write_repo(runtime_bundle, repo, "--option", "process_size=64") == 0
    with TritonServer(repo, tmp_path, start_timeout=120) as running:
        pid = running.process.pid
        assert running.startup_seconds < 120
    began = time.monotonic()
    running.stop()  # idempotent
    assert time.monotonic() - began < 1
    assert not running.alive()
    assert _live_members(pid) == []  # the group (server and stubs) is gone


def _live_members(group: int) -> list[int]:
    """Processes of a process group that are still running (zombies awaiting a reaper do not count)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members
