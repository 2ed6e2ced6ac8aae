"""OpenVINO backend: the bundle's ONNX graphs through Intel's OpenVINO runtime (CPU, Intel GPU, AUTO).

Why a second CPU backend: OpenVINO runs the matrix work of a graph in bf16 on CPUs that have bf16
units (AVX512_BF16, AMX) and in int8 from our Q/DQ graphs, where onnxruntime's CPU provider stays in
fp32 (see benchmarks/results/cpu/README.md for what that buys).

How it runs a network: the ONNX graph is read with ``openvino.Core().read_model`` (external data
included), reshaped to the static shapes of the call, and compiled; one compiled model is kept per
(network, input shapes), with a pool of inference requests, so one backend serves several threads at
once (``compiled_models``: each call takes a request of its own; a new shape compiles outside any lock
that other calls wait on). Under bf16 the precision policy (below) first moves the UNet's and
ControlNet's timestep path into a second model compiled in f32, and may mark other operations f32; the
weights are then stored as f16 (``compress_weights_to_f16``), since the CPU plugin keeps them beside its
own repacked copy.
With ``cache_dir`` the prepared models are also written there as OpenVINO IR and compiled through
OpenVINO's own model cache (``CACHE_DIR``), so a second start reads compiled blobs instead of the ONNX
graphs (and maps the weights from the IR files rather than holding a copy in memory).
With ``map_weights`` (what a memory budget asks for) the prepared IR is always written, to ``cache_dir`` or a
temporary folder, and compiled with its weights mapped from the file: the source weights are then clean page
cache that the kernel can drop under memory pressure, and only the plugin's own repacked copy is anonymous
memory. ``release(network)`` frees a network's compiled models (a staged memory plan's stage end);
``resident()`` counts them. ``compress_linear(networks)``: from then on those networks are compiled with
their linear layers' weights in int8 (``compress_linear_weights_int8``), which the CPU plugin keeps in int8:
a memory plan's lever for the denoisers, at a small cost in accuracy.

``openvino`` is imported when a backend is created, never at module import (a lazy module): the rest
of the runtime does not need it (the ``openvino`` extra).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .compiled_models import NetworkModels, RequestPool
from .errors import BackendError, BundleError, MissingDependency
from .heap import return_freed_memory
from .lazy import imported, install_hint, lazy_import
from .manifest import Manifest
from .networks import graph_for_precision, part_of
from .tensors import Array, Feeds

log = logging.getLogger(__name__)

openvino = lazy_import("openvino", extra="openvino")
openvino_opset = lazy_import("openvino.opset13", extra="openvino")
openvino_passes = lazy_import("openvino.passes", extra="openvino")
# A private module: compress_weights_to_f16 does without it where a release lacks it.
openvino_offline = lazy_import("openvino._offline_transformations", extra="openvino")

# precision -> (which graphs of the bundle, OpenVINO's INFERENCE_PRECISION_HINT, capability it needs)
PRECISIONS = {
    "fp32": ("fp32", "f32", None),
    "bf16": ("fp32", "bf16", "BF16"),
    "fp16": ("fp32", "f16", "FP16"),  # Intel GPUs (their default); CPUs only with AMX-FP16
    "int8": ("int8", "f32", "INT8"),  # Q/DQ UNet and ControlNet; fp32 graphs for the other networks
    "int8-bf16": ("int8", "bf16", "BF16"),  # the same, with bf16 for what the Q/DQ graphs leave in float
}
DEVICES_WITHOUT_CAPABILITIES = ("AUTO", "MULTI", "HETERO", "BATCH")  # virtual devices: OpenVINO picks

# Precision policy under a bf16 (or f16) inference precision: which operations of each network stay in
# f32. "timestep" is ``split_timestep_path``; the other groups are marks, defined in ``_select_nodes``.
# Chosen from measurements at SD2 size on random weights (benchmarks/openvino_precision.py, results and
# the reasoning in benchmarks/results/cpu/openvino_precision.md and docs/openvino.md).
KEEP_F32_GROUPS = ("softmax", "norm", "timestep", "attention", "add", "all_but_matmul")
DEFAULT_KEEP_F32 = {
    "unet": ("timestep",),
    "controlnet": ("timestep",),
}

# Compiled models kept per network, one per input shape; each holds its own copy of the weights. The
# denoisers keep one: every latent tile of an image has the same shape, and a second SD2 UNet shape costs
# 4.5 GB (at 1024 px after 512 px it ran a 24 GB machine out of memory). A tiled-VAE segment ("vae_decoder#3")
# keeps four: a grid uneven in both directions has four tile shapes (interior, last column, last row,
# corner), and tiles cannot be padded to one shape without changing the result (each convolution after the
# first would see the padding's own activations where the image border's zeros belong); their weights are
# small. The others keep two.
SHAPES_KEPT = {"unet": 1, "controlnet": 1}
SHAPES_KEPT_SEGMENTS = 4
SHAPES_KEPT_OTHERS = 2
_IR_LAYOUT = 3  # bump when _prepare changes what it writes: older cache entries are then ignored
TIMESTEP_PATH_PREFIX = "seesr_timestep_path_"

Shapes = dict[str, tuple[int, ...]]  # input name -> shape of one call
ShapesKey = tuple[tuple[str, tuple[int, ...]], ...]


def shapes_kept(network: str) -> int:
    """How many compiled shapes of ``network`` stay (see SHAPES_KEPT)."""
    return SHAPES_KEPT_SEGMENTS if "#" in network else SHAPES_KEPT.get(network, SHAPES_KEPT_OTHERS)


class _Compiled:
    """One network at one set of shapes: the main compiled model and, when the timestep path runs apart
    in f32, that model too (its outputs are inputs of the main one); with a pool of request pairs."""

    def __init__(self, main: Any, timestep_path: Any = None):  # OpenVINO CompiledModels
        self.main, self.timestep_path = main, timestep_path
        self.requests: RequestPool[tuple[Any, Any]] = RequestPool(self._new_requests)

    def _new_requests(self) -> tuple[Any, Any]:
        timestep = self.timestep_path.create_infer_request() if self.timestep_path is not None else None
        return self.main.create_infer_request(), timestep

    def release_memory(self) -> None:
        """Free what this shape holds between calls, keeping it compiled: OpenVINO's intermediate memory
        and the idle requests with their input and output tensors (the next call allocates them again).
        Only while no request of this shape runs (OpenVINO refuses otherwise)."""
        self.requests.clear()
        for model in (self.main, self.timestep_path):
            if model is not None:
                model.release_memory()

    def infer(self, tensors: dict[str, Any], outputs: Sequence[str]) -> list[Array]:
        """The named outputs of one call, copied: the request goes back to the pool, whose next call
        reuses its output memory."""
        with self.requests.request() as (request, timestep_request):
            if timestep_request is not None:
                timestep_request.infer({"timestep": tensors.pop("timestep")})
                for output in self.timestep_path.outputs:
                    tensors[output.get_any_name()] = timestep_request.get_tensor(output)
            request.infer(tensors)
            return [np.array(request.get_tensor(name).data, copy=True) for name in outputs]


class OpenVINOBackend:
    """OpenVINO compiled models over the bundle's ONNX graphs (``backend.run(network, feeds)``).

    ``precision``: one of ``PRECISIONS``. ``device``: ``"CPU"``, ``"GPU"`` (Intel graphics), ``"AUTO"``
    or any OpenVINO device name. ``threads``: ``INFERENCE_NUM_THREADS`` (default: OpenVINO's choice).
    ``cache_dir``: prepared IR and OpenVINO's compiled-model cache (second start is fast).
    ``keep_f32``: network -> groups of ``KEEP_F32_GROUPS`` kept in f32 under bf16/f16; default
    ``DEFAULT_KEEP_F32``; ``{}`` keeps nothing.
    ``on_unsupported``: a precision the device cannot run (e.g. bf16 without BF16 in its
    OPTIMIZATION_CAPABILITIES): ``"fallback"`` (default) runs f32 and warns, ``"error"`` raises.
    ``map_weights``: compile from prepared IR whose weights OpenVINO maps from the file (see the module's doc).
    """

    name = "openvino"

    def __init__(
        self,
        manifest: Manifest,
        precision: str = "fp32",
        device: str = "CPU",
        threads: int | None = None,
        cache_dir: str | Path | None = None,
        keep_f32: Mapping[str, Sequence[str]] | None = None,
        on_unsupported: str = "fallback",
        map_weights: bool = False,
    ):
        ov = import_openvino()
        if precision not in PRECISIONS:
            raise BundleError(f"openvino precision {precision!r} is not one of {sorted(PRECISIONS)}")
        if on_unsupported not in ("fallback", "error"):
            raise BundleError(f"on_unsupported must be 'fallback' or 'error', got {on_unsupported!r}")
        if threads is not None and threads < 1:
            raise BundleError(f"threads must be a positive number of threads, got {threads}")
        self.manifest, self.device, self.requested_precision = manifest, device, precision
        self.core = ov.Core()
        _check_device(device, self.core.available_devices)
        self.graphs, self.inference_precision = self._resolve_precision(precision, on_unsupported)
        if self.graphs == "int8" and not any("int8" in e["files"] for e in manifest.data["networks"].values()):
            raise BundleError(
                f"{manifest.root}: no int8 graphs in this bundle for precision {precision!r} "
                "(build it with --precision int8)"
            )
        self.keep_f32 = _check_keep_f32(DEFAULT_KEEP_F32 if keep_f32 is None else keep_f32)
        self.config: dict[str, str | int] = {
            "INFERENCE_PRECISION_HINT": self.inference_precision,
            "PERFORMANCE_HINT": "LATENCY",
        }
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            (self.cache_dir / "blobs").mkdir(parents=True, exist_ok=True)
            self.core.set_property({"CACHE_DIR": str(self.cache_dir / "blobs")})
        # bf16/f16 arithmetic rounds the weights anyway; holding them in f16 halves what the CPU plugin
        # keeps of the original model beside its own repacked copy (it holds both; measured at SD2 size:
        # ControlNet 3.4 -> 2.0 GB resident). Not for int8 graphs: their scales stay as exported.
        self.compress_weights = self.inference_precision in ("bf16", "f16") and self.graphs == "fp32"
        if self.compress_weights:  # read weights into memory: a mapped f32 file would stay mapped beside them
            self.core.set_property({"ENABLE_MMAP": False})
        self.map_weights = map_weights
        self.int8_linear: frozenset[str] = frozenset()  # networks compiled with int8 linear weights
        self.ir_dir = self.cache_dir
        if map_weights and self.ir_dir is None:  # prepared IR for this backend's life only
            self.ir_dir = Path(tempfile.mkdtemp(prefix="seesr-ov-ir-"))
            weakref.finalize(self, shutil.rmtree, self.ir_dir, ignore_errors=True)
        self._networks: dict[str, NetworkModels[_Compiled]] = {}
        self._outputs = {n: manifest.spec(n).output_names for n in manifest.data["networks"]}
        self._lock = threading.Lock()  # guards the two dicts above; never held while compiling

    # ------------------------------------------------------------ precision

    def _resolve_precision(self, precision: str, on_unsupported: str) -> tuple[str, str]:
        graphs, hint, needs = PRECISIONS[precision]
        if needs is None or self.device.split(":")[0] in DEVICES_WITHOUT_CAPABILITIES:
            return graphs, hint
        have = device_capabilities(self.core, self.device)
        if needs in have:
            return graphs, hint
        message = (
            f"OpenVINO device {self.device} cannot run precision {precision!r}: its "
            f"OPTIMIZATION_CAPABILITIES {sorted(have)} lack {needs!r}"
        )
        if on_unsupported == "error":
            raise BundleError(message)
        if needs == "INT8":  # int8 graphs run anyway (OpenVINO decomposes Q/DQ in f32), just slowly
            warnings.warn(f"{message}; the int8 graphs will run in f32 arithmetic", RuntimeWarning, stacklevel=3)
            return graphs, "f32"
        warnings.warn(f"{message}; running f32 instead", RuntimeWarning, stacklevel=3)
        return graphs, "f32"

    def graph_precision(self, network: str) -> str:
        """Which of the bundle's graphs this network runs: int8 bundles quantize only UNet and ControlNet."""
        return graph_for_precision(self.manifest.entry(network)["files"], self.graphs)

    def kept_f32(self, network: str) -> tuple[str, ...]:
        return tuple(self.keep_f32.get(network, ())) if self.inference_precision in ("bf16", "f16") else ()

    # ------------------------------------------------------------ compiled models

    def network(self, network: str) -> NetworkModels[_Compiled]:
        """The compiled shapes of ``network`` (or of a tiled-VAE segment, "vae_decoder#3"): count them,
        or ``release()`` them."""
        with self._lock:
            models = self._networks.get(network)
        if models is not None:
            return models
        outputs = self._outputs.get(network) or self.manifest.spec(network).output_names  # BundleError if unknown
        with self._lock:
            self._outputs[network] = outputs
            return self._networks.setdefault(network, NetworkModels(network, shapes_kept(network)))

    @property
    def compiles(self) -> int:
        """Shapes compiled so far, every network together (a shape compiled again after being dropped
        counts again): what ``seesr upscale -v`` and ``seesr bench`` report per image."""
        with self._lock:
            networks = list(self._networks.values())
        return sum(n.compiles for n in networks)

    def release_working_memory(self, network: str) -> None:
        """Free the intermediate memory of ``network``'s compiled shapes that no call is running, keeping
        them compiled. For the networks that run once per image (the VAE halves, each tiled-VAE segment once
        its tiles are done): their activations, several GB at SD2 size, would otherwise stay allocated
        through the rest of the image and the next one."""
        self.network(network).release_working_memory(_Compiled.release_memory)

    def release(self, network: str) -> None:
        """Free the compiled models of ``network`` and of its tiled-VAE segments ("vae_decoder#0", ...) that no
        call is using, and give the memory back to the system."""
        with self._lock:
            held = [models for name, models in self._networks.items() if part_of(name, network)]
        for models in held:
            models.release()
        return_freed_memory()

    def compress_linear(self, networks: Iterable[str]) -> None:
        """Compile ``networks`` with int8 linear weights from now on, the others without (fp32 graphs only;
        Q/DQ graphs keep their own quantization). Compiled models made the other way are not reused."""
        self.int8_linear = frozenset(networks) if self.graphs == "fp32" else frozenset()

    def prepared(self) -> set[str]:
        """Networks with a prepared IR in this backend's IR folder for their graph precision (at some shape and
        setting: an approximation of whether loading them again skips reading the ONNX graph)."""
        folder = self.ir_dir / "ir" if self.ir_dir is not None else None
        if folder is None or not folder.is_dir():
            return set()
        found = set()
        for xml in folder.glob("*.xml"):
            network, _, rest = xml.name.partition(".")
            if ".timestep." not in xml.name and rest.startswith(self.graph_precision(network) + "."):
                found.add(network)
        return found

    def resident(self) -> dict[str, int]:
        """Compiled models alive now, per network or segment (only those with at least one)."""
        with self._lock:
            networks = dict(self._networks)
        return {name: len(models) for name, models in networks.items() if len(models)}

    def compiled(self, network: str, shapes: Shapes) -> _Compiled:
        """The compiled model(s) of ``network`` for these input shapes (compiled on first use)."""
        with self.network(network).use(self._key(network, shapes), lambda: self._compile(network, shapes)) as compiled:
            return compiled

    def _key(self, network: str, shapes: Shapes) -> tuple[ShapesKey, bool]:
        """What a compiled model is kept under: its input shapes, and whether its linear weights are int8."""
        return _shapes_key(shapes), network in self.int8_linear

    def _compile(self, network: str, shapes: Shapes) -> _Compiled:
        """Prepare and compile ``network`` for ``shapes``; OpenVINO's failures as a BackendError."""
        keep = self.kept_f32(network)
        log.debug(f"openvino: compiling {network} for {dict(shapes)} on {self.device} ({self.inference_precision})")
        try:
            paths = self._prepared_ir(self.ir_dir, network, shapes, keep) if self.ir_dir is not None else None
            if paths is not None:  # compiled from files: OpenVINO's model cache can skip the compilation
                return self._compile_pair(paths)
            models = self._prepare(network, shapes, keep)
            if not _has_marks(keep):
                return self._compile_pair(models)
            # the f32 marks reach the CPU plugin only through IR (see _mark_f32)
            with tempfile.TemporaryDirectory(prefix="seesr-ov-") as tmp:
                return self._compile_pair(self._save(models, Path(tmp) / f"{network}.xml"))
        except RuntimeError as exc:  # OpenVINO's exceptions (ov::Exception) derive from RuntimeError
            raise BackendError(
                f"OpenVINO could not compile {network} for input shapes {dict(shapes)} on {self.device}: {exc}"
            ) from exc

    def _compile_pair(self, models: tuple[Any, Any]) -> _Compiled:
        main, timestep_path = (str(m) if isinstance(m, Path) else m for m in models)
        # mapped: the IR's weights stay file pages, not a copy in memory (ENABLE_MMAP per compile, checked:
        # the .bin file is mapped for the compiled model's life)
        config = {**self.config, "ENABLE_MMAP": True} if self.map_weights else self.config
        f32 = {**config, "INFERENCE_PRECISION_HINT": "f32"}
        return _Compiled(
            self.core.compile_model(main, self.device, config),
            None if timestep_path is None else self.core.compile_model(timestep_path, self.device, f32),
        )

    @property
    def _ov(self) -> Any:
        return import_openvino()

    def _prepare(self, network: str, shapes: Shapes, keep: tuple[str, ...]) -> tuple[Any, Any]:
        """(main model, f32 timestep-path model or None), reshaped to ``shapes`` and marked."""
        path = self.manifest.graph_path(network, self.graph_precision(network))
        # mapped: the ONNX external data is read through a mapping, so preparing holds no second copy
        model = self.core.read_model(str(path), config={"ENABLE_MMAP": True} if self.map_weights else None)
        model.reshape({name: list(shape) for name, shape in shapes.items()})
        timestep_path = split_timestep_path(model) if "timestep" in keep else None
        _mark_f32(model, keep)
        if network in self.int8_linear:
            log.debug(f"openvino: {network}: {compress_linear_weights_int8(model)} linear layers' weights in int8")
        if self.compress_weights:
            compress_weights_to_f16(model)
        return model, timestep_path

    def _save(self, models: tuple[Any, Any], xml: Path) -> tuple[Path, Path | None]:
        """Write the prepared models as IR (``xml`` and, for the timestep path, ``*.timestep.xml``);
        the .xml last, each after its .bin: an existing .xml is a complete entry."""
        paths = (xml, xml.with_name(xml.stem + ".timestep.xml") if models[1] is not None else None)
        for model, target in zip(models, paths):
            if model is None or target is None:  # no timestep-path model, so no file for it
                continue
            tmp = target.with_name(f".{target.stem}.{os.getpid()}.{threading.get_ident()}.tmp.xml")
            self._ov.save_model(model, str(tmp), compress_to_fp16=False)
            os.replace(tmp.with_suffix(".bin"), target.with_suffix(".bin"))
            os.replace(tmp, target)
        return paths

    def _prepared_ir(
        self, cache_dir: Path, network: str, shapes: Shapes, keep: tuple[str, ...]
    ) -> tuple[Path, Path | None]:
        """The prepared models as IR under cache_dir/ir, written once: the name pins the graph's sha256, the
        shapes and the kept groups, so a rebuilt bundle or another policy gets new files."""
        precision = self.graph_precision(network)
        files = self.manifest.entry(network)["files"].get(precision) or self.manifest.entry(network)["files"]["fp32"]
        identity = json.dumps(
            {
                "graph": files["sha256"],
                "shapes": sorted(shapes.items()),
                "keep_f32": keep,
                "f16_weights": self.compress_weights,
                "int8_linear": network in self.int8_linear,
                "layout": _IR_LAYOUT,
            },
            sort_keys=True,
            default=list,
        )
        digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
        xml = cache_dir / "ir" / f"{network}.{precision}.{digest}.xml"
        timestep_xml = xml.with_name(xml.stem + ".timestep.xml")
        if xml.exists():
            log.debug(f"openvino: {network}: prepared model found in the cache ({xml.name})")
            return xml, timestep_xml if timestep_xml.exists() else None
        xml.parent.mkdir(parents=True, exist_ok=True)
        paths = self._save(self._prepare(network, shapes, keep), xml)
        # the source graph and its prepared copy are freed now: hand their pages back before compiling, which
        # would otherwise grow the heap around them (measured at SD2 size: 1.8 GB kept through the denoise stage)
        return_freed_memory()
        return paths

    # ------------------------------------------------------------ the Backend interface

    def run(self, network: str, feeds: Feeds) -> list[Array]:
        """Outputs of ``network``; safe to call from several threads at once."""
        models = self.network(network)  # tiled-VAE segments ("vae_decoder#3") are looked up on first use
        shapes = {name: tuple(np.shape(value)) for name, value in feeds.items()}
        tensors = {name: self._tensor(value) for name, value in feeds.items()}
        with models.use(self._key(network, shapes), lambda: self._compile(network, shapes)) as compiled:
            try:
                return compiled.infer(tensors, self._outputs[network])
            except RuntimeError as exc:  # OpenVINO's exceptions (ov::Exception) derive from RuntimeError
                raise BackendError(
                    f"OpenVINO failed to run {network} on input shapes {dict(shapes)} ({self.device}): {exc}"
                ) from exc

    def _tensor(self, value: Array) -> Any:
        # an ov.Tensor shares the array's memory and keeps 0-d inputs (conditioning_scale) 0-d, which a
        # bare numpy scalar passed to infer() does not; it can share only writeable memory, so read-only
        # arrays (spilled tile states, mapped from their files) are copied
        value = np.require(value, requirements="C")
        return self._ov.Tensor(value, shared_memory=bool(value.flags.writeable))

    def load_all(self, shapes: dict[str, Shapes] | None = None) -> None:
        """Compile now rather than at first use (servers, benchmarks): every network at its first
        profile's opt shape (the 512 px workload), or at the given ``{network: {input: shape}}``."""
        for network in self.manifest.data["networks"]:
            given = (shapes or {}).get(network)
            self.compiled(network, given or opt_shapes(self.manifest, network))


# ---------------------------------------------------------------- helpers


def _shapes_key(shapes: Shapes) -> ShapesKey:
    return tuple(sorted(shapes.items()))


def import_openvino() -> Any:
    """The openvino module, imported now; BundleError saying how to install it where it is missing."""
    try:
        return imported(openvino)
    except MissingDependency as exc:
        raise BundleError(
            f"the openvino backend needs the 'openvino' package ({exc.__cause__}); "
            f"install it with: {install_hint('openvino')}"
        ) from None


def device_capabilities(core: Any, device: str) -> set[str]:
    """The device's OPTIMIZATION_CAPABILITIES (e.g. {'FP32', 'BF16', 'INT8'}). Tests replace this function
    to play a CPU without bf16 units."""
    return set(core.get_property(device, "OPTIMIZATION_CAPABILITIES"))


def _check_device(device: str, available: list[str]) -> None:
    kind = device.split(":")[0].split(".")[0]  # "AUTO:GPU,CPU", "GPU.1"
    if kind in DEVICES_WITHOUT_CAPABILITIES or device in available or any(a.split(".")[0] == kind for a in available):
        return
    raise BundleError(f"OpenVINO device {device!r} is not available here (available: {available}, or AUTO)")


def opt_shapes(manifest: Manifest, network: str) -> Shapes:
    spec = manifest.spec(network)
    env = spec.profiles[0].opt if spec.profiles else {"B": 1}
    return {t.name: t.concrete_shape(env) for t in spec.inputs}


def _check_keep_f32(keep_f32: Mapping[str, Sequence[str]]) -> dict[str, tuple[str, ...]]:
    for network, groups in keep_f32.items():
        unknown = set(groups) - set(KEEP_F32_GROUPS)
        if unknown:
            raise BundleError(
                f"keep_f32[{network!r}]: unknown groups {sorted(unknown)} (known: {list(KEEP_F32_GROUPS)})"
            )
    return {network: tuple(groups) for network, groups in keep_f32.items()}


MATRIX_TYPES = {"Convolution", "GroupConvolution", "MatMul", "ConvolutionBackpropData"}
NORM_TYPES = {"MVN", "GroupNormalization", "NormalizeL2", "LayerNorm", "RMS"}


def _select_nodes(model: Any, groups: tuple[str, ...]) -> list[Any]:
    """Operations of ``model`` in the named groups:
    softmax: Softmax; norm: MVN/GroupNormalization (what ONNX GroupNorm/LayerNorm become); attention:
    MatMul of two activations (scores, and probabilities times values); add: every Add (the residual stream
    and biases); all_but_matmul: every
    operation but Convolution and MatMul (PyTorch autocast's split: only matrix products in bf16)."""
    ops = model.get_ordered_ops()
    chosen = []
    for op in ops:
        kind = op.get_type_name()
        if kind in ("Parameter", "Result", "Constant"):
            continue
        if (
            ("softmax" in groups and kind.startswith("Softmax"))
            or ("norm" in groups and kind in NORM_TYPES)
            or ("attention" in groups and kind == "MatMul" and not _has_constant_input(op))
            or ("add" in groups and kind == "Add")
            or ("all_but_matmul" in groups and kind not in MATRIX_TYPES)
        ):
            chosen.append(op)
    return chosen


def _has_constant_input(op: Any) -> bool:
    for value in op.input_values():
        node = value.get_node()
        while node.get_type_name() in ("Convert", "Transpose", "Reshape") and node.get_input_size():
            node = node.input_value(0).get_node()
        if node.get_type_name() == "Constant":
            return True
    return False


def _timestep_only(model: Any, ops: list[Any]) -> set[Any]:
    """Ops computed from the ``timestep`` input and constants alone. Shapes are static by now, so
    ShapeOf and what follows from shapes and constants only counts as constant (the batch expansion of
    the timestep reads the sample's shape)."""
    timestep = [p for p in model.get_parameters() if "timestep" in p.get_output_tensor(0).get_names()]
    if not timestep:
        return set()
    static: set[Any] = set()
    derived = {timestep[0]}
    for op in ops:  # topological order
        kind = op.get_type_name()
        if kind in ("Parameter", "Result"):
            continue
        inputs = [v.get_node() for v in op.input_values()]
        if kind in ("Constant", "ShapeOf") or all(n in static for n in inputs):
            static.add(op)
        elif all(n in static or n in derived for n in inputs):
            derived.add(op)
    derived.discard(timestep[0])
    return derived


def _mark_f32(model: Any, groups: tuple[str, ...]) -> int:
    """Mark the groups' operations to stay in f32 whatever the inference precision.

    The mark is OpenVINO's "precise" runtime attribute (``ov::disable_fp16_compression``, which the
    CPU plugin honours for bf16 too). From Python it can only be set as a string, which OpenVINO turns
    into the real attribute when the model is serialized; so marked models go through IR before
    compiling (measured in 2026.4: a marked MatMul compiled straight from the Python object still runs
    in bf16, the same model through IR runs in f32)."""
    nodes = _select_nodes(model, groups)
    for node in nodes:
        node.get_rt_info()["precise_0"] = ""
    return len(nodes)


def _has_marks(groups: tuple[str, ...]) -> bool:
    return any(group != "timestep" for group in groups)


def compress_weights_to_f16(model: Any) -> None:
    """Store the model's f32 weights as f16 (each followed by a Convert back to f32), in place: what
    ``openvino.save_model(compress_to_fp16=True)`` does, without writing the model out. Operations marked
    f32 and weights outside f16's range stay f32. The transformation lives in a private module; where a
    release lacks it the weights stay f32 (more memory, same results)."""
    try:
        compress_model_transformation = openvino_offline.compress_model_transformation
    except (ImportError, AttributeError):  # pragma: no cover - depends on the OpenVINO release
        log.warning("this OpenVINO release has no compress_model_transformation; weights stay f32")
        return
    compress_model_transformation(model)


def split_timestep_path(model: Any) -> Any:
    """Cut what ``model`` computes from its ``timestep`` input alone (sinusoidal projection, time-embedding
    MLP, each ResNet's time projection) into a model of its own, to run in f32; its outputs become inputs
    ``seesr_timestep_path_<i>`` of ``model`` (changed in place). Returns that model, or None when
    ``model`` has no timestep input.

    Why not marks: most of that path is MatMul + bias, which the CPU plugin turns into FullyConnected
    nodes, and the f32 mark does not survive that rewrite (measured, 2026.4). Under bf16 this path is what
    took the SD2 ControlNet from 1.6e-2 to 1.2e-1 relative L2 (benchmarks/results/cpu/openvino_precision.md):
    its error is the same at every pixel of every ResNet, so it does not average out."""
    ov = import_openvino()

    parameters = [p for p in model.get_parameters() if "timestep" in p.get_output_tensor(0).get_names()]
    if not parameters:
        return None
    folding = openvino_passes.Manager()
    folding.register_pass(openvino_passes.ConstantFolding())  # static shapes: ShapeOf(sample) becomes a constant
    folding.run_passes(model)
    path = _timestep_only(model, model.get_ordered_ops())
    cut = [
        output
        for op in model.get_ordered_ops()
        if op in path
        for output in op.outputs()
        if any(target.get_node() not in path for target in output.get_target_inputs())
    ]
    copy = model.clone()  # the path's own model is built from a copy: the original is rewired below
    copies = {op.get_friendly_name(): op for op in copy.get_ordered_ops()}
    copy_timestep = next(p for p in copy.get_parameters() if "timestep" in p.get_output_tensor(0).get_names())
    inputs, outputs = [], []
    for i, output in enumerate(cut):
        name = f"{TIMESTEP_PATH_PREFIX}{i}"
        parameter = openvino_opset.parameter(output.get_partial_shape(), output.get_element_type(), name=name)
        parameter.output(0).get_tensor().set_names({name})
        for target in list(output.get_target_inputs()):
            if target.get_node() not in path:
                target.replace_source_output(parameter.output(0))
        inputs.append(parameter)
        copied = copies[output.get_node().get_friendly_name()].output(output.get_index())
        copied.get_tensor().set_names({name})
        outputs.append(copied)
    model.add_parameters(inputs)
    model.remove_parameter(parameters[0])
    model.validate_nodes_and_infer_types()
    return ov.Model(outputs, [copy_timestep], "timestep_path")


def compress_linear_weights_int8(model: Any) -> int:
    """Store the constant weights of ``model``'s matrix products (its linear layers: attention projections,
    feed-forward) as int8 with one float32 scale per output channel (symmetric, round to nearest), in place;
    returns how many. The CPU plugin keeps weights of this form (int8, Convert, Multiply by the scale) in int8
    inside its FullyConnected kernels, decompressing them as it computes, where it folds other forms back to
    full precision at compile (measured: benchmarks/results/cpu/edge_memory.md). Convolutions are left alone:
    the plugin decompresses their weights whatever the form."""
    compressed = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul":
            continue
        weights = op.input_value(1).get_node()
        if weights.get_type_name() != "Constant" or weights.get_element_type().get_type_name() != "f32":
            continue
        values = weights.get_data()
        if values.ndim != 2:
            continue
        transposed = bool(op.get_attributes()["transpose_b"])
        axis = 1 if transposed else 0  # the input-channel axis: one scale per output channel
        scale = np.abs(values).max(axis=axis, keepdims=True).astype(np.float32) / np.float32(127.0)
        scale[scale == 0] = np.float32(1.0)
        quantized = np.clip(np.rint(values / scale), -127, 127).astype(np.int8)
        decompressed = openvino_opset.multiply(
            openvino_opset.convert(openvino_opset.constant(quantized), "f32"), openvino_opset.constant(scale)
        )
        op.input(1).replace_source_output(decompressed.output(0))
        compressed += 1
    return compressed
