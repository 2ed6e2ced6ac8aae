"""The ONNX graphs the exporter writes: opset, when weights move to external data, and the fixed
shapes the build traces and checks at. Plain Python, so the build options and the CLI read them
without importing torch."""

from __future__ import annotations

OPSET = 17
PROTOBUF_LIMIT = 2 * 1024**3  # a single ONNX protobuf cannot exceed 2 GB
EXTERNAL_DATA_THRESHOLD = PROTOBUF_LIMIT  # graphs above this keep their weights in one .data file
TRACE_ENV = {"B": 2, "h": 16, "w": 24}  # small and non-square: axis mix-ups fail loudly
VERIFY_ENV = {"B": 1, "h": 8, "w": 16}  # another shape than the trace's, checked at build time
