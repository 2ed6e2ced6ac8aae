"""Inference requests written byte for byte, for the requests tritonclient will not send: declared shapes
that do not match the data, element lengths that overrun the buffer, byte counts that lie.

``send(protocol, url, inputs)`` posts one request over HTTP (JSON header, binary data: the protocol's
binary-data extension) or gRPC (``raw_input_contents``) and returns the server's answer as a
``Answer(ok, message)``: the refusal's message, or "" when the server ran the request.
"""

from __future__ import annotations

import json
import struct
import urllib.error
import urllib.request
from dataclasses import dataclass


@dataclass(frozen=True)
class WireInput:
    name: str
    datatype: str  # the protocol's name: UINT8, BYTES, INT32...
    shape: list[int]  # as declared, whatever the data holds
    data: bytes
    declared_bytes: int | None = None  # HTTP's binary_data_size when it should lie (default: len(data))


@dataclass(frozen=True)
class Answer:
    ok: bool
    message: str  # the server's error message when refused
    status: str  # HTTP status code or gRPC status name


def bytes_element(text: bytes, declared_length: int | None = None) -> bytes:
    """One BYTES element: its 4-byte little-endian length (declared_length when it should lie), then the bytes."""
    return struct.pack("<I", len(text) if declared_length is None else declared_length) + text


def send(
    protocol: str,
    url: str,
    inputs: list[WireInput],
    model: str = "seesr",
    timeout: float = 60,
    headers: dict[str, str] | None = None,
) -> Answer:
    """``headers``: extra HTTP headers, or gRPC metadata (an access key)."""
    if protocol == "http":
        return _send_http(url, inputs, model, timeout, headers or {})
    return _send_grpc(url, inputs, model, timeout, headers or {})


def _send_http(url: str, inputs: list[WireInput], model: str, timeout: float, headers: dict[str, str]) -> Answer:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": item.name,
                    "datatype": item.datatype,
                    "shape": item.shape,
                    "parameters": {
                        "binary_data_size": len(item.data) if item.declared_bytes is None else item.declared_bytes
                    },
                }
                for item in inputs
            ],
            "outputs": [{"name": "image", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return post_http(url, model, header + b"".join(item.data for item in inputs), len(header), timeout, headers)


def post_http(
    url: str,
    model: str,
    body: bytes,
    header_length: int | None,
    timeout: float = 60,
    extra_headers: dict[str, str] | None = None,
) -> Answer:
    """POST an inference body; header_length None: a JSON-only body (tensor data inline as JSON)."""
    headers = {"Content-Type": "application/octet-stream" if header_length else "application/json"}
    headers.update(extra_headers or {})
    if header_length:
        headers["Inference-Header-Content-Length"] = str(header_length)
    request = urllib.request.Request(f"http://{url}/v2/models/{model}/infer", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return Answer(True, "", str(response.status))
    except urllib.error.HTTPError as exc:
        return Answer(False, json.loads(exc.read())["error"], str(exc.code))


def _send_grpc(url: str, inputs: list[WireInput], model: str, timeout: float, headers: dict[str, str]) -> Answer:
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    request = service_pb2.ModelInferRequest(model_name=model)
    for item in inputs:
        tensor = request.inputs.add()
        tensor.name, tensor.datatype = item.name, item.datatype
        tensor.shape.extend(item.shape)
        request.raw_input_contents.append(item.data)
    with grpc.insecure_channel(url) as channel:
        try:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            stub.ModelInfer(request, timeout=timeout, metadata=tuple(headers.items()))
        except grpc.RpcError as exc:
            return Answer(False, exc.details(), exc.code().name)
    return Answer(True, "", "OK")
