"""``seesr-triton-client``: send images to a SeeSR model on Triton Inference Server (torch-free).

    seesr-triton-client upscale photos/ -o results/ --url 127.0.0.1:8000            # HTTP
    seesr-triton-client upscale a.png -o results/ --protocol grpc --url 127.0.0.1:8001
    seesr-triton-client load a.png --concurrency 32 --requests 256 --steps 20       # throughput, p50/p95/p99

Needs the ``triton`` extra (tritonclient over HTTP and gRPC: ``pip install '.[triton]'`` in a checkout of this
project). Each image is read and
checked here as ``seesr upscale`` would read it (8-bit RGB), then sent as a PNG file: lossless, so the
server sees the very pixels the in-process runtime would, whatever format the file had.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from . import __version__
from . import options as option_table
from .cli import run_command
from .errors import BackendError, ImageRejected, InputError, MissingDependency
from .filemodes import write_atomically
from .inputs import expand_inputs, load_lr_image
from .lazy import imported, lazy_import
from .triton import ACCESS_KEY_ENV, IMAGE_INPUT, INPUTS, OUTPUTS, REQUEST_OPTIONS, TensorSpec, access_headers

PROTOCOLS = ("http", "grpc")
DEFAULT_URLS = {"http": "127.0.0.1:8000", "grpc": "127.0.0.1:8001"}
# Fast deflate: requests travel on a local network or a data-centre one, where encoding time matters more.
PNG_COMPRESS_LEVEL = 1
# Seconds a request may take: a 50-step 512 px image on onnxruntime fp32 takes 12 to 14 minutes on a 2-core
# CPU (benchmarks/results/cpu/); larger images on CPU instances need more (--timeout).
DEFAULT_TIMEOUT_S = 3600.0

# tritonclient ships no type information: its clients and tensors are Any here.
Client = Any
InferInput = Any


# The client library is an extra (the triton extra); one module per protocol.
TRITONCLIENT = {
    "http": lazy_import("tritonclient.http", extra="triton"),
    "grpc": lazy_import("tritonclient.grpc", extra="triton"),
}


class ClientError(BackendError):
    """The server refused a request or could not be reached; the message is the server's."""


def _module(protocol: str) -> ModuleType:
    if protocol not in PROTOCOLS:
        raise InputError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    try:
        return imported(TRITONCLIENT[protocol])
    except MissingDependency as exc:
        raise ClientError(
            f"tritonclient is not installed ({exc.__cause__}): pip install '.[triton]' in a checkout of seesr-export"
        ) from None


def connect(protocol: str, url: str | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> Client:
    """A tritonclient InferenceServerClient; ``timeout`` bounds connecting and each request (seconds)."""
    module = _module(protocol)
    url = url or DEFAULT_URLS[protocol]
    if protocol == "http":
        return module.InferenceServerClient(url, connection_timeout=min(timeout, 60.0), network_timeout=timeout)
    return module.InferenceServerClient(url)


def check_ready(client: Client, protocol: str, url: str | None, model: str, timeout: float = 30.0) -> None:
    """One clear error up front when the server or the model is not there, instead of one per image."""
    url = url or DEFAULT_URLS[protocol]
    extra = {"client_timeout": timeout} if protocol == "grpc" else {}  # HTTP: bounded by connect()'s timeouts
    try:
        ready = client.is_model_ready(model, **extra)
    except Exception as exc:  # noqa: BLE001 - connection refused, DNS, timeouts: all mean "not reachable"
        raise ClientError(f"no Triton server reachable over {protocol} at {url} ({exc})") from None
    if not ready:
        raise ClientError(f"the server at {url} has no ready model {model!r} (see its log)")


def encode_png(image: Any) -> bytes:
    """An RGB image (a PIL image or an [H, W, 3] uint8 array) as a PNG file's bytes: the ``image`` input."""

    picture = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def build_inputs(
    protocol: str,
    image: bytes,
    *,
    prompt: str | None = None,
    seed: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
) -> list[InferInput]:
    """The request's input tensors: ``image`` is an encoded image file's bytes (``encode_png``), sent as given,
    so the server decides; the options that are not None."""
    module = _module(protocol)
    given = {IMAGE_INPUT.name: image, "prompt": prompt, "seed": seed, "steps": steps, "guidance": guidance}
    return [_tensor(module, spec, given[spec.name]) for spec in INPUTS if given[spec.name] is not None]


def _tensor(module: ModuleType, spec: TensorSpec, value: object) -> InferInput:
    element = value.encode("utf-8") if isinstance(value, str) else value
    array = np.array([element], dtype=spec.numpy_type).reshape(spec.dims)
    tensor = module.InferInput(spec.name, list(array.shape), spec.wire_type)
    tensor.set_data_from_numpy(array)
    return tensor


@dataclass
class Upscaled:
    """The response; its fields are the service's outputs (``seesr_runtime.triton.OUTPUTS``)."""

    image: npt.NDArray[np.uint8]  # [4H, 4W, 3]
    tags: str
    prompt: str


def infer(
    client: Client,
    protocol: str,
    inputs: list[InferInput],
    model: str = "seesr",
    timeout: float = DEFAULT_TIMEOUT_S,
    key: str | None = None,
) -> Upscaled:
    """One request, carrying the deployment's access ``key`` when given (``seesr_runtime.triton``); raises
    ClientError with the server's message when it is refused."""
    from tritonclient.utils import InferenceServerException

    module = _module(protocol)
    outputs = [module.InferRequestedOutput(spec.name) for spec in OUTPUTS]
    extra = {"client_timeout": timeout} if protocol == "grpc" else {}
    try:
        result = client.infer(model, inputs, outputs=outputs, headers=access_headers(key, protocol), **extra)
    except InferenceServerException as exc:
        raise ClientError(exc.message() or str(exc)) from None
    return Upscaled(**{spec.name: _output(spec, result.as_numpy(spec.name)) for spec in OUTPUTS})


def _output(spec: TensorSpec, value: npt.NDArray[Any]) -> Any:
    if spec.data_type != "TYPE_STRING":
        return value
    raw = value.reshape(-1)[0]
    return raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)


# ------------------------------------------------------------------ load test

# One request's outcome: (seconds, None) when it succeeded, (None, message) when it failed.
Outcome = tuple[float | None, str | None]


@dataclass
class LoadReport:
    protocol: str
    concurrency: int
    requests: int
    ok: int
    errors: int
    seconds: float
    throughput_rps: float
    latency_ms: dict[str, float]  # p50, p95, p99, mean, max over successful requests
    error_messages: list[str]  # distinct messages, at most 5

    def summary(self) -> str:
        lat = self.latency_ms
        lines = [
            f"{self.requests} requests over {self.protocol}, concurrency {self.concurrency}: "
            f"{self.ok} ok, {self.errors} errors in {self.seconds:.2f} s ({self.throughput_rps:.2f} req/s)"
        ]
        if lat:
            lines.append(
                f"latency ms: p50 {lat['p50']:.1f}  p95 {lat['p95']:.1f}  p99 {lat['p99']:.1f}  "
                f"mean {lat['mean']:.1f}  max {lat['max']:.1f}"
            )
        lines += [f"error: {message}" for message in self.error_messages]
        return "\n".join(lines)


def run_load(
    protocol: str,
    url: str | None,
    image: bytes,
    *,
    concurrency: int,
    requests: int,
    model: str = "seesr",
    timeout: float = DEFAULT_TIMEOUT_S,
    key: str | None = None,
    **options: Any,
) -> LoadReport:
    """``requests`` requests, ``concurrency`` in flight at a time (one connection per worker thread)."""
    if concurrency < 1 or requests < 1:
        raise InputError(f"concurrency and requests must be at least 1, got {concurrency} and {requests}")
    local, lock = threading.local(), threading.Lock()
    clients: list[Client] = []

    def one(_index: int) -> Outcome:
        if not hasattr(local, "client"):
            local.client = connect(protocol, url, timeout)
            with lock:
                clients.append(local.client)
        began = time.perf_counter()
        try:
            infer(local.client, protocol, build_inputs(protocol, image, **options), model, timeout, key)
        except Exception as exc:  # noqa: BLE001 - every failure is counted and reported, none stops the run
            return None, f"{type(exc).__name__}: {exc}"
        return time.perf_counter() - began, None

    began = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            outcomes = list(pool.map(one, range(requests)))
    finally:
        for client in clients:
            client.close()
    return _report(protocol, concurrency, requests, time.perf_counter() - began, outcomes)


def _report(protocol: str, concurrency: int, requests: int, seconds: float, outcomes: list[Outcome]) -> LoadReport:
    latencies = np.array([lat for lat, _ in outcomes if lat is not None]) * 1000.0
    messages = [message for _, message in outcomes if message is not None]
    latency: dict[str, float] = {}
    if latencies.size:
        p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
        latency = {
            "p50": float(p50),
            "p95": float(p95),
            "p99": float(p99),
            "mean": float(latencies.mean()),
            "max": float(latencies.max()),
        }
    return LoadReport(
        protocol=protocol,
        concurrency=concurrency,
        requests=requests,
        ok=int(latencies.size),
        errors=len(messages),
        seconds=seconds,
        throughput_rps=latencies.size / seconds,
        latency_ms=latency,
        error_messages=sorted(set(messages))[:5],
    )


# ------------------------------------------------------------------ command line


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    """The request options given on the command line, checked here (the server checks them again)."""
    given = option_table.given_in(args, REQUEST_OPTIONS)
    return {name: given.get(name) for name in REQUEST_OPTIONS}


def _access_key() -> str | None:
    """The deployment's access key, from the environment only: a command line shows in every process list."""
    return os.environ.get(ACCESS_KEY_ENV) or None


def _load_image(path: Path, max_pixels: int) -> bytes:
    """The file checked and converted as ``seesr upscale`` reads it, re-encoded as PNG (lossless, one format)."""
    image, _note = load_lr_image(path, max_pixels)
    return encode_png(image)


def cmd_upscale(args: argparse.Namespace) -> int:
    sampling = _sampling(args)
    files = expand_inputs(args.inputs)
    if not files:
        print("error: no input images found", file=sys.stderr)
        return 2
    client, failed = connect(args.protocol, args.url, args.timeout), []
    try:
        check_ready(client, args.protocol, args.url, args.model, min(args.timeout, 30.0))
        for path in files:
            try:
                result = infer(
                    client,
                    args.protocol,
                    build_inputs(args.protocol, _load_image(path, args.max_pixels), **sampling),
                    args.model,
                    args.timeout,
                    _access_key(),
                )
            except (ImageRejected, ClientError, OSError) as exc:
                print(f"error: {path}: {exc}", file=sys.stderr)
                failed.append(path)
                continue
            target = args.output / f"{path.stem}.png"
            write_atomically(target, lambda tmp, image=result.image: Image.fromarray(image).save(tmp, format="PNG"))
            write_atomically(
                args.output / f"{path.stem}.txt", lambda tmp, prompt=result.prompt: Path(tmp).write_text(prompt + "\n")
            )
            if not args.quiet:
                print(
                    f"{path} -> {target} ({result.image.shape[1]}x{result.image.shape[0]}); tags: {result.tags}",
                    file=sys.stderr,
                )
    finally:
        client.close()
    print(f"{len(files) - len(failed)} upscaled, {len(failed)} failed", file=sys.stderr)
    return 1 if failed else 0


def cmd_load(args: argparse.Namespace) -> int:
    sampling = _sampling(args)
    try:
        image = _load_image(args.image, args.max_pixels)
    except ImageRejected as exc:
        print(f"error: {args.image}: {exc}", file=sys.stderr)
        return 2
    client = connect(args.protocol, args.url, args.timeout)
    try:
        check_ready(client, args.protocol, args.url, args.model, min(args.timeout, 30.0))
    finally:
        client.close()
    report = run_load(
        args.protocol,
        args.url,
        image,
        concurrency=args.concurrency,
        requests=args.requests,
        model=args.model,
        timeout=args.timeout,
        key=_access_key(),
        **sampling,
    )
    print(json.dumps(asdict(report), indent=1) if args.json else report.summary())
    return 1 if report.errors else 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--protocol", choices=PROTOCOLS, default="http", help="default http")
    parser.add_argument("--url", default=None, help="host:port (default 127.0.0.1:8000 for http, :8001 for grpc)")
    parser.add_argument("--model", default="seesr", help="model name in the repository (default seesr)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds per request (default {DEFAULT_TIMEOUT_S:.0f}: a 50-step image on a CPU instance takes minutes)",
    )
    option_table.add_arguments(parser, REQUEST_OPTIONS, server_side=True)
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=option_table.default("max_pixels"),
        help=f"refuse larger local inputs (default {option_table.default('max_pixels')}; the server has its own limit)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seesr-triton-client",
        description="Send images to a SeeSR model served by Triton Inference Server.",
        epilog=f"A server that admits only key holders to inference: set ${ACCESS_KEY_ENV} to its key.",
    )
    parser.add_argument("--version", action="version", version=f"seesr-runtime {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("upscale", help="upscale images through the server; write NAME.png and NAME.txt (prompt)")
    p.add_argument("inputs", nargs="+", type=Path, help="images, or directories of images")
    p.add_argument("-o", "--output", type=Path, required=True, help="output directory")
    p.add_argument("-q", "--quiet", action="store_true")
    _common(p)
    p.set_defaults(func=cmd_upscale)

    p = sub.add_parser("load", help="send one image N times, C at a time; report throughput, latency, errors")
    p.add_argument("image", type=Path)
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    p.add_argument("--requests", type=int, default=64, help="requests in all (default 64)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _common(p)
    p.set_defaults(func=cmd_load)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.func, args)  # ClientError is a SeeSRError: one line, exit 2


if __name__ == "__main__":
    sys.exit(main())
