"""Triton deployment: the generated model repository served by a real tritonserver on 127.0.0.1.

The repository tests need only the runtime. The server tests need tritonclient and the nvidia-pytriton
wheel (its tritonserver binary, numpy<2) in the interpreter running them: `make test-triton` makes
that environment (.venv-triton/) and runs this file there; CI does the same.
"""

import dataclasses
import inspect
import json
import os
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from image_bytes import png_header
from triton_server import TritonServer, pytriton_dist
from triton_wire import WireInput, bytes_element, post_http, send

from seesr_runtime.pipeline import UpscaleResult
from seesr_runtime.triton import INPUTS, OUTPUTS, REQUEST_OPTIONS, SERVICE_VERSION
from seesr_runtime.triton_client import Upscaled, build_inputs, encode_png

MAX_PIXELS = 64 * 64  # small, so that an oversized request is cheap to send
STEPS = 2
PIPELINE = {"process_size": 64}  # tiny working size: seconds per request on CPU
MiB = 1024 * 1024


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
    version = model / str(SERVICE_VERSION)
    assert sorted(p.name for p in model.iterdir()) == [str(SERVICE_VERSION), "config.pbtxt"]
    assert (version / "model.py").read_text().startswith('"""Triton Python-backend model')
    assert json.loads((version / "bundle" / "manifest.json").read_text())["format"] == "seesr-bundle"
    for line in [
        'backend: "python"',
        "max_batch_size: 0",
        "count: 3 kind: KIND_CPU",
        '{ name: "image" data_type: TYPE_STRING dims: [ 1 ] }',
        '{ name: "seed" data_type: TYPE_INT64 dims: [ 1 ] optional: true }',
        '{ name: "tags" data_type: TYPE_STRING dims: [ 1 ] }',
        'key: "bundle" value: { string_value: "bundle" }',
        'key: "pipeline_options" value: { string_value: "{\\"process_size\\": 64}" }',
        f'key: "service_version" value: {{ string_value: "{SERVICE_VERSION}" }}',
    ]:
        assert line in config
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial directory left


TENSOR_ENTRY = re.compile(r'\{ name: "(\w+)" data_type: (\w+) dims: \[ ([-\d, ]+) \]( optional: true)? \}')


def _declared_tensors(config: str, section: str) -> list[tuple[str, str, tuple[int, ...], bool]]:
    """The tensors of config.pbtxt's ``input [...]`` or ``output [...]`` list, in order."""
    body = re.search(rf"^{section} \[\n(.*?)\n\]$", config, re.MULTILINE | re.DOTALL)
    assert body, f"no {section} list in config.pbtxt:\n{config}"
    entries = body.group(1).split(",\n")
    matches = [TENSOR_ENTRY.fullmatch(entry.strip()) for entry in entries]
    assert all(matches), entries
    return [(m[1], m[2], tuple(int(size) for size in m[3].split(", ")), bool(m[4])) for m in matches if m]


def test_config_declares_exactly_the_service_tensors(runtime_bundle, tmp_path):
    assert write_repo(runtime_bundle, tmp_path / "repo") == 0
    config = (tmp_path / "repo" / "seesr" / "config.pbtxt").read_text()
    assert _declared_tensors(config, "input") == [(t.name, t.data_type, t.dims, t.optional) for t in INPUTS]
    assert _declared_tensors(config, "output") == [(t.name, t.data_type, t.dims, t.optional) for t in OUTPUTS]
    # Fixed dims on every input: Triton refuses any other declared shape before it sizes the data.
    assert all(-1 not in spec.dims for spec in INPUTS)


def test_client_and_model_follow_the_declaration():
    """The client's keyword options and its response fields, and the pipeline result the model reads its
    outputs from, are the declared tensors (the real-server tests below exercise them end to end)."""
    keywords = [name for name, p in inspect.signature(build_inputs).parameters.items() if p.kind is p.KEYWORD_ONLY]
    assert keywords == list(REQUEST_OPTIONS)
    outputs = [spec.name for spec in OUTPUTS]
    assert [f.name for f in dataclasses.fields(Upscaled)] == outputs
    assert set(outputs) <= {f.name for f in dataclasses.fields(UpscaleResult)}


def test_repository_writer_prints_the_keyed_serve_command(runtime_bundle, tmp_path, capsys):
    from seesr_export.cli import main
    from seesr_runtime.triton import server_access_arguments

    assert main(["triton", "--bundle", str(runtime_bundle), "--out", str(tmp_path / "repo")]) == 0
    command = capsys.readouterr().err.splitlines()[-1].split()
    assert command[:2] == ["tritonserver", "--model-repository"]
    assert command[3:] == server_access_arguments("$SEESR_TRITON_KEY")


def test_repository_rewrite_keeps_foreign_folders(runtime_bundle, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert write_repo(runtime_bundle, repo) == 0
    assert write_repo(runtime_bundle, repo, "--reference-bundle", "--kind", "gpu") == 0  # replaces its own output
    config = (repo / "seesr" / "config.pbtxt").read_text()
    assert f'string_value: "{Path(runtime_bundle).resolve()}"' in config and "KIND_GPU" in config
    assert 'key: "providers" value: { string_value: "cuda,cpu" }' in config
    assert not (repo / "seesr" / str(SERVICE_VERSION) / "bundle").exists()

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


def _serve(runtime_bundle, tmp_path_factory, request, what: str, repo_args: list[str], server_args=()):
    """A generated repository of the tiny bundle served by a real tritonserver, for one test module."""
    reason = _server_missing()
    if reason:
        (pytest.fail if REQUIRED else pytest.skip)(reason)
    work = tmp_path_factory.mktemp("triton")
    repo = work / "model_repository"
    assert write_repo(runtime_bundle, repo, "--max-pixels", str(MAX_PIXELS), *repo_args) == 0
    with TritonServer(repo, work, extra_args=tuple(server_args)) as running:
        say(
            request,
            f"{what} ready in {running.startup_seconds:.1f} s on {running.http_url} (HTTP), {running.grpc_url} (gRPC)",
        )
        yield running
    assert not running.alive()


@pytest.fixture(scope="module")
def server(runtime_bundle, tmp_path_factory, request):
    # Two instances with one thread each: the load test runs them in parallel on two cores, and the
    # in-process reference below uses one thread too (same arithmetic, same bytes out).
    repo_args = ["--instances", "2", "--threads", "1", "--option", f"process_size={PIPELINE['process_size']}"]
    yield from _serve(runtime_bundle, tmp_path_factory, request, "tritonserver", repo_args)


@pytest.fixture(scope="module")
def reference_pipeline(runtime_bundle):
    from seesr_runtime import SeeSRPipeline

    return SeeSRPipeline.from_bundle(runtime_bundle, threads=1)


def call(server, protocol, image, key=None, **options):
    """One request through tritonclient; ``image`` an array or PIL image (sent as PNG) or a file's bytes;
    ``key``: the deployment's access key, for a server that requires one."""
    from seesr_runtime.triton_client import connect, infer

    url = server.http_url if protocol == "http" else server.grpc_url
    data = image if isinstance(image, bytes) else encode_png(image)
    client = connect(protocol, url, timeout=120)
    try:
        return infer(client, protocol, build_inputs(protocol, data, **options), timeout=120, key=key)
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

    good = encode_png(lr_image)
    bomb = "input 'image': refused as a decompression bomb: Image size (100000000 pixels) exceeds limit"
    bad = [
        (b"GIF89a, or so it says", {}, "input 'image': not a readable image (corrupt or unknown format)"),
        (good[: len(good) // 2], {}, "input 'image': cannot decode the image ("),
        (b"", {}, "input 'image': empty file"),
        (png_header(10_000, 10_000), {}, bomb),
        (
            encode_png(np.zeros((80, 80, 3), np.uint8)),
            {},
            "input 'image': 80x80 is 6400 pixels, over the limit of "
            f"{MAX_PIXELS} (raise it with config.pbtxt parameter max_pixels)",
        ),
        (encode_png(np.zeros((4, 300, 3), np.uint8)), {}, "input 'image': 300x4 is too small (at least 8x8 pixels)"),
        (good, {"guidance": float("nan")}, "guidance must be a finite number >= 0.0, got nan"),
        (good, {"steps": 0}, "steps must be in [1, 999], got 0"),
        (good, {"seed": -1}, "seed must be >= 0, got -1"),
    ]
    for image, options, message in bad:
        with pytest.raises(ClientError) as refused:
            call(server, protocol, image, **{"steps": 1, **options})
        assert message in str(refused.value), (image[:16], options)
    assert server.alive()
    assert call(server, protocol, good, steps=1).image.shape == (160, 224, 3)
    assert "Stub process" not in server.log_tail(100_000)  # no instance died and was restarted


# ------------------------------------------------------------------ huge declarations

TINY_PNG = encode_png(np.zeros((9, 9, 3), np.uint8))
SMALL_IMAGE = WireInput("image", "BYTES", [1], bytes_element(TINY_PNG))
WRAPPING_SHAPE = [2**61, 8, 3]  # 3 * 2^64 elements: a byte size computed in 64 bits wraps to 0


def _shape_refusal(name: str, shape: list[int]) -> str:
    return f"unexpected shape for input '{name}' for model 'seesr'. Expected [1], got [{','.join(map(str, shape))}]"


# Requests declaring far more data than they carry, each with the refusal that names the offending value. Triton
# refuses all but the last before any model code runs (every input has fixed dims); the last is the model's own
# check of an encoded image's declared size against max_pixels, made from its header before decoding.
HUGE_DECLARATIONS = [
    (
        "image declared 100000x100000x3",
        [WireInput("image", "BYTES", [100_000, 100_000, 3], bytes_element(TINY_PNG))],
        _shape_refusal("image", [100_000, 100_000, 3]),
    ),
    (
        "image declared 2^61 elements",
        [WireInput("image", "BYTES", [2**61], bytes_element(TINY_PNG))],
        _shape_refusal("image", [2**61]),
    ),
    (
        "image declared with a shape whose byte size wraps to 0, nothing sent",
        [WireInput("image", "BYTES", WRAPPING_SHAPE, b"")],
        _shape_refusal("image", WRAPPING_SHAPE),
    ),
    (
        "image declared as raw UINT8 pixels (the format of version 1)",
        [WireInput("image", "UINT8", [9, 9, 3], bytes(243))],
        "inference input 'image' data-type is 'UINT8', but model 'seesr' expects 'BYTES'",
    ),
    (
        "image file declared 2 GiB long, 3 bytes sent",
        [WireInput("image", "BYTES", [1], bytes_element(b"abc", declared_length=2**31 - 1))],
        "incomplete string data for inference input 'image', expecting string of length 2147483647 "
        "but only 3 bytes available",
    ),
    (
        "prompt element declared 2 GiB long, 3 bytes sent",
        [SMALL_IMAGE, WireInput("prompt", "BYTES", [1], bytes_element(b"abc", declared_length=2**31 - 1))],
        "incomplete string data for inference input 'prompt', expecting string of length 2147483647 "
        "but only 3 bytes available",
    ),
    (
        "prompt declared with 10^8 elements",
        [SMALL_IMAGE, WireInput("prompt", "BYTES", [100_000_000], bytes_element(b"abc"))],
        _shape_refusal("prompt", [100_000_000]),
    ),
    (
        "steps declared with 10^8 elements",
        [SMALL_IMAGE, WireInput("steps", "INT32", [100_000_000], (1).to_bytes(4, "little"))],
        _shape_refusal("steps", [100_000_000]),
    ),
    (
        "PNG header declaring 100000x100000 pixels",
        [WireInput("image", "BYTES", [1], bytes_element(png_header(100_000, 100_000)))],
        "input 'image': refused as a decompression bomb",
    ),
    (
        "PNG header declaring 1000x1000 pixels",
        [WireInput("image", "BYTES", [1], bytes_element(png_header(1000, 1000)))],
        f"input 'image': 1000x1000 is 1000000 pixels, over the limit of {MAX_PIXELS}",
    ),
]
HTTP_HUGE_DECLARATIONS = [
    (
        "binary_data_size declared 10^12 bytes, 27 sent",
        [WireInput("image", "BYTES", [1], bytes(27), declared_bytes=10**12)],
        "unexpected size for input 'image', expecting 999999999973 additional bytes for model 'seesr'",
    ),
]
INVALID_ARGUMENT = {"http": "400", "grpc": "INVALID_ARGUMENT"}
# A few MiB: allocator noise; any declared size honoured would be GiBs.
HUGE_REFUSAL_RSS_BOUND = 32 * MiB


@needs_server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_huge_declared_sizes_are_refused_before_allocation(server, lr_image, request, protocol):
    url = server.http_url if protocol == "http" else server.grpc_url
    cases = HUGE_DECLARATIONS + (HTTP_HUGE_DECLARATIONS if protocol == "http" else [])
    before = server.resident_bytes()
    for what, inputs, message in cases:
        answer = send(protocol, url, inputs)
        assert (answer.ok, answer.status) == (False, INVALID_ARGUMENT[protocol]), (what, answer)
        assert message in answer.message, (what, answer)
    grown = server.resident_bytes() - before
    assert grown < HUGE_REFUSAL_RSS_BOUND, f"server RSS grew {grown / MiB:.1f} MiB over {len(cases)} refusals"
    assert call(server, protocol, lr_image, steps=1).image.shape == (160, 224, 3)
    say(request, f"{protocol}: {len(cases)} huge declarations refused, server RSS {grown / MiB:+.1f} MiB")


def _json_body(inputs: list[dict]) -> bytes:
    return json.dumps({"inputs": inputs}).encode()


@needs_server
@pytest.mark.parametrize("transport", ["http binary", "http json", "grpc"])
def test_image_shapes_other_than_one_element_are_refused_before_sizing(server, request, transport):
    """The image's fixed dims [1]: a shape whose byte size overflows 64 bits (which used to pass Triton's size
    check and abort the instance's stub) or one declaring 30 GB is refused by Triton before any sizing."""
    shapes = [[2**61], [100_000, 100_000, 3], WRAPPING_SHAPE]
    before = server.resident_bytes()
    for shape in shapes:
        if transport == "http json":
            body = _json_body([{"name": "image", "datatype": "BYTES", "shape": shape, "data": ["x"]}])
            answer = post_http(server.http_url, "seesr", body, header_length=None)
        else:
            protocol = transport.split()[0]
            url = server.http_url if protocol == "http" else server.grpc_url
            answer = send(protocol, url, [WireInput("image", "BYTES", shape, bytes_element(TINY_PNG))])
        assert not answer.ok and answer.status in ("400", "INVALID_ARGUMENT"), (shape, answer)
        assert _shape_refusal("image", shape) in answer.message, (shape, answer)
    grown = server.resident_bytes() - before
    assert grown < HUGE_REFUSAL_RSS_BOUND, f"server RSS grew {grown / MiB:.1f} MiB"
    protocol = "grpc" if transport == "grpc" else "http"
    url = server.grpc_url if protocol == "grpc" else server.http_url
    assert send(protocol, url, [SMALL_IMAGE, WireInput("steps", "INT32", [1], (1).to_bytes(4, "little"))]).ok
    assert "Stub process" not in server.log_tail(100_000)  # no instance died and was restarted
    say(request, f"{transport}: shapes {shapes} refused, server RSS {grown / MiB:+.1f} MiB")


@needs_server
def test_http_json_data_declaring_more_than_it_holds_is_refused(server):
    """Tensor data inline as JSON with a fixed-size data type: this tritonserver's HTTP frontend reserves the
    size that the request's own data type and shape declare, before it looks at the model's inputs, then
    refuses. 300 MB here (RSS comes back); docs/security.md on larger declarations."""
    body = _json_body([{"name": "image", "datatype": "UINT8", "shape": [10_000, 10_000, 3], "data": [1]}])
    before = server.resident_bytes()
    answer = post_http(server.http_url, "seesr", body, header_length=None)
    assert (answer.ok, answer.status) == (False, "500")
    assert answer.message == "Unable to parse 'data': Shape does not match true shape of 'data' field"
    assert server.resident_bytes() - before < HUGE_REFUSAL_RSS_BOUND


# ------------------------------------------------------------------ the access key

ACCESS_KEY = "k3y-for-tests"
# 32 TiB inline as JSON: tritonserver 2.51's HTTP frontend reserves a JSON-inline fixed-size tensor at its
# declared size before it consults the model, so on a server without the access key this request aborts the
# server (std::bad_alloc). With the key, Triton refuses it before it reads the body.
BEYOND_MEMORY_JSON = json.dumps(
    {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [2**45], "data": [1, 2, 3]}]}
).encode()


@pytest.fixture(scope="module")
def keyed_server(runtime_bundle, tmp_path_factory, request):
    """The deployment that admits only key holders to inference (``server_access_arguments``)."""
    from seesr_runtime.triton import server_access_arguments

    access = server_access_arguments(ACCESS_KEY)
    yield from _serve(runtime_bundle, tmp_path_factory, request, "keyed tritonserver", ["--threads", "1"], access)


@needs_server
@pytest.mark.parametrize("key", [None, "wrong-key"], ids=["no-key", "wrong-key"])
def test_requests_without_the_access_key_are_refused_before_their_body_is_read(keyed_server, request, key):
    from seesr_runtime.triton import ACCESS_KEY_HEADER, GRPC_HEADER_PREFIX, access_headers

    http, grpc = access_headers(key, "http"), access_headers(key, "grpc")
    before = keyed_server.resident_bytes()
    refusals = [
        post_http(keyed_server.http_url, "seesr", BEYOND_MEMORY_JSON, header_length=None, extra_headers=http),
        send("http", keyed_server.http_url, [SMALL_IMAGE], headers=http),
        send("grpc", keyed_server.grpc_url, [SMALL_IMAGE], headers=grpc),
    ]
    assert [(a.ok, a.status) for a in refusals] == [(False, "403"), (False, "403"), (False, "UNAVAILABLE")]
    assert [a.message for a in refusals] == [
        *[f"This API is restricted, expecting header '{ACCESS_KEY_HEADER}'"] * 2,
        f"This protocol is restricted, expecting header '{GRPC_HEADER_PREFIX}{ACCESS_KEY_HEADER}'",
    ]
    assert keyed_server.alive()
    grown = keyed_server.resident_bytes() - before
    assert grown < HUGE_REFUSAL_RSS_BOUND, f"server RSS grew {grown / MiB:.1f} MiB"
    say(request, f"{key or 'no key'}: 32 TiB JSON declaration and plain requests refused, RSS {grown / MiB:+.1f} MiB")


@needs_server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_access_key_holders_are_served(keyed_server, lr_image, tmp_path, capsys, monkeypatch, protocol):
    from seesr_runtime.triton import ACCESS_KEY_ENV
    from seesr_runtime.triton_client import main

    lr_image.save(tmp_path / "a.png")
    url = keyed_server.http_url if protocol == "http" else keyed_server.grpc_url
    argv = ["upscale", str(tmp_path / "a.png"), "--protocol", protocol, "--url", url, "--steps", "1", "-q"]
    monkeypatch.delenv(ACCESS_KEY_ENV, raising=False)
    assert main([*argv, "-o", str(tmp_path / "refused")]) == 1
    assert re.search(r"This (API|protocol) is restricted, expecting header '[a-z-]*seesr-key'", capsys.readouterr().err)
    assert not (tmp_path / "refused" / "a.png").exists()
    monkeypatch.setenv(ACCESS_KEY_ENV, ACCESS_KEY)
    assert main([*argv, "-o", str(tmp_path / "served")]) == 0
    assert Image.open(tmp_path / "served" / "a.png").size == (4 * lr_image.width, 4 * lr_image.height)


def test_access_keys_that_tritonserver_could_not_parse_are_refused():
    from seesr_runtime.errors import InputError
    from seesr_runtime.triton import server_access_arguments

    assert server_access_arguments("abc-123")[0] == "--http-restricted-api=inference:seesr-key=abc-123"
    for bad in ["", "a b", "a,b", "a:b", "a=b", "a\nb"]:
        with pytest.raises(InputError, match="the access key must be non-empty printable text"):
            server_access_arguments(bad)


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


# ------------------------------------------------------------------ soak

SOAK_REQUESTS = 300
SOAK_WARMUP = 64
SOAK_CONCURRENCY = 32
# The server's resident memory (tritonserver and its two stubs, about 500 MiB) may grow this much from after
# the warm-up to after the soak. Measured on the 2-core build machine, with glibc returning freed buffers of
# 1 MiB and more (TritonServer's environment): +16 MiB over the first soak after the warm-up, +8 MiB over
# the second (the gRPC frontend's first use included), then flat. A leak of more than 0.43 MB per valid
# request (150 of them) fails this, e.g. one float32 working image at 256x256 (786 KB).
SOAK_RSS_GROWTH_BOUND = 64 * MiB


@dataclass(frozen=True)
class SoakRequest:
    kind: str
    expect: tuple[int, ...] | str  # the output's shape when valid, else a part of the refusal naming the value
    image: bytes | None = None  # an encoded image sent with tritonclient (with the options)...
    options: dict = field(default_factory=dict)
    wire: list[WireInput] | None = None  # ...or a request written byte for byte


def _valid(rng) -> SoakRequest:
    height, width = (int(side) for side in rng.integers(16, 65, size=2))
    options = {"seed": int(rng.integers(0, 2**31)), "steps": int(rng.integers(1, 3))}
    if rng.random() < 0.3:
        options["prompt"] = "a red barn"
    if rng.random() < 0.3:
        options["guidance"] = float(rng.uniform(0.0, 7.0))
    image = encode_png(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
    return SoakRequest("valid", (4 * height, 4 * width, 3), image, options)


def _invalid(rng, index: int) -> SoakRequest:
    """The index-th kind of bad request (they take turns), each with the value it is refused for."""
    side, big = int(rng.integers(16, 65)), int(rng.integers(65, 200))
    huge, bomb = int(rng.integers(10**5, 10**6)), int(rng.integers(10_000, 40_000))
    image = encode_png(np.zeros((side, side, 3), np.uint8))
    noisy = encode_png(rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8))
    kinds = [
        ("steps 0", "steps must be in [1, 999], got 0", {"steps": 0}, image),
        ("steps 1001", "steps must be in [1, 999], got 1001", {"steps": 1001}, image),
        ("negative seed", f"seed must be >= 0, got {-huge}", {"seed": -huge}, image),
        ("guidance nan", "guidance must be a finite number >= 0.0, got nan", {"guidance": float("nan")}, image),
        ("truncated PNG", "input 'image': cannot decode the image (", {}, noisy[: len(noisy) // 2]),
        ("not an image", "input 'image': not a readable image", {}, rng.bytes(int(rng.integers(1, 4096)))),
        (
            "decompression bomb",
            f"input 'image': refused as a decompression bomb: Image size ({bomb * bomb} pixels)",
            {},
            png_header(bomb, bomb),
        ),
        ("image too small", f"input 'image': {side}x4 is too small", {}, encode_png(np.zeros((4, side, 3), np.uint8))),
        (
            "image too large",
            f"{big}x{big} is {big * big} pixels, over the limit of {MAX_PIXELS}",
            {},
            encode_png(np.zeros((big, big, 3), np.uint8)),
        ),
        ("wrong declared shape", _shape_refusal("image", [huge, huge, 3]), {}, None),
        ("huge declared prompt", f"expecting string of length {huge} but only 3 bytes available", {}, None),
        ("huge declared steps", _shape_refusal("steps", [huge]), {}, None),
    ]
    kind, message, options, sent = kinds[index % len(kinds)]
    wire = None
    if kind == "wrong declared shape":
        wire = [WireInput("image", "BYTES", [huge, huge, 3], bytes_element(image))]
    elif kind == "huge declared prompt":
        wire = [SMALL_IMAGE, WireInput("prompt", "BYTES", [1], bytes_element(b"abc", huge))]
    elif kind == "huge declared steps":
        wire = [SMALL_IMAGE, WireInput("steps", "INT32", [huge], bytes(4))]
    return SoakRequest(kind, message, sent, {"steps": 1, **options}, wire)


def soak_requests(count: int, seed: int) -> list[SoakRequest]:
    """Half valid (varied sizes, seeds, steps, prompts, guidance), half invalid, interleaved."""
    rng = np.random.default_rng(seed)
    return [_valid(rng) if i % 2 == 0 else _invalid(rng, i // 2) for i in range(count)]


@dataclass
class SoakOutcome:
    request: SoakRequest
    seconds: float
    unexpected: str | None  # what went other than expected


def run_soak(
    server, protocol: str, requests: list[SoakRequest], key: str | None = None
) -> tuple[list[SoakOutcome], float]:
    """All requests, SOAK_CONCURRENCY at a time (one tritonclient connection per worker thread); each carries
    ``key``, the access key of a server that requires one."""
    from seesr_runtime.triton import access_headers
    from seesr_runtime.triton_client import ClientError, connect, infer

    url = server.http_url if protocol == "http" else server.grpc_url
    local, lock, clients = threading.local(), threading.Lock(), []

    def answer(item: SoakRequest) -> tuple[tuple[int, ...] | None, str]:
        if item.wire is not None:
            wire = send(protocol, url, item.wire, timeout=120, headers=access_headers(key, protocol))
            return None, wire.message
        if not hasattr(local, "client"):
            local.client = connect(protocol, url, timeout=120)
            with lock:
                clients.append(local.client)
        try:
            inputs = build_inputs(protocol, item.image, **item.options)
            result = infer(local.client, protocol, inputs, timeout=120, key=key)
        except ClientError as exc:
            return None, str(exc)
        return result.image.shape, ""

    def one(item: SoakRequest) -> SoakOutcome:
        began = time.perf_counter()
        try:
            shape, message = answer(item)
        except Exception as exc:  # noqa: BLE001 - counted and reported as unexpected, never stops the soak
            shape, message = None, f"{type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - began
        if isinstance(item.expect, str):
            wrong = None if item.expect in message else f"{item.kind}: expected {item.expect!r}, got {message!r}"
        else:
            wrong = None if shape == item.expect else f"{item.kind}: expected {item.expect}, got {shape} {message!r}"
        return SoakOutcome(item, seconds, wrong)

    began = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=SOAK_CONCURRENCY) as pool:
            outcomes = list(pool.map(one, requests))
    finally:
        for client in clients:
            client.close()
    return outcomes, time.perf_counter() - began


def _percentiles_ms(seconds: list[float]) -> str:
    p50, p95 = np.percentile(np.array(seconds) * 1000.0, [50, 95])
    return f"p50 {p50:.0f} ms, p95 {p95:.0f} ms"


@needs_server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_soak_of_valid_and_invalid_requests_keeps_serving_without_leaking(server, request, protocol):
    warmup, _ = run_soak(server, protocol, soak_requests(SOAK_WARMUP, seed=1))
    assert [o.unexpected for o in warmup if o.unexpected] == []
    warm = server.resident_bytes()
    outcomes, seconds = run_soak(server, protocol, soak_requests(SOAK_REQUESTS, seed=2))
    after = server.resident_bytes()

    unexpected = [o.unexpected for o in outcomes if o.unexpected]
    valid = [o.seconds for o in outcomes if not isinstance(o.request.expect, str)]
    refused = [o.seconds for o in outcomes if isinstance(o.request.expect, str)]
    growth = after - warm
    say(
        request,
        f"{protocol} soak: {len(outcomes)} requests ({len(valid)} valid, {len(refused)} invalid), "
        f"{SOAK_CONCURRENCY} concurrent, {len(unexpected)} unexpected, {len(outcomes) / seconds:.1f} req/s; "
        f"latency valid {_percentiles_ms(valid)}, refused {_percentiles_ms(refused)}; server RSS "
        f"{warm / MiB:.0f} MiB after warm-up, {after / MiB:.0f} MiB after the soak "
        f"({growth / MiB:+.1f} MiB, bound {SOAK_RSS_GROWTH_BOUND / MiB:.0f} MiB)",
    )
    assert unexpected == []
    assert growth <= SOAK_RSS_GROWTH_BOUND
    assert server.alive()
    assert "Stub process" not in server.log_tail(100_000)  # no instance died and was restarted


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
        assert running.shm_regions()  # the stub's, under this server's own prefix
    began = time.monotonic()
    running.stop()  # idempotent
    assert time.monotonic() - began < 1
    assert not running.alive()
    assert _live_members(pid) == []  # the group (server and stubs) is gone
    assert running.shm_regions() == []


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


@needs_server
def test_model_refuses_a_repository_of_another_request_format(runtime_bundle, tmp_path):
    """model.py and config.pbtxt come from the repository, the declaration from the server's runtime: a
    mismatch stops the model loading (and this server, which exits on error) with a message saying so."""
    repo = tmp_path / "repo"
    assert write_repo(runtime_bundle, repo, "--reference-bundle") == 0
    config = repo / "seesr" / "config.pbtxt"
    declared = f'key: "service_version" value: {{ string_value: "{SERVICE_VERSION}" }}'
    config.write_text(config.read_text().replace(declared, 'key: "service_version" value: { string_value: "1" }'))
    server = TritonServer(repo, tmp_path)
    with pytest.raises(RuntimeError, match="tritonserver exited"), server:
        pass
    message = f"written for request format '1' but the server's seesr_runtime speaks {SERVICE_VERSION}"
    assert message in server.log_tail(100_000)
