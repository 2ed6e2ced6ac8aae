"""Where onnxruntime's CUDA time goes on a bundle's graphs: host copies, launches, CPU fallbacks.

For each network, at one shape (default: the guided 512 px call, B=2, 64x64 latent):
- ``numpy``: session.run with host arrays (what the runtime does today: copies in and out);
- ``iobinding``: inputs and outputs already on the GPU (OrtValue), no host copies;
- ``cuda_graph``: the same, captured once and replayed (provider option ``enable_cuda_graph``);
- placement: how many nodes run on which provider and how many copies ORT inserted (from its profile).

    python benchmarks/ort_cuda_probe.py --bundle B --networks unet controlnet --precision fp16 --json out.json

``--fill-missing-weights`` stands in random weights for a graph whose external data file is absent
(a graph structure carried to a remote machine without its gigabytes; latency does not depend on values).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "runtime")]

from seesr_runtime.manifest import Manifest
from seesr_runtime.networks import dummy_feeds


def with_random_weights(path: Path, scratch: Path) -> Path:
    """A copy of ``path`` whose missing external initializers are filled with a random pattern."""
    model = onnx.load(str(path), load_external_data=False)
    pattern = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32) * 0.02
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
        count = int(np.prod(init.dims)) if init.dims else 1
        values = np.resize(pattern, count).astype(dtype)
        del init.external_data[:]
        init.data_location = onnx.TensorProto.DEFAULT
        init.raw_data = values.tobytes()
    out = scratch / path.name
    onnx.save_model(
        model,
        str(out),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=out.name + ".data",
        size_threshold=1024,
    )
    return out


def with_static_shapes(path: Path, feeds: dict, scratch: Path) -> Path:
    """A copy whose inputs have fixed dimensions: onnxruntime can then fold the shape arithmetic the
    tracer left for dynamic sizes (which otherwise runs on the CPU, between GPU kernels)."""
    model = onnx.load(str(path), load_external_data=False)
    for graph_input in model.graph.input:
        dims = graph_input.type.tensor_type.shape.dim
        for dim, size in zip(dims, feeds[graph_input.name].shape):
            dim.Clear()
            dim.dim_value = size
    del model.graph.value_info[:]  # stale symbolic shapes; onnxruntime infers them again
    for output in model.graph.output:
        for dim in output.type.tensor_type.shape.dim:
            dim.Clear()
    out = scratch / f"static-{path.name}"
    data = path.with_name(path.name + ".data")
    if data.exists():  # same directory, same external-data name: link it beside the new graph
        link = scratch / data.name
        if not link.exists():
            link.symlink_to(data.resolve())
        for init in model.graph.initializer:
            for entry in init.external_data:
                if entry.key == "location":
                    entry.value = data.name
    onnx.save_model(model, str(out))
    return out


def feeds_for(spec, env: dict) -> dict:
    return dummy_feeds(spec, env, seed=1)


def timed(fn, runs: int) -> dict:
    fn()
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median_ms": float(np.median(times) * 1e3), "p95_ms": float(np.percentile(times, 95) * 1e3)}


DEVICE = "cuda"  # --dry-run: "cpu", so the script can be checked where no GPU is


def session(path: Path, *, cuda_graph: bool = False, profile_prefix: str | None = None):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    cuda = {"enable_cuda_graph": "1"} if cuda_graph else {}
    providers = (
        [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"] if DEVICE == "cuda" else ["CPUExecutionProvider"]
    )
    return ort.InferenceSession(str(path), options, providers=providers)


def bound_runner(sess, feeds: dict, output_names: list[str]):
    """run_with_iobinding over inputs and outputs that live on the GPU (allocated once)."""
    binding = sess.io_binding()
    keep = []
    for name, value in feeds.items():
        ort_value = ort.OrtValue.ortvalue_from_numpy(value, DEVICE, 0)
        keep.append(ort_value)
        binding.bind_ortvalue_input(name, ort_value)
    for name in output_names:
        binding.bind_output(name, DEVICE, 0)
    sess.run_with_iobinding(binding)  # allocates the outputs; later runs reuse them
    outputs = binding.get_outputs()
    for name, value in zip(output_names, outputs):
        binding.bind_ortvalue_output(name, value)

    def run():
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()

    run.keep = (keep, outputs)  # type: ignore[attr-defined]  # the attribute keeps the device buffers alive
    return run


def placement(sess) -> dict:
    path = sess.end_profiling()
    events = json.loads(Path(path).read_text())
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    providers = Counter(e["args"].get("provider", "?") for e in nodes)
    copies = [e["args"].get("op_name") for e in nodes if "Memcpy" in e["args"].get("op_name", "")]
    on_cpu = Counter(e["args"].get("op_name") for e in nodes if e["args"].get("provider") == "CPUExecutionProvider")
    Path(path).unlink(missing_ok=True)
    return {
        "node_runs_per_provider": dict(providers),
        "memcpy_node_runs": len(copies),
        "cpu_op_types": dict(on_cpu.most_common(12)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--networks", nargs="+", default=["unet", "controlnet"])
    parser.add_argument("--precision", default="fp16")
    parser.add_argument("--env", default="B=2,h=64,w=64", help="named dimensions of the call")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--fill-missing-weights", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--static", action="store_true", help="also time a copy with fixed input shapes")
    parser.add_argument("--dry-run", action="store_true", help="CPU provider, no CUDA graph: checks the script")
    args = parser.parse_args()
    global DEVICE
    DEVICE = "cpu" if args.dry_run else "cuda"
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    env = {k: int(v) for k, v in (item.split("=") for item in args.env.split(","))}
    manifest = Manifest.load(args.bundle, verify="never" if args.fill_missing_weights else "auto")
    report = {"onnxruntime": ort.__version__, "device": DEVICE, "env": env, "precision": args.precision, "networks": {}}
    with tempfile.TemporaryDirectory(prefix="ort-probe-") as scratch:
        for network in args.networks:
            path = manifest.graph_path(network, args.precision)
            entry = manifest.data["networks"][network]["files"][args.precision]
            data = entry.get("external_data")
            if args.fill_missing_weights and (data is None or not manifest.file(data).exists()):
                path = with_random_weights(path, Path(scratch))
            spec = manifest.spec(network)
            feeds = feeds_for(spec, env)
            result = {}
            if args.static:
                path = with_static_shapes(path, feeds, Path(scratch))
                result["static_shapes"] = True
            started = time.perf_counter()
            plain = session(path)
            result["session_s"] = time.perf_counter() - started
            result["numpy"] = timed(lambda s=plain, n=spec.output_names, f=feeds: s.run(n, f), args.runs)
            result["iobinding"] = timed(bound_runner(plain, feeds, spec.output_names), args.runs)
            del plain
            try:
                if args.dry_run:
                    raise RuntimeError("not on the CPU")
                graph = session(path, cuda_graph=True)
                result["cuda_graph"] = timed(bound_runner(graph, feeds, spec.output_names), args.runs)
                del graph
            except Exception as exc:  # noqa: BLE001 - a graph ORT cannot capture is a finding, not a crash
                result["cuda_graph"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            profiled = session(path, profile_prefix=str(Path(scratch) / network))
            profiled.run(spec.output_names, feeds)  # one run: the node counts are per call
            result["placement"] = placement(profiled)
            del profiled
            report["networks"][network] = result
            print(network, json.dumps(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
