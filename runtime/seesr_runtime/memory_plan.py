"""The memory plan of one upscale under a budget: what is resident at each stage, the estimated peak, the tiling.

An upscale runs five stages in turn, each on its own networks:

    tag (DAPE) -> prompt (text encoder) -> encode (VAE encoder) -> denoise (ControlNet + UNet, every step)
    -> decode (VAE decoder)

Without a budget every network stays loaded once it is first used (the fastest). Under a budget the plan is
**staged**: each stage loads its networks when it starts and frees them when it ends, so the peak is the
largest single stage instead of the sum (and the OpenVINO backend maps its weights from prepared files, see
``openvino_backend``); the price is loading every network again for every image. Then, only for a stage that
still exceeds the budget, it turns the levers that change memory but not the image (the tiled VAE's waiting
tiles spilled to files), then those that change it slightly: for the denoiser, int8 weights in its linear
layers where the engine keeps them so (OpenVINO; also faster), then smaller latent tiles; for a VAE half,
smaller tiles (the official algorithms at other tile sizes). A budget below the smallest plan is refused
before any work, with an ``OptionError`` naming the smallest budget that would do.

Estimates come from ``ENGINE_MEMORY``: per engine configuration, the resident bytes a process needs before any
network, the bytes a loaded network keeps per byte of its graph files, what loading needs for a moment (a
graph's embedded weights are read twice; OpenVINO pays it once, when it prepares the IR), and per network the
activation bytes per batch item and pixel. They were measured (``MEASURED``); networks of another size (the
tiny test fixture) are scaled by the square root of their weight bytes (activations grow with channel width,
weights with its square). The estimate aims at the smallest memory-cgroup limit the upscale completes in
(page cache charged): at 512 px on the SD2-size fixture, 3.46 GB planned against 3.38 GB measured. Pure: no
engine, no image; the file sizes come in as numbers (``graph_sizes`` reads them).
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import OptionError
from .imaging import latent_windows, working_size
from .manifest import Manifest
from .options import format_bytes
from .tiled_vae import TiledVaeLayout, split_tiles

# The calibration (measured figures, stage layout, levers) lives in memory_calibration.json, which the native
# runtime embeds too (runtime/cpp/src/memory_plan.cpp): both plan from the same numbers. Where they come from:
# benchmarks/edge_memory.py, results and method in benchmarks/results/cpu/edge_memory.md.
CALIBRATION_FILE = Path(__file__).with_name("memory_calibration.json")
_CALIBRATION: dict[str, Any] = json.loads(CALIBRATION_FILE.read_text(encoding="utf-8"))
MEASURED: str = _CALIBRATION["measured"]

# The fp32 graph bytes (graph and external data) of each network of the bundle the constants were measured on;
# a bundle's networks are scaled against these (``width_scale``).
CALIBRATION_GRAPH_BYTES: dict[str, int] = dict(_CALIBRATION["calibration_graph_bytes"])

GB = 10**9


@dataclass(frozen=True)
class Activation:
    """Working memory of one network call: ``per_pixel`` bytes per batch item and pixel of the call's largest
    resolution (latent pixels for ControlNet and UNet, image pixels for the VAE halves, one "pixel" for DAPE and
    the text encoder, whose inputs have a fixed size), plus ``per_pixel_squared`` bytes per batch item and
    squared latent pixel (attention scores an engine does not fuse)."""

    per_pixel: float
    per_pixel_squared: float = 0.0

    def bytes(self, batch: int, pixels: int, latent_pixels: int, scale: float) -> int:
        return int(batch * (self.per_pixel * pixels * scale + self.per_pixel_squared * latent_pixels**2))


@dataclass(frozen=True)
class TiledSegmentMemory:
    """Working memory of a tiled-VAE segment, per image pixel of a tile's input (``tiled_vae.split_tiles``): a
    grid has up to four tile shapes (edge and interior tiles), each run by a shape of its own. ``running``: the
    shape running a tile, at its peak; ``held``: each of the segment's other shapes, which keep their working
    memory until every tile has passed the segment (OpenVINO; 0 for an engine that frees it after each call)."""

    running: float
    held: float = 0.0

    def bytes(self, shape_pixels: Collection[int], scale: float, staged: bool) -> int:
        """Staged, the pipeline runs a segment's tiles a shape at a time and frees each shape's working memory
        before the next (``tiled_vae.run_tiled_vae``'s ``shape_done``): only the largest counts."""
        largest = max(shape_pixels)
        held = 0 if staged else self.held * (sum(shape_pixels) - largest)
        return int(scale * (self.running * largest + held))


@dataclass(frozen=True)
class EngineMemory:
    """How one engine configuration spends memory (see ``MEASURED``)."""

    base: int  # resident before any network: interpreter, numpy, tokenizer, the engine's libraries
    held_per_graph_byte: float  # resident bytes a loaded network keeps per byte of the graph files it runs
    activations: Mapping[str, Activation]
    mapped: bool  # weights mapped from files (clean page cache the kernel can drop), not counted as held
    shapes_per_segment: int = 1  # compiled shapes a tiled-VAE segment keeps, each with its own weights
    # held_per_graph_byte of ControlNet and UNet with their linear layers' weights in int8 (None: the engine
    # cannot keep them so; ``openvino_backend.compress_linear_weights_int8``)
    int8_linear_held_per_graph_byte: float | None = None
    # What loading a network needs for a moment, per byte of weights embedded in the graph file (read through
    # the protobuf: copied twice) and per byte of external data (mapped), beside what it holds afterwards.
    # OpenVINO pays it only while it prepares a network's IR, once per process or cache (``prepared``).
    load_per_embedded_byte: float = 0.0
    load_per_external_byte: float = 0.0
    # held_per_graph_byte without a budget, where the engine holds its weights otherwise (OpenVINO: an f16 copy
    # in memory beside the plugin's own, instead of mapped files); None: the same
    unbudgeted_held_per_graph_byte: float | None = None
    # the tiled VAE halves' segments (None: as the untiled half, per pixel of the largest tile)
    tiled_segments: Mapping[str, TiledSegmentMemory] | None = None


def _engine_memory(entry: Mapping[str, Any]) -> EngineMemory:
    """One engine of memory_calibration.json (keys starting with "_" are comments)."""
    fields = {key: value for key, value in entry.items() if not key.startswith("_")}
    fields["activations"] = {name: Activation(float(a), float(b)) for name, (a, b) in fields["activations"].items()}
    if "tiled_segments" in fields:  # half -> [running, held]
        fields["tiled_segments"] = {
            half: TiledSegmentMemory(float(a), float(b)) for half, (a, b) in fields["tiled_segments"].items()
        }
    return EngineMemory(**fields)


# Keyed by (backend, the precision of the arithmetic): "bf16" for OpenVINO's bf16 and int8-bf16, "fp32" else.
ENGINE_MEMORY: dict[tuple[str, str], EngineMemory] = {
    (backend, precision): _engine_memory(entry)
    for (backend, _, precision), entry in (
        (key.partition(" "), value) for key, value in _CALIBRATION["engines"].items()
    )
}

STAGES: tuple[str, ...] = tuple(_CALIBRATION["stages"])
STAGE_NETWORKS: dict[str, tuple[str, ...]] = {k: tuple(v) for k, v in _CALIBRATION["stage_networks"].items()}
# The levers that change the image, smallest first: VAE decoder / encoder tiles, latent tiles.
DECODER_TILES: tuple[int, ...] = tuple(_CALIBRATION["decoder_tiles"])
ENCODER_TILES: tuple[int, ...] = tuple(_CALIBRATION["encoder_tiles"])
LATENT_TILES: tuple[int, ...] = tuple(_CALIBRATION["latent_tiles"])
# What the full-resolution VAE layers hold per image pixel and batch item (128 float32 channels in SD2's VAE),
# times two for a tile's waiting hidden state and residual at a GroupNorm (tiled_vae.md).
VAE_STATE_BYTES_PER_PIXEL: int = _CALIBRATION["vae_state_bytes_per_pixel"]


@dataclass(frozen=True)
class StagePlan:
    name: str
    networks: tuple[str, ...]  # loaded for this stage
    weights: int  # bytes the stage's networks keep while loaded
    activations: int  # the stage's working memory: engine activations and the pipeline's arrays
    kept: int  # bytes other networks, kept loaded from earlier stages, hold meanwhile
    peak: int  # base + kept + the larger of weights + activations and the moment of loading
    loading: int = 0  # the most while its networks load (preparing a graph copies embedded weights)
    detail: str = ""  # the shapes: "2 x 64x64 latent", "4 tiles of 150 latent px"


@dataclass(frozen=True)
class MemoryPlan:
    budget: int | None
    engine: str  # "openvino bf16"
    staged: bool  # networks loaded per stage and freed after it
    latent_tile_size: int
    vae_encoder_tile_size: int
    vae_decoder_tile_size: int
    spill: tuple[str, ...]  # the VAE halves whose waiting tiles are kept in files
    int8_linear: tuple[str, ...]  # networks whose linear layers run with int8 weights
    stages: tuple[StagePlan, ...]
    changed: tuple[str, ...] = field(default=())  # options the budget changed, "latent_tile_size 96 -> 64"

    @property
    def peak(self) -> int:
        return max(stage.peak for stage in self.stages)

    def lines(self) -> list[str]:
        """The plan in words (``seesr upscale -v``)."""
        budget = format_bytes(self.budget) if self.budget is not None else "none"
        mode = "staged: each stage loads its networks and frees them after" if self.staged else "all resident"
        head = f"memory plan ({self.engine}, budget {budget}): {mode}; estimated peak {format_bytes(self.peak)}"
        tiles = (
            f"  latent tile {self.latent_tile_size}, VAE tiles encoder {self.vae_encoder_tile_size} / decoder "
            f"{self.vae_decoder_tile_size}"
            + (f"; waiting tiles of {', '.join(self.spill)} spilled to files" if self.spill else "")
        )
        out = [head, tiles]
        if self.int8_linear:
            out.append(f"  linear layers of {', '.join(self.int8_linear)} with int8 weights")
        for stage in self.stages:
            out.append(
                f"  {stage.name:8s} {'+'.join(stage.networks):22s} weights {format_bytes(stage.weights):>8s}, "
                f"working {format_bytes(stage.activations):>8s}, loading {format_bytes(stage.loading):>8s}, "
                f"kept {format_bytes(stage.kept):>8s}: peak "
                f"{format_bytes(stage.peak)}{' (' + stage.detail + ')' if stage.detail else ''}"
            )
        out += [f"  changed by the budget: {change}" for change in self.changed]
        return out

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["peak"] = self.peak
        return data


@dataclass(frozen=True)
class Workload:
    """What one upscale computes, in the sizes memory depends on."""

    width: int  # working image (the VAE's and ControlNet's resolution)
    height: int
    batch: int  # 2 with guidance (the [uncond, cond] pair), else 1
    encode: bool  # start_point "lr": the VAE encoder runs
    tiled_vae: bool
    latent_tile_size: int
    latent_tile_overlap: int
    vae_encoder_tile_size: int
    vae_decoder_tile_size: int

    @classmethod
    def of(cls, lr_width: int, lr_height: int, options: Mapping[str, Any]) -> Workload:
        width, height = working_size(lr_width, lr_height, options["process_size"], options["upscale"])
        return cls(
            width,
            height,
            2 if options["guidance"] > 1.0 else 1,
            options["start_point"] == "lr",
            options["tiled_vae"],
            options["latent_tile_size"],
            options["latent_tile_overlap"],
            options["vae_encoder_tile_size"],
            options["vae_decoder_tile_size"],
        )


def engine_key(backend: str, precision: str) -> tuple[str, str]:
    """The ``ENGINE_MEMORY`` entry of a backend at a precision (OpenVINO's bf16 and int8-bf16 compute in bf16)."""
    return backend, "bf16" if backend == "openvino" and "bf16" in precision else "fp32"


@dataclass(frozen=True)
class GraphSizes:
    """The bytes of one network's graph as the backend runs it."""

    total: int  # the graph file and its external data
    embedded: int  # the graph file alone: weights embedded in the protobuf (none where they are external)


def graph_sizes(manifest: Manifest, precision_of: Mapping[str, str]) -> dict[str, GraphSizes]:
    """The graph sizes of each network (``precision_of``: network -> which of its graphs), from the sizes of
    the files the manifest pins for it."""
    sizes = {}
    for network, precision in precision_of.items():
        files = manifest.entry(network)["files"]
        chosen = files.get(precision) or files["fp32"]
        total = sum(manifest.file(rel).stat().st_size for rel in chosen["sha256"])
        sizes[network] = GraphSizes(total, manifest.file(chosen["onnx"]).stat().st_size)
    return sizes


def width_scale(network: str, weight_bytes: int) -> float:
    """Activations of a network of ``weight_bytes`` against the calibration's: channel width goes with the
    square root of the weights."""
    return math.sqrt(weight_bytes / CALIBRATION_GRAPH_BYTES[network])


def plan_memory(
    workload: Workload,
    weights: Mapping[str, int],
    engine: EngineMemory,
    engine_name: str,
    budget: int | None,
    segment_weights: Mapping[str, int] | None = None,
    embedded: Mapping[str, int] | None = None,
    prepared: Collection[str] = (),
) -> MemoryPlan:
    """The plan for ``workload`` under ``budget`` (None: everything resident as without a budget, the plan only
    describes it).
    ``weights``: the graph bytes of each network (``graph_sizes``); ``segment_weights``: the largest tiled-VAE
    segment of each VAE half; ``embedded``: the bytes of each network's weights embedded in its graph file
    (default none: all external); ``prepared``: networks that load without the moment of preparing (OpenVINO's
    prepared IR exists). OptionError where no plan fits, naming the smallest budget that would."""
    sizes = _Sizes(weights, segment_weights or {}, engine, embedded or {}, frozenset(prepared))
    names = [s for s in STAGES if s != "encode" or workload.encode]
    resident, kept = [], 0
    for name in names:
        resident.append(_stage(name, workload, sizes, staged=False, spill=False, kept=kept))
        kept += resident[-1].weights
    if budget is None:
        return MemoryPlan(budget, engine_name, False, *_tiles(workload), (), (), stages=tuple(resident))
    # Staged: each stage on its own, with its own levers, the first choice that fits.
    chosen: list[tuple[StagePlan, Workload, bool, bool]] = []
    for name in names:
        options = [
            (_stage(name, candidate, sizes, staged=True, spill=spill, kept=0, int8=int8), candidate, spill, int8)
            for candidate, spill, int8 in _levers(name, workload, engine)
        ]
        fitting = [option for option in options if option[0].peak <= budget]
        chosen.append(fitting[0] if fitting else min(options, key=lambda option: option[0].peak))
    over = [option[0] for option in chosen if option[0].peak > budget]
    if over:
        smallest = max(option[0].peak for option in chosen)
        worst = max(over, key=lambda stage: stage.peak)
        loading = worst.loading > worst.weights + worst.activations
        hint = (
            "; loading reads the weights embedded in its graph files twice: a bundle built with external data "
            "(this version of seesr-export build), or OpenVINO's IR prepared once in --cache-dir, avoids it"
            if loading
            else ""
        )
        raise OptionError(
            f"memory_budget {format_bytes(budget)} is below the smallest plan for this bundle on {engine_name} "
            f"at {workload.width}x{workload.height} px: it needs at least {_round_up(smallest)} (its largest "
            f"stage, {worst.name}: {'+'.join(worst.networks)} ({worst.detail or 'as asked'}), weights "
            f"{format_bytes(worst.weights)}, working {format_bytes(worst.activations)}, loading "
            f"{format_bytes(worst.loading)}, plus {format_bytes(engine.base)} for the process{hint}); raise the "
            "budget, or upscale a smaller image",
            "memory_budget",
        )
    final = workload
    for name, (_, candidate, _, _) in zip(names, chosen):
        final = _with_stage_tiles(final, name, candidate)
    spilled = tuple(STAGE_NETWORKS[name][0] for name, (_, _, spill, _) in zip(names, chosen) if spill)
    int8 = tuple(n for name, option in zip(names, chosen) if option[3] for n in STAGE_NETWORKS[name])
    changes = _changes(workload, final) + ((f"int8 weights in the linear layers of {', '.join(int8)}",) if int8 else ())
    return MemoryPlan(
        budget,
        engine_name,
        True,
        *_tiles(final),
        spilled,
        int8,
        stages=tuple(option[0] for option in chosen),
        changed=changes,
    )


@dataclass(frozen=True)
class _Sizes:
    weights: Mapping[str, int]
    segment_weights: Mapping[str, int]
    engine: EngineMemory
    embedded: Mapping[str, int]
    prepared: frozenset[str]

    def loading(self, network: str) -> int:
        """What loading ``network`` needs for a moment (0 once prepared)."""
        if network in self.prepared:
            return 0
        embedded = self.embedded.get(network, 0)
        external = self.weights[network] - embedded
        return int(self.engine.load_per_embedded_byte * embedded + self.engine.load_per_external_byte * external)


def _tiles(w: Workload) -> tuple[int, int, int]:
    return w.latent_tile_size, w.vae_encoder_tile_size, w.vae_decoder_tile_size


def _round_up(size: int) -> str:
    """A budget to give, rounded up to 10 MB: "3.81GB"."""
    return f"{math.ceil(size / (GB / 100)) / 100:.2f}GB"


def _levers(stage: str, w: Workload, engine: EngineMemory) -> list[tuple[Workload, bool, bool]]:
    """A stage's choices (workload, spill, int8 linear weights) in the order they are tried: as asked; for a
    VAE half, its waiting tiles spilled to files (same image), then smaller tiles (another image); for the
    denoiser, int8 weights in its linear layers (where the engine keeps them so; a small change of the image,
    and faster), then smaller latent tiles."""
    if stage == "denoise":
        smaller = [t for t in LATENT_TILES if w.latent_tile_overlap < t < w.latent_tile_size]
        int8 = engine.int8_linear_held_per_graph_byte is not None
        return [(w, False, False)] + [
            (replace(w, latent_tile_size=t), False, int8) for t in [w.latent_tile_size, *smaller]
        ]
    if stage == "encode":
        smaller = [t for t in ENCODER_TILES if t < w.vae_encoder_tile_size]
        return [(w, False, False), (w, True, False)] + [
            (replace(w, vae_encoder_tile_size=t), True, False) for t in smaller
        ]
    if stage == "decode":
        smaller = [t for t in DECODER_TILES if t < w.vae_decoder_tile_size]
        return [(w, False, False), (w, True, False)] + [
            (replace(w, vae_decoder_tile_size=t), True, False) for t in smaller
        ]
    return [(w, False, False)]


def _with_stage_tiles(final: Workload, stage: str, chosen: Workload) -> Workload:
    field_of = {"denoise": "latent_tile_size", "encode": "vae_encoder_tile_size", "decode": "vae_decoder_tile_size"}
    if stage not in field_of:
        return final
    return replace(final, **{field_of[stage]: getattr(chosen, field_of[stage])})


def _changes(before: Workload, after: Workload) -> tuple[str, ...]:
    names = ("latent_tile_size", "vae_encoder_tile_size", "vae_decoder_tile_size")
    return tuple(
        f"{name} {getattr(before, name)} -> {getattr(after, name)}"
        for name in names
        if getattr(before, name) != getattr(after, name)
    )


def _stage(
    name: str, w: Workload, sizes: _Sizes, staged: bool, spill: bool, kept: int, int8: bool = False
) -> StagePlan:
    engine, weights = sizes.engine, sizes.weights
    networks = STAGE_NETWORKS[name]
    pixels = w.width * w.height
    image_arrays = 4 * 3 * pixels * (w.batch + 2)  # the control image (batched), the working image, an output
    per_byte = engine.int8_linear_held_per_graph_byte if int8 else None
    if not staged:
        per_byte = engine.unbudgeted_held_per_graph_byte
    each = [int(weights[n] * (per_byte or engine.held_per_graph_byte)) for n in networks]
    held = sum(each)
    # networks load in turn: the earlier ones held while the next one loads
    loading = max(sum(each[:i]) + max(each[i], sizes.loading(n)) for i, n in enumerate(networks))
    detail = ""
    if name in ("tag", "prompt"):
        activations = engine.activations[networks[0]].bytes(1, 1, 0, width_scale(networks[0], weights[networks[0]]))
    elif name == "denoise":
        h, w_, count = latent_windows(w.height // 8, w.width // 8, w.latent_tile_size, w.latent_tile_overlap)
        activations = image_arrays + sum(
            engine.activations[n].bytes(w.batch, h * w_, h * w_, width_scale(n, weights[n])) for n in networks
        )
        detail = f"batch {w.batch}, " + (f"{count} tiles of {h}x{w_} latent" if count > 1 else f"{h}x{w_} latent")
        detail += ", int8 linear weights" if int8 else ""
    else:
        half = STAGE_NETWORKS[name][0]
        held, activations, detail = _vae_stage(half, w, sizes, held, staged, spill)
        activations += image_arrays
    peak = engine.base + kept + max(held + activations, loading)
    return StagePlan(name, networks, held, activations, kept, peak, loading=loading, detail=detail)


def _vae_stage(half: str, w: Workload, sizes: _Sizes, held: int, staged: bool, spill: bool) -> tuple[int, int, str]:
    """(held weights, working memory, detail) of a VAE half on the working image, tiled as the pipeline would.
    Staged, each tiled-VAE segment is freed when all tiles have passed it: one segment is loaded at a time."""
    engine = sizes.engine
    layout = TiledVaeLayout.for_half(half.removeprefix("vae_"))
    latent_h, latent_w = w.height // 8, w.width // 8
    in_h, in_w = (w.height, w.width) if half == "vae_encoder" else (latent_h, latent_w)
    tile = w.vae_encoder_tile_size if half == "vae_encoder" else w.vae_decoder_tile_size
    activation, scale = engine.activations[half], width_scale(half, sizes.weights[half])
    if not w.tiled_vae or not layout.needs_tiling(in_h, in_w, tile):
        return held, activation.bytes(1, w.width * w.height, latent_h * latent_w, scale), "untiled"
    inputs, _ = split_tiles(in_h, in_w, tile, layout)
    per_pixel = 1 if half == "vae_encoder" else 64  # image pixels per pixel of the half's input
    shape_pixels = [w_ * h * per_pixel for w_, h in {(x1 - x0, y1 - y0) for x0, x1, y0, y1 in inputs}]
    tile_pixels = max(shape_pixels)  # image pixels of the largest tile
    if engine.tiled_segments is not None:
        working = engine.tiled_segments[half].bytes(shape_pixels, scale, staged)
    else:
        working = activation.bytes(1, tile_pixels, tile_pixels // 64, scale)
    states = 0 if spill else int(VAE_STATE_BYTES_PER_PIXEL * w.width * w.height * scale)
    segment = sizes.segment_weights.get(half, sizes.weights[half]) if staged else sizes.weights[half]
    held = int(engine.shapes_per_segment * segment * engine.held_per_graph_byte)
    detail = f"{len(inputs)} tiles of up to {tile_pixels} px in {len(shape_pixels)} shapes" + (
        ", waiting tiles spilled" if spill else ""
    )
    return held, working + states, detail
