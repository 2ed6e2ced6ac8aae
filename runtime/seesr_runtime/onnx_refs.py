"""The external-data files an ONNX graph refers to, read from its protobuf encoding without ``onnx``.

onnxruntime and OpenVINO open the file each tensor's ``external_data`` ``location`` names, relative to
the graph's folder. The runtime checks those names before either engine opens the graph (see
``Manifest.graph_path``), and must not need the ``onnx`` package to do so. Only the messages that can
hold tensors are entered (model -> graphs, functions, training info -> nodes -> attributes ->
(sparse) tensors -> their ``external_data`` entries); every other field, weights included, is skipped by
its length, so a graph with gigabytes of embedded weights is read in milliseconds (memory-mapped:
skipped bytes are never read from disk).

Field numbers are those of onnx.proto (stable since IR version 3; protobuf never reuses them).
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path

# message kind -> {field number: kind of the embedded message}; fields not listed are skipped.
_CHILDREN = {
    "model": {7: "graph", 20: "training_info", 25: "function"},
    "training_info": {1: "graph", 2: "graph"},
    "function": {7: "node", 11: "attribute"},
    "graph": {1: "node", 5: "tensor", 15: "sparse_tensor"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse_tensor", 23: "sparse_tensor"},
    "sparse_tensor": {1: "tensor", 2: "tensor"},
    "tensor": {13: "entry"},
}
_MAX_DEPTH = 64  # subgraphs nest (If/Loop bodies); a deeper nesting is a malformed or hostile file


class NotProtobuf(ValueError):
    """The bytes are not a well-formed protobuf message (truncated, or not an ONNX file)."""


def external_data_locations(path: Path) -> set[str]:
    """Every ``location`` of an ``external_data`` entry in the ONNX graph at ``path``, as written there."""
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            return set()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            locations: set[str] = set()
            _walk(data, 0, len(data), "model", locations, 0)
            return locations


def _walk(data: mmap.mmap, start: int, end: int, kind: str, locations: set[str], depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise NotProtobuf(f"messages nested deeper than {_MAX_DEPTH} levels")
    children = _CHILDREN.get(kind, {})
    key = value = None
    for number, wire, first, last in _fields(data, start, end):
        if kind == "entry" and wire == 2 and number in (1, 2):
            text = bytes(data[first:last]).decode("utf-8", "replace")
            key, value = (text, value) if number == 1 else (key, text)
        elif wire == 2 and number in children:
            _walk(data, first, last, children[number], locations, depth + 1)
    if kind == "entry" and key == "location" and value is not None:
        locations.add(value)


def _fields(data: mmap.mmap, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, payload start, payload end) of each field in ``data[pos:end]``."""
    while pos < end:
        tag, pos = _varint(data, pos, end)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _, after = _varint(data, pos, end)
        elif wire == 1:
            after = pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos, end)
            after = pos + length
        elif wire == 5:
            after = pos + 4
        else:  # groups (3, 4) are not used by ONNX; 6 and 7 do not exist
            raise NotProtobuf(f"wire type {wire} at byte {pos}")
        if number == 0 or after > end:
            raise NotProtobuf(f"field {number} at byte {pos} runs past its message (truncated file?)")
        yield number, wire, pos, after
        pos = after


def _varint(data: mmap.mmap, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise NotProtobuf(f"malformed varint at byte {pos}")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7
