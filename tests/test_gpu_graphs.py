"""GPU graphs (issue 11), checked where no GPU is: their structure, the build's parity gate, the
runtime's graph choice, IOBinding and static-shape sessions on the CPU provider.

The fused ops of a GPU graph (NhwcConv, GroupNorm, BiasSplitGelu, packed-KV MultiHeadAttention) have
CUDA kernels only, so its numbers are checked on a GPU by benchmarks/gpu_validate.py; here the same
fusions without the CUDA-only kernels run in fp32 against torch (the manifest's "fused_fp32" parity).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from seesr_export.bundle import BuildError, BuildOptions, build_bundle
from seesr_export.export import toposort
from seesr_export.gpu_graph import _num_heads_of, fuse, fused_op_counts, fusion_options, numpy2_safe_optimizer
from seesr_export.parity import PARITY_TOLERANCES
from seesr_runtime import SeeSRPipeline
from seesr_runtime.backends import OnnxRuntimeBackend, run_on_device, to_device
from seesr_runtime.manifest import GPU_GRAPH, Manifest
from seesr_runtime.networks import NETWORK_NAMES
from seesr_runtime.ort_device import DeviceTensor, fix_dimensions, graph_precision

DENOISERS = ("unet", "controlnet")
WITH_GPU_GRAPHS = (*DENOISERS, "vae_encoder", "vae_decoder")
CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]
CPU = ["CPUExecutionProvider"]


def _load(path):
    return onnx.load(str(path))


def _producers(model) -> dict:
    return {out: node for node in model.graph.node for out in node.output}


def _source_input(model, tensor: str, depth: int = 30) -> str:
    """The graph input a tensor is projected from, following first inputs (MatMul, Reshape, Cast...)."""
    producers, inputs = _producers(model), {i.name for i in model.graph.input}
    for _ in range(depth):
        if tensor in inputs:
            return tensor
        node = producers.get(tensor)
        if node is None:
            return "constant"
        tensor = node.input[0]
    return "hidden states"


def _ancestors(model, names: set[str]) -> list:
    producers = _producers(model)
    nodes = {n.name: n for n in model.graph.node}
    seen, pending = {}, [nodes[n] for n in names]
    while pending:
        node = pending.pop()
        if node.name not in seen:
            seen[node.name] = node
            pending.extend(producers[i] for i in node.input if i in producers)
    return list(seen.values())


# ---------------------------------------------------------------- structure


@pytest.mark.parametrize("network", DENOISERS)
def test_gpu_graph_fuses_every_attention(tiny_bundle, network):
    """Every attention of the fp32 graph (one Softmax each) is a MultiHeadAttention in the GPU graph:
    self-attention with packed QKV, the text (77 tokens) and image (145 DAPE tokens) cross-attentions
    with packed KV, in equal numbers (one of each per transformer block)."""
    manifest = Manifest.load(tiny_bundle)
    entry = manifest.entry(network)["files"][GPU_GRAPH]
    gpu, fp32 = _load(manifest.graph_path(network, GPU_GRAPH)), _load(manifest.graph_path(network, "fp32"))
    ops = Counter(n.op_type for n in gpu.graph.node)
    attentions = sum(n.op_type == "Softmax" for n in fp32.graph.node)
    assert attentions > 0 and ops["MultiHeadAttention"] == attentions and ops["Softmax"] == 0
    mha = [n for n in gpu.graph.node if n.op_type == "MultiHeadAttention"]
    kv_sources = Counter(
        _source_input(gpu, n.input[1]) if len(n.input) > 1 and n.input[1] else "self (packed QKV)" for n in mha
    )
    assert kv_sources["encoder_hidden_states"] == kv_sources["image_embeds"] > 0, kv_sources
    assert sum(kv_sources.values()) == attentions
    assert entry["providers"] == ["CUDAExecutionProvider"]
    assert entry["fused_ops"] == dict(
        sorted(Counter(n.op_type for n in gpu.graph.node if n.domain == "com.microsoft").items())
    )
    expected_ops = ("GroupNorm", "BiasSplitGelu", "NhwcConv", "SkipLayerNormalization", "BiasAdd")
    assert [op for op in expected_ops if entry["fused_ops"].get(op, 0) == 0] == [], entry["fused_ops"]


@pytest.mark.parametrize("network", DENOISERS)
def test_gpu_graph_is_fp16_with_fp32_timestep_embedding_and_io(tiny_bundle, network):
    """Weights fp16; inputs and outputs fp32 as the numpy side feeds them; the sinusoidal timestep
    embedding (Sin/Cos and everything feeding them) computed in fp32, with no cast to fp16 on the way."""
    manifest = Manifest.load(tiny_bundle)
    gpu = _load(manifest.graph_path(network, GPU_GRAPH))
    weight_bytes = Counter()
    for init in gpu.graph.initializer:
        weight_bytes[init.data_type] += len(init.raw_data)
    # fp32 is left for GroupNorm's gamma/beta (its kernel takes them in fp32) and the timestep embedding.
    assert weight_bytes[TensorProto.FLOAT16] > 50 * weight_bytes[TensorProto.FLOAT]
    for value in (*gpu.graph.input, *gpu.graph.output):
        assert value.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.INT64), value.name
    trig = {n.name for n in gpu.graph.node if n.op_type in ("Sin", "Cos")}
    assert len(trig) == 2
    embedding = _ancestors(gpu, trig)
    assert "timestep" in {i for n in embedding for i in n.input}
    to_fp16 = [n.name for n in embedding if n.op_type == "Cast" and n.attribute[0].i == TensorProto.FLOAT16]
    assert not to_fp16
    initializers = {i.name: i.data_type for i in gpu.graph.initializer}
    feeding = {initializers[i] for n in embedding for i in n.input if initializers.get(i) in (1, 10)}
    assert feeding <= {TensorProto.FLOAT}
    assert set(manifest.entry(network)["files"][GPU_GRAPH]["fp32_nodes"]) == {n.name for n in embedding}


@pytest.mark.parametrize("network", ("vae_encoder", "vae_decoder"))
def test_vae_gpu_graph_fuses_group_norm_and_keeps_its_attention_fp32(tiny_bundle, network):
    """The VAE's GPU graph: GroupNorm and NHWC convolutions fused; its attention does not fuse, so its
    scores and softmax stay fp32 as in the plain fp16 graph."""
    manifest = Manifest.load(tiny_bundle)
    entry = manifest.entry(network)["files"][GPU_GRAPH]
    gpu = _load(manifest.graph_path(network, GPU_GRAPH))
    assert entry["fused_ops"]["GroupNorm"] > 0 and entry["fused_ops"]["NhwcConv"] > 0
    softmax = [n for n in gpu.graph.node if n.op_type == "Softmax"]
    assert softmax and {n.name for n in softmax} <= set(entry["fp32_nodes"])
    producers = _producers(gpu)
    for node in softmax:
        source = producers[node.input[0]]
        assert not (source.op_type == "Cast" and source.attribute[0].i == TensorProto.FLOAT16), node.name


def test_gpu_graph_needs_cuda_kernels(tiny_bundle):
    """Why the GPU graph is checked on a GPU: the CPU provider has no kernel for its fused ops (if a
    future onnxruntime adds them, this test says so and the build can check the graph itself)."""
    manifest = Manifest.load(tiny_bundle)
    with pytest.raises(Exception, match="NhwcConv|GroupNorm|BiasSplitGelu|NOT_IMPLEMENTED|kernel"):
        ort.InferenceSession(str(manifest.graph_path("unet", GPU_GRAPH)), providers=CPU)


@pytest.mark.parametrize("name", NETWORK_NAMES)
def test_every_graph_passed_its_parity_gate(tiny_bundle, name):
    """The build measured each CPU-runnable graph (and the fused fp32 variant of each GPU graph) against
    torch and recorded the tolerance it passed."""
    entry = Manifest.load(tiny_bundle).data["networks"][name]
    expected = {"fp32", "fp16"} | ({"fused_fp32"} if GPU_GRAPH in entry["files"] else set())
    assert set(entry["parity"]) == expected
    for graph, result in entry["parity"].items():
        assert result["max_rel_l2"] <= result["tolerance"] == PARITY_TOLERANCES[name][graph], graph


def test_gpu_graphs_exist_for_the_denoisers_and_the_vae(tiny_bundle):
    networks = Manifest.load(tiny_bundle).data["networks"]
    assert set(networks) == set(NETWORK_NAMES)
    assert {n for n, e in networks.items() if GPU_GRAPH in e["files"]} == set(WITH_GPU_GRAPHS)


def test_optimizer_workaround_for_numpy_2_4_is_scoped():
    """onnxruntime's get_num_heads calls int() on a 1-element array (an error from numpy 2.4); the
    replacement is installed only while our fusions run, in both copies of the optimizer's module."""
    with numpy2_safe_optimizer():
        classes = [
            sys.modules[m].FusionAttentionUnet
            for m in ("fusion_attention_unet", "onnxruntime.transformers.fusion_attention_unet")
        ]
        assert all(c.get_num_heads is _num_heads_of for c in classes)
    assert all(c.get_num_heads is not _num_heads_of for c in classes)


@pytest.mark.slow
@pytest.mark.parametrize("network, model_type", [("vae_decoder", "vae"), ("controlnet", "unet")])
def test_fusion_speed_and_memory_changes_write_the_same_graph(tiny_bundle, monkeypatch, network, model_type):
    """What ``fuse`` changes in onnxruntime's optimizer changes no byte of its graph: fusions handed their pass's
    name maps (speed), and shape inference copying the model without its weights (memory; for the graph, with
    every float initializer set aside, not only the large ones). The shape inference the fp16 conversion reads
    its types from gives the same value types and shapes with and without the weights."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    from onnxruntime.transformers import optimizer

    from seesr_export import gpu_graph

    monkeypatch.setattr(gpu_graph, "MIN_WEIGHT_ELEMENTS", 1)
    src = tiny_bundle / "onnx" / "fp32" / f"{network}.onnx"
    with numpy2_safe_optimizer():
        shipped = optimizer.optimize_model(
            str(src),
            model_type=model_type,
            num_heads=0,
            hidden_size=0,
            opt_level=0,
            optimization_options=fusion_options(model_type, True),
            use_gpu=True,
            only_onnxruntime=False,
        )
    ours = fuse(src, model_type)
    fused = fused_op_counts(ours.model)
    assert fused["GroupNorm"] > 0 and (model_type == "vae" or fused["MultiHeadAttention"] > 0), fused
    assert ours.model.SerializeToString() == shipped.model.SerializeToString()
    monkeypatch.undo()  # the real threshold: small float constants (Resize scales) keep their values
    with gpu_graph.shape_inference_without_weights():
        light = SymbolicShapeInference.infer_shapes(ours.model, auto_merge=True)
    full = SymbolicShapeInference.infer_shapes(ours.model, auto_merge=True)
    assert len(full.graph.value_info) > len(ours.model.graph.node)
    assert [v.SerializeToString() for v in light.graph.value_info] == [
        v.SerializeToString() for v in full.graph.value_info
    ]


def test_shape_inference_sees_weights_without_their_values(tiny_bundle):
    """The copy shape inference makes holds the weights' names, types and dims but not their bytes, and the
    patch is installed only while it is needed."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    from seesr_export.gpu_graph import MIN_WEIGHT_ELEMENTS, shape_inference_without_weights, without_weights

    model = _load(tiny_bundle / "onnx" / "fp32" / "unet.onnx")
    light, weights = without_weights(model)
    large = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT and np.prod(t.dims) >= 1024]
    assert MIN_WEIGHT_ELEMENTS == 1024 and sorted(weights) == sorted(t.name for t in large) and weights
    stripped = {t.name: t for t in light.graph.initializer if t.name in weights}
    assert all(not t.raw_data and list(t.dims) == list(o.dims) for o in large for t in [stripped[o.name]])
    assert light.ByteSize() < model.ByteSize() // 4
    assert len(light.graph.node) == len(model.graph.node)
    original = SymbolicShapeInference.__dict__["_preprocess"]
    with shape_inference_without_weights():
        assert SymbolicShapeInference.__dict__["_preprocess"] is not original
    assert SymbolicShapeInference.__dict__["_preprocess"] is original


@pytest.mark.parametrize("seed", [0, 1])
def test_toposort_orders_producers_first_in_waves(tiny_bundle, seed):
    model = onnx.load(tiny_bundle / "onnx" / "fp32" / "text_encoder.onnx", load_external_data=False)
    nodes = list(model.graph.node)
    np.random.default_rng(seed).shuffle(nodes)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    toposort(model)
    known = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    wave_of, waves = {}, []
    for node in model.graph.node:
        assert all(i in known for i in node.input), node.name  # every input produced before its consumer
        wave = max((wave_of[i] + 1 for i in node.input if i in wave_of), default=0)
        wave_of.update(dict.fromkeys(node.output, wave))
        known.update(node.output)
        waves.append(wave)
    assert waves == sorted(waves)  # by wave; within one, the given order
    assert sorted(n.name for n in model.graph.node) == sorted(n.name for n in nodes)


def test_toposort_refuses_cycles_and_dangling_inputs():
    relu = onnx.helper.make_node
    cycle = onnx.helper.make_graph(
        [relu("Relu", ["b"], ["a"], name="n1"), relu("Relu", ["a"], ["b"], name="n2")], "g", [], []
    )
    dangling = onnx.helper.make_graph([relu("Relu", ["missing"], ["a"], name="lonely")], "g", [], [])
    for graph, name in [(cycle, "n"), (dangling, "lonely")]:
        with pytest.raises(ValueError, match=f"graph has a cycle or a dangling input near node '{name}"):
            toposort(onnx.helper.make_model(graph))


# ---------------------------------------------------------------- the parity gate


def test_build_refuses_a_graph_outside_its_tolerance(tiny_checkout, tmp_path):
    out = tmp_path / "strict"
    options = BuildOptions(
        precision="fp32", networks=("text_encoder",), parity_tolerances={"text_encoder": {"fp32": 1e-12}}
    )
    with pytest.raises(
        BuildError,
        match=r"text_encoder: the fp32 graph differs from the torch fp32 reference by "
        r"\d\.\d+e-\d+ relative L2, over its tolerance 1\.0e-12",
    ):
        build_bundle(tiny_checkout, out, options)
    assert not out.exists() and not list(tmp_path.glob(".strict.partial-*"))


# ---------------------------------------------------------------- the runtime's graph choice


def test_graph_choice_follows_providers_and_precision(tiny_bundle):
    manifest = Manifest.load(tiny_bundle)
    assert graph_precision(manifest, "unet", "fp16", CUDA) == GPU_GRAPH
    assert graph_precision(manifest, "controlnet", "fp16", ["CUDAExecutionProvider"]) == GPU_GRAPH
    assert graph_precision(manifest, "unet", "fp16", CPU) == "fp16"
    assert graph_precision(manifest, "unet", "fp32", CUDA) == "fp32"
    assert graph_precision(manifest, "unet", "fp16", CUDA, gpu_graph=False) == "fp16"
    assert graph_precision(manifest, "text_encoder", "fp16", CUDA) == "fp16"  # no GPU graph for it
    assert graph_precision(manifest, "vae_decoder#0", "fp16", CUDA) == "fp16"  # segments fall back to fp32 later
    assert graph_precision(manifest, "dape", "int8", CPU) == "fp32"


@pytest.mark.slow
def test_bundle_without_gpu_graphs_still_loads_and_runs(tiny_bundle, tmp_path, lr_image):
    """A bundle built before GPU graphs existed (no fp16_gpu entries) loads, and fp16 on any provider
    runs its plain fp16 graphs."""
    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old, ignore=shutil.ignore_patterns(GPU_GRAPH))
    data = json.loads((old / "manifest.json").read_text())
    for entry in data["networks"].values():
        entry["files"].pop(GPU_GRAPH, None)
        entry.get("parity", {}).pop("fused_fp32", None)
    (old / "manifest.json").write_text(json.dumps(data))
    manifest = Manifest.load(old)
    manifest.verify_files()
    assert graph_precision(manifest, "unet", "fp16", CUDA) == "fp16"
    result = SeeSRPipeline.from_bundle(old, precision="fp16")(lr_image, seed=1, steps=1)
    assert result.image.size == (lr_image.size[0] * 4, lr_image.size[1] * 4)


# ---------------------------------------------------------------- IOBinding and device handles


class _FeedRecorder:
    """Wraps a backend and records, per network call, which feeds were device handles."""

    def __init__(self, backend):
        self.inner, self.name, self.calls = backend, backend.name, []

    def _record(self, network, feeds):
        self.calls.append((network, {k for k, v in feeds.items() if isinstance(v, DeviceTensor)}))

    def run(self, network, feeds):
        self._record(network, feeds)
        return self.inner.run(network, feeds)

    def run_on_device(self, network, feeds):
        self._record(network, feeds)
        return self.inner.run_on_device(network, feeds)

    def to_device(self, array):
        return self.inner.to_device(array)


@pytest.mark.parametrize("tile", [96, pytest.param(16, marks=pytest.mark.slow)], ids=["one-window", "latent-tiles"])
def test_io_binding_gives_identical_results(runtime_bundle, lr_image, tile):
    """IOBinding on the CPU provider: the same bytes as plain session.run, and per step only the latent
    (and timestep) come from the host: embeddings and control image are device handles made once per
    image, the ControlNet residuals go to the UNet as handles."""
    manifest = Manifest.load(runtime_bundle)
    options = dict(seed=4, steps=2, process_size=128, latent_tile_size=tile, latent_tile_overlap=4)
    plain = SeeSRPipeline(manifest, OnnxRuntimeBackend(manifest))(lr_image, **options)
    recorder = _FeedRecorder(OnnxRuntimeBackend(manifest, io_binding=True))
    bound = SeeSRPipeline(manifest, recorder)(lr_image, **options)
    assert np.array_equal(np.asarray(plain.image), np.asarray(bound.image))
    assert all(np.array_equal(a, b) for a, b in zip(plain.latents, bound.latents))
    residuals = set(manifest.spec("controlnet").output_names)
    constants = {"encoder_hidden_states", "image_embeds"}
    denoiser_calls = [(n, handles) for n, handles in recorder.calls if n in DENOISERS]
    assert denoiser_calls and len(denoiser_calls) % 2 == 0
    for network, handles in denoiser_calls:
        assert handles == (constants | {"controlnet_cond"} if network == "controlnet" else constants | residuals)
    probe = recorder.inner.to_device(np.ones((2, 3, 16, 16), np.float32))
    assert isinstance(probe, DeviceTensor) and probe.shape == (2, 3, 16, 16)
    assert probe[:, :, :8, :8] is probe[:, :, :8, :8]  # a window is uploaded once, then reused


def test_without_io_binding_the_backend_hands_back_arrays(runtime_bundle):
    backend = OnnxRuntimeBackend(Manifest.load(runtime_bundle))
    array = np.zeros((1, 2), np.float32)
    assert backend.io_binding is False and to_device(backend, array) is array
    feeds = _feeds(backend.manifest.spec("controlnet"), {"B": 1, "h": 8, "w": 8})
    assert all(isinstance(o, np.ndarray) for o in run_on_device(backend, "controlnet", feeds))


# ---------------------------------------------------------------- static shapes


def _feeds(spec, env: dict, seed: int = 0) -> dict:
    """Random float32 inputs of a denoiser call (torch-free, like the runtime tests)."""
    rng = np.random.default_rng(seed)
    feeds = {t.name: rng.standard_normal(t.concrete_shape(env)).astype(np.float32) for t in spec.inputs}
    feeds["timestep"] = np.full(feeds["timestep"].shape, 501.0, np.float32)
    if "conditioning_scale" in feeds:
        feeds["conditioning_scale"] = np.array(1.0, np.float32)
    return feeds


def _rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_static_shape_sessions_match_and_share_weights(runtime_bundle):
    """One session per input shape (here two), both fed from one copy of the weights, each giving the
    dynamic session's answers; the ControlNet residuals feed the UNet without leaving the device."""
    manifest = Manifest.load(runtime_bundle)
    dynamic = OnnxRuntimeBackend(manifest)
    static = OnnxRuntimeBackend(manifest, static_shapes=True)
    for env in ({"B": 2, "h": 8, "w": 8}, {"B": 2, "h": 12, "w": 16}, {"B": 2, "h": 8, "w": 8}):
        feeds = _feeds(manifest.spec("controlnet"), env, seed=env["w"])
        residuals = static.run_on_device("controlnet", feeds)
        assert all(isinstance(r, DeviceTensor) and r.fixed for r in residuals)
        expected = dynamic.run("controlnet", feeds)
        assert max(_rel_l2(r.numpy(), e) for r, e in zip(residuals, expected)) < 1e-5
        unet_feeds = {k: v for k, v in feeds.items() if k in manifest.spec("unet").input_names}
        names = manifest.spec("controlnet").output_names
        eps = static.run("unet", {**unet_feeds, **dict(zip(names, residuals))})[0]
        eps_dynamic = dynamic.run("unet", {**unet_feeds, **dict(zip(names, expected))})[0]
        assert _rel_l2(eps, eps_dynamic) < 1e-5
    assert sorted(static._calls) == sorted(
        (n, (("B", 2), ("h", h), ("w", w))) for n in DENOISERS for h, w in ((8, 8), (12, 16))
    )
    weights = static._weights["unet"]
    assert weights.available and len(weights.values) > 10
    unet_calls = [c for (n, _), c in static._calls.items() if n == "unet"]
    residual = names[0]
    assert all(
        c.inputs[residual].data_ptr() == static._calls[("controlnet", k)].outputs[0].data_ptr()
        for (n, k), c in static._calls.items()
        if n == "unet"
    )
    assert len(unet_calls) == 2


@pytest.mark.parametrize("network", DENOISERS)
def test_static_shapes_fold_the_shape_arithmetic(runtime_bundle, tmp_path, network):
    """With the symbolic dimensions fixed, onnxruntime's optimizer folds every Shape node of the
    traced denoisers (on a GPU these ran on the CPU between kernels and blocked CUDA graph capture)."""
    manifest = Manifest.load(runtime_bundle)
    counts = {}
    for static in (False, True):
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"{network}-{static}.onnx")
        if static:
            fix_dimensions(options, manifest.spec(network), {"B": 2, "h": 8, "w": 8})
        ort.InferenceSession(str(manifest.graph_path(network, "fp32")), options, providers=CPU)
        counts[static] = Counter(n.op_type for n in _load(options.optimized_model_filepath).graph.node)
    assert counts[False]["Shape"] > 0 and counts[True]["Shape"] == 0
    assert sum(counts[True].values()) < sum(counts[False].values())


@pytest.mark.slow
def test_static_shape_pipeline_matches_plain(runtime_bundle, lr_image):
    options = dict(seed=4, steps=2, latent_tile_size=16, latent_tile_overlap=4)
    plain = SeeSRPipeline.from_bundle(runtime_bundle)(lr_image, **options)
    static = SeeSRPipeline.from_bundle(runtime_bundle, static_shapes=True)(lr_image, **options)
    assert _rel_l2(static.latents[-1], plain.latents[-1]) < 1e-4
    difference = np.abs(np.asarray(static.image, np.int16) - np.asarray(plain.image, np.int16))
    assert difference.max() <= 2


# ---------------------------------------------------------------- merged denoiser (an experiment, measured on a GPU)


@pytest.mark.parametrize("external_data", [False, True], ids=["inline", "external-data"])
def test_merged_denoiser_gives_the_two_calls_answer(tiny_bundle, tmp_path, external_data):
    """ControlNet + UNet composed into one graph: one call with the union of their inputs (residuals
    internal) returns the UNet's noise prediction of the two calls, to the bit on the CPU, weights inline or
    in a data file beside the graph."""
    from seesr_export.merged_denoiser import merge_denoiser

    manifest = Manifest.load(tiny_bundle)
    control, unet = manifest.spec("controlnet"), manifest.spec("unet")
    path = merge_denoiser(
        manifest, "fp32", tmp_path / "denoiser.onnx", external_data_threshold=0 if external_data else None
    )
    assert (tmp_path / "denoiser.onnx.data").exists() == external_data
    merged = ort.InferenceSession(str(path), providers=CPU)
    residuals = set(control.output_names)
    expected_inputs = list(dict.fromkeys(n for n in (*control.input_names, *unet.input_names) if n not in residuals))
    assert [i.name for i in merged.get_inputs()] == expected_inputs
    assert [o.name for o in merged.get_outputs()] == unet.output_names
    two_calls = OnnxRuntimeBackend(manifest)
    for env in ({"B": 2, "h": 8, "w": 8}, {"B": 1, "h": 12, "w": 16}):
        feeds = _feeds(control, env, seed=env["w"])
        feeds.update({k: v for k, v in _feeds(unet, env, seed=1).items() if k not in feeds and k not in residuals})
        outs = two_calls.run("controlnet", {n: feeds[n] for n in control.input_names})
        unet_feeds = {n: feeds[n] for n in unet.input_names if n in feeds}
        eps = two_calls.run("unet", {**unet_feeds, **dict(zip(control.output_names, outs))})[0]
        (merged_eps,) = merged.run(None, {n: feeds[n] for n in expected_inputs})
        np.testing.assert_array_equal(merged_eps, eps)


def test_merged_gpu_graph_keeps_every_fused_op(tiny_bundle, tmp_path):
    """The GPU graphs merge as they are: the merged graph passes the full ONNX check and holds both
    graphs' fused ops, node for node."""
    from seesr_export.merged_denoiser import merge_denoiser

    manifest = Manifest.load(tiny_bundle)
    merged = _load(merge_denoiser(manifest, GPU_GRAPH, tmp_path / "denoiser.onnx"))
    parts = [_load(manifest.graph_path(n, GPU_GRAPH)) for n in ("controlnet", "unet")]
    assert fused_op_counts(merged) == dict(sum((Counter(fused_op_counts(p)) for p in parts), Counter()))
    assert len(merged.graph.node) == sum(len(p.graph.node) for p in parts)
    assert len({n.name for n in merged.graph.node}) == len(merged.graph.node)


def test_merge_refuses_residuals_the_graphs_do_not_share(tiny_bundle):
    from seesr_export.merged_denoiser import compose

    manifest = Manifest.load(tiny_bundle)
    control, unet = (_load(manifest.graph_path(n, "fp32")) for n in ("controlnet", "unet"))
    with pytest.raises(ValueError, match="'mid_res_x'"):
        compose(control, unet, [*manifest.spec("controlnet").output_names[:-1], "mid_res_x"])
