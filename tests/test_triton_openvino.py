"""Triton on OpenVINO, the backend options of the model configuration, and the deployment's server command.

The repository and option tests need only the runtime (and OpenVINO where they say so). The server tests run
where test_triton.py's do (`make test-triton`, whose .venv-triton holds OpenVINO): a tiny bundle's OpenVINO
model, two instances, started the way deploy/triton's image starts it (``seesr_runtime.triton.serve``, the
access key from the environment), checked byte for byte against the in-process OpenVINO runtime, then soaked.
"""

import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from test_triton import (
    MAX_PIXELS,
    PIPELINE,
    REQUIRED,
    SOAK_CONCURRENCY,
    STEPS,
    MiB,
    _percentiles_ms,
    _server_missing,
    call,
    needs_server,
    run_soak,
    say,
    soak_requests,
    write_repo,
)
from triton_server import TritonServer

from seesr_runtime import SeeSRPipeline
from seesr_runtime.errors import BundleError
from seesr_runtime.lazy import available
from seesr_runtime.triton import ACCESS_KEY_ENV, ACCESS_KEY_HEADER, access_headers, backend_options
from seesr_runtime.triton.serve import REPOSITORY_ENV, server_command
from seesr_runtime.triton_client import encode_png

PARAMETER = re.compile(r'^parameters: \{ key: "(\w+)" value: \{ string_value: (".*") \} \}$', re.MULTILINE)
KEY = "openvino-test-key"


def config_parameters(repo) -> dict[str, str]:
    """config.pbtxt's string parameters, as Triton hands them to the model."""
    return {key: json.loads(value) for key, value in PARAMETER.findall((repo / "seesr" / "config.pbtxt").read_text())}


def openvino_cpu_precision() -> str:
    """What OpenVINO itself says this CPU runs: bf16 where it lists BF16 among its capabilities."""
    import openvino

    capabilities = openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "bf16" if "BF16" in capabilities else "fp32"


# ------------------------------------------------------------------ the repository and its parameters


def test_openvino_repository_leaves_the_precision_to_the_serving_cpu(runtime_bundle, tmp_path):
    repo = tmp_path / "repo"
    assert write_repo(runtime_bundle, repo, "--backend", "openvino", "--instances", "2") == 0
    assert "instance_group [ { count: 2 kind: KIND_CPU } ]" in (repo / "seesr" / "config.pbtxt").read_text()
    params = config_parameters(repo)
    # Only what the OpenVINO backend reads: no onnxruntime providers, no GPU options.
    assert {k: params[k] for k in ("backend", "precision", "threads")} == {
        "backend": "openvino",
        "precision": "auto",
        "threads": "auto",
    }
    assert not {"providers", "static_shapes", "io_binding", "cuda_graph"} & set(params)


def test_auto_precision_is_bf16_where_openvino_lists_bf16_units(runtime_bundle, tmp_path):
    pytest.importorskip("openvino", reason="the openvino extra is not installed here")
    repo = tmp_path / "repo"
    assert write_repo(runtime_bundle, repo, "--backend", "openvino", "--instances", "2") == 0
    options = backend_options(config_parameters(repo), instances=2)
    expected = openvino_cpu_precision()
    assert options == {"precision": expected, "threads": max(1, (os.cpu_count() or 1) // 2), "device": "CPU"}
    pipe = SeeSRPipeline.from_bundle(runtime_bundle, backend="openvino", **options)
    assert pipe.backend.inference_precision == {"bf16": "bf16", "fp32": "f32"}[expected]


def test_gpu_options_reach_each_instances_pipeline(runtime_bundle, tmp_path):
    repo = tmp_path / "repo"
    assert write_repo(runtime_bundle, repo, "--static-shapes", "--io-binding", "on", "--threads", "1") == 0
    options = backend_options(config_parameters(repo), instances=1)
    assert options == {
        "precision": "fp32",
        "providers": ["cpu"],
        "threads": 1,
        "static_shapes": True,
        "io_binding": True,
        "cuda_graph": False,
    }
    pipe = SeeSRPipeline.from_bundle(runtime_bundle, backend="onnxruntime", **options)
    assert (pipe.backend.static_shapes, pipe.backend.io_binding, pipe.backend.cuda_graph) == (True, True, False)

    gpu = tmp_path / "gpu"
    assert write_repo(runtime_bundle, gpu, "--kind", "gpu", "--cuda-graph", "--io-binding", "off") == 0
    options = backend_options(config_parameters(gpu), instances=1)
    assert {k: options[k] for k in ("providers", "cuda_graph", "io_binding", "static_shapes")} == {
        "providers": ["cuda", "cpu"],
        "cuda_graph": True,
        "io_binding": False,
        "static_shapes": False,  # implied by cuda_graph in the backend itself
    }


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--backend", "openvino", "--kind", "gpu"], "--backend openvino serves Triton CPU instances: use --kind cpu"),
        (["--backend", "openvino", "--providers", "cpu"], "--providers selects onnxruntime execution providers"),
        (["--backend", "openvino", "--static-shapes"], "--static-shapes is not an option of --backend openvino"),
        (["--backend", "openvino", "--io-binding", "on"], "--io-binding is not an option of --backend openvino"),
        (["--backend", "openvino", "--precision", "int8"], "no int8 ONNX graphs (OpenVINO precision int8)"),
        (["--cuda-graph"], "--cuda-graph captures CUDA graphs on GPUs: use --kind gpu"),
        (["--kind", "gpu", "--cuda-graph", "--providers", "cpu"], "--cuda-graph needs onnxruntime's CUDA provider"),
        (["--precision", "bf16"], "--precision bf16 is not one of --backend onnxruntime's: ['fp32', 'fp16', 'int8']"),
        (["--precision", "auto"], "--precision auto is not one of --backend onnxruntime's"),
    ],
    ids=[
        "openvino-gpu",
        "openvino-providers",
        "openvino-static-shapes",
        "openvino-io-binding",
        "openvino-int8-without-graphs",
        "cuda-graph-on-cpu",
        "cuda-graph-without-cuda",
        "bf16-on-onnxruntime",
        "auto-on-onnxruntime",
    ],
)
def test_backend_option_refusals(runtime_bundle, tmp_path, capsys, extra, message):
    assert write_repo(runtime_bundle, tmp_path / "other", *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize(
    "params, message",
    [
        ({"backend": "onnx"}, "parameter backend must be one of ['onnxruntime', 'tensorrt', 'openvino'], got 'onnx'"),
        ({"backend": "openvino", "threads": "0"}, "parameter threads must be 'auto' or a positive number, got '0'"),
        ({"backend": "onnxruntime", "static_shapes": "yes"}, "static_shapes must be one of ['true', 'false']"),
        ({"backend": "onnxruntime", "io_binding": "1"}, "io_binding must be one of ['auto', 'on', 'off'], got '1'"),
        ({"backend": "tensorrt", "precision": "auto"}, "precision 'auto' is for backend openvino, not tensorrt"),
    ],
    ids=["backend", "threads", "flag", "io-binding", "auto-on-tensorrt"],
)
def test_model_parameters_the_runtime_cannot_take_are_refused(params, message):
    with pytest.raises(BundleError, match=re.escape(message)):
        backend_options(params, instances=1)


# ------------------------------------------------------------------ the deployment's server command


def test_serve_command_takes_the_key_and_repository_from_the_environment():
    command = server_command({ACCESS_KEY_ENV: KEY, REPOSITORY_ENV: "/srv/models"}, ["--log-verbose=1"])
    assert command == [
        "tritonserver",
        "--model-repository=/srv/models",
        f"--http-restricted-api=inference:{ACCESS_KEY_HEADER}={KEY}",
        f"--grpc-restricted-protocol=inference:{ACCESS_KEY_HEADER}={KEY}",
        "--log-verbose=1",
    ]
    assert server_command({ACCESS_KEY_ENV: KEY}, [])[1] == "--model-repository=/models"


@pytest.mark.parametrize(
    "key, message",
    [
        (None, f"error: ${ACCESS_KEY_ENV} is not set: the server admits only requests carrying its access key"),
        ("two words", "error: the access key must be non-empty printable text without spaces"),
    ],
    ids=["no-key", "bad-key"],
)
def test_serve_refuses_to_start_without_a_usable_key(key, message):
    env = {k: v for k, v in os.environ.items() if k != ACCESS_KEY_ENV}
    if key is not None:
        env[ACCESS_KEY_ENV] = key
    done = subprocess.run(
        [sys.executable, "-m", "seesr_runtime.triton.serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]  # one line, no traceback
    assert done.stderr.startswith(message)
    assert "two words" not in done.stderr  # the key is a secret: never echoed


# ------------------------------------------------------------------ a real server

OV_SOAK_REQUESTS = 150
OV_SOAK_WARMUP = 32
# The OpenVINO backend compiles each network for each input shape it meets and keeps one UNet and ControlNet shape
# (openvino_backend.SHAPES_KEPT): a new image size, or a switch between guidance <= 1 (batch 1) and > 1 (batch 2,
# classifier-free guidance), costs an instance 12 to 33 s on the 2-core build machine at the tiny bundle's size
# (docs/triton.md). The soak's valid images therefore share one size and the bundle's guidance (compiled during
# the warm-up), so that it measures steady serving, not compiling.
OV_SOAK_SIZE = (40, 56)
# Resident memory growth allowed from after the warm-up to after the soak (tritonserver and two OpenVINO
# instances); measured on the 2-core build machine: see docs/triton.md's Tests.
OV_SOAK_RSS_GROWTH_BOUND = 64 * MiB


@pytest.fixture(scope="module")
def openvino_server(runtime_bundle, tmp_path_factory, request):
    """Two OpenVINO instances, one thread each, started by the deployment's command with the key in its
    environment."""
    reason = _server_missing() or (None if available("openvino") else "OpenVINO is not installed here")
    if reason:
        (pytest.fail if REQUIRED else pytest.skip)(reason)
    work = tmp_path_factory.mktemp("triton-openvino")
    repo = work / "model_repository"
    options = ["--backend", "openvino", "--instances", "2", "--threads", "1", "--max-pixels", str(MAX_PIXELS)]
    assert write_repo(runtime_bundle, repo, *options, "--option", f"process_size={PIPELINE['process_size']}") == 0
    launcher = (sys.executable, "-m", "seesr_runtime.triton.serve")
    with TritonServer(repo, work, launcher=launcher, env={ACCESS_KEY_ENV: KEY}) as running:
        say(request, f"OpenVINO tritonserver (2 instances) ready in {running.startup_seconds:.1f} s")
        yield running
    assert not running.alive()


@needs_server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_openvino_model_matches_in_process_openvino(openvino_server, runtime_bundle, lr_image, protocol):
    precision = openvino_cpu_precision()
    pipeline = SeeSRPipeline.from_bundle(runtime_bundle, backend="openvino", precision=precision, threads=1)
    expected = pipeline(lr_image, seed=3, steps=STEPS, prompt="a red barn", **PIPELINE)
    got = call(openvino_server, protocol, np.asarray(lr_image), key=KEY, seed=3, steps=STEPS, prompt="a red barn")
    assert got.image.shape == (160, 224, 3)
    assert np.array_equal(got.image, np.asarray(expected.image))
    assert (got.tags, got.prompt) == (expected.tags, expected.prompt)
    # The instances resolved precision "auto" as this process did: each logs what it loaded.
    log = openvino_server.log_tail(1_000_000)
    assert log.count(f"backend openvino, {{'precision': '{precision}', 'threads': 1, 'device': 'CPU'}}") == 2


@needs_server
def test_openvino_server_admits_only_the_key_from_its_environment(openvino_server, lr_image):
    from seesr_runtime.triton_client import ClientError

    with pytest.raises(ClientError, match=f"This API is restricted, expecting header '{ACCESS_KEY_HEADER}'"):
        call(openvino_server, "http", lr_image, key="not-the-key", steps=1)
    assert access_headers(KEY, "http") == {ACCESS_KEY_HEADER: KEY}


def one_size_soak(count: int, seed: int) -> list:
    """test_triton's soak (half valid, half the invalid kinds in turn), every valid image OV_SOAK_SIZE at the
    bundle's guidance."""
    rng = np.random.default_rng(seed)
    height, width = OV_SOAK_SIZE

    def resized(item):
        if isinstance(item.expect, str):
            return item
        image = encode_png(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
        options = {name: value for name, value in item.options.items() if name != "guidance"}
        return dataclasses.replace(item, image=image, options=options, expect=(4 * height, 4 * width, 3))

    return [resized(item) for item in soak_requests(count, seed)]


@needs_server
def test_openvino_soak_keeps_serving_without_leaking(openvino_server, request):
    warmup, _ = run_soak(openvino_server, "http", one_size_soak(OV_SOAK_WARMUP, seed=1), key=KEY)
    assert [o.unexpected for o in warmup if o.unexpected] == []
    warm = openvino_server.resident_bytes()
    outcomes, seconds = run_soak(openvino_server, "http", one_size_soak(OV_SOAK_REQUESTS, seed=2), key=KEY)
    after = openvino_server.resident_bytes()
    unexpected = [o.unexpected for o in outcomes if o.unexpected]
    valid = [o.seconds for o in outcomes if not isinstance(o.request.expect, str)]
    say(
        request,
        f"OpenVINO http soak: {len(outcomes)} requests ({len(valid)} valid), {SOAK_CONCURRENCY} concurrent, "
        f"{len(unexpected)} unexpected, {len(outcomes) / seconds:.1f} req/s, valid {_percentiles_ms(valid)}; "
        f"server RSS {warm / MiB:.0f} MiB after warm-up, {after / MiB:.0f} MiB after ({(after - warm) / MiB:+.1f} MiB)",
    )
    assert unexpected == []
    assert after - warm <= OV_SOAK_RSS_GROWTH_BOUND
    assert openvino_server.alive()
    assert "Stub process" not in openvino_server.log_tail(1_000_000)
