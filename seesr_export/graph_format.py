"""The ONNX graphs the exporter writes: opset, when weights move to external data, and the fixed
shapes the build traces and checks at. Plain Python, so the build options and the CLI read them
without importing torch."""

from __future__ import annotations

OPSET = 17
PROTOBUF_LIMIT = 2 * 1024**3  # a single ONNX protobuf cannot exceed 2 GB
# Graphs with more weights than this keep them in one .data file beside the graph. Engines map external data
# from the file, but copy weights embedded in the protobuf, twice while reading it: at SD2 size, OpenVINO
# preparing the 1.96 GB ControlNet peaked at 3.9 GB of anonymous memory embedded and 0.4 GB external
# (benchmarks/results/cpu/edge_memory.md); a memory budget needs the latter.
EXTERNAL_DATA_THRESHOLD = 64 * 1024**2
TRACE_ENV = {"B": 2, "h": 16, "w": 24}  # small and non-square: axis mix-ups fail loudly
VERIFY_ENV = {"B": 1, "h": 8, "w": 16}  # another shape than the trace's, checked at build time
