"""SeeSR's tiled VAE: padded tiles with GroupNorm statistics shared across tiles, no blending.

Large images go through the VAE in tiles, as the official pipeline does (its ``vaehook``):

1. ``split_tiles``: the input is cut into a grid of tiles whose size is derived from the requested
   one; each tile is read with ``pad`` pixels of context on every side that is not an image border.
2. The network runs on every tile as a chain of **segments** (graphs in the bundle), cut before
   each GroupNorm. Between two segments all tiles wait: each tile's per-group mean and (biased)
   variance are averaged over the tiles, weighted by the tiles' pixel counts
   (``shared_group_stats``), and the next segment normalises every tile with those (eps 1e-6).
   Residuals that span a cut travel with their tile.
3. ``assemble_tiles``: only each tile's core (its share of the grid, out to the image border where
   it touches one) is copied into the output.

The result is close to, not equal to, the untiled VAE (the mid-block attention and every
convolution see one padded tile); it is what the official pipeline produces. Peak memory: the
networks' activations grow with the tile, while the tiles' hidden states waiting at a GroupNorm
(one float32 tensor per tile, plus a residual) grow with the image, unless they are spilled to
files (``spill_dir``), which keeps the resident memory to about one tile's worth.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .tensors import Array, FloatArray

GROUP_NORM_EPS = 1e-6

Box = list[int]  # [x0, x1, y0, y1]
Stats = npt.NDArray[np.float64]


@dataclass(frozen=True)
class TiledVaeLayout:
    """The official tiler's fixed geometry of one VAE half."""

    pad: int  # context read around each tile, in input pixels
    decoder: bool  # decoder: output = 8x input; encoder: output = input // 8

    @classmethod
    def for_half(cls, half: str) -> TiledVaeLayout:
        if half not in LAYOUTS:
            raise ValueError(f"half must be one of {sorted(LAYOUTS)}, got {half!r}")
        return LAYOUTS[half]

    def scale(self, value: int) -> int:
        return value * 8 if self.decoder else value // 8

    def needs_tiling(self, height: int, width: int, tile: int) -> bool:
        """The official rule: tile only when the longer side exceeds tile + 2 * pad."""
        return max(height, width) > tile + 2 * self.pad


LAYOUTS = {"encoder": TiledVaeLayout(pad=32, decoder=False), "decoder": TiledVaeLayout(pad=11, decoder=True)}


def best_tile_size(lower: int, upper: int) -> int:
    """Round ``lower`` up to a multiple of 32, 16, 8, 4 or 2 (the largest that stays <= ``upper``)."""
    divider = 32
    while divider >= 2:
        remainder = lower % divider
        if remainder == 0:
            return lower
        if lower - remainder + divider <= upper:
            return lower - remainder + divider
        divider //= 2
    return lower


def split_tiles(height: int, width: int, tile: int, layout: TiledVaeLayout) -> tuple[list[Box], list[Box]]:
    """Input boxes (with context) and output boxes of every tile, row by row, as [x0, x1, y0, y1].

    The grid has ceil((extent - 2 pad) / tile) tiles per axis (at least one), of equal size
    rounded up by ``best_tile_size``; a tile's output box reaches the image border when its core
    comes within ``pad`` of it. Integer arithmetic as the official tiler (Python floor semantics).
    """
    pad = layout.pad
    rows = max(math.ceil((height - 2 * pad) / tile), 1)
    cols = max(math.ceil((width - 2 * pad) / tile), 1)
    tile_h = best_tile_size(math.ceil((height - 2 * pad) / rows), tile)
    tile_w = best_tile_size(math.ceil((width - 2 * pad) / cols), tile)
    inputs: list[Box] = []
    outputs: list[Box] = []
    for i in range(rows):
        for j in range(cols):
            x0, x1 = pad + j * tile_w, min(pad + (j + 1) * tile_w, width)
            y0, y1 = pad + i * tile_h, min(pad + (i + 1) * tile_h, height)
            core = [
                x0 if x0 > pad else 0,
                x1 if x1 < width - pad else width,
                y0 if y0 > pad else 0,
                y1 if y1 < height - pad else height,
            ]
            outputs.append([layout.scale(v) for v in core])
            inputs.append([max(0, x0 - pad), min(width, x1 + pad), max(0, y0 - pad), min(height, y1 + pad)])
    return inputs, outputs


def tile_stats(x: Array, groups: int) -> tuple[Stats, Stats]:
    """Per-sample, per-group mean and biased variance of one tile, float64 [B, groups] each.

    Accumulated in float64 without a float64 copy of the tile (it can hold gigabytes)."""
    flat = x.reshape(x.shape[0], groups, -1)
    mean = flat.mean(axis=2, dtype=np.float64)
    var = np.empty_like(mean)
    for b in range(flat.shape[0]):
        for g in range(groups):
            deviation = flat[b, g] - np.float32(mean[b, g])
            var[b, g] = np.add.reduce(deviation * deviation, dtype=np.float64) / flat.shape[2]
    return mean, var


def shared_group_stats(per_tile: list[tuple[Stats, Stats]], pixels: list[int]) -> tuple[FloatArray, FloatArray]:
    """Mean and variance averaged over the tiles, weighted by pixel count (float32 [B, groups])."""
    weights = np.asarray(pixels, dtype=np.float64) / float(sum(pixels))
    mean = sum(w * m for w, (m, _) in zip(weights, per_tile))
    var = sum(w * v for w, (_, v) in zip(weights, per_tile))
    return mean.astype(np.float32), var.astype(np.float32)


def assemble_tiles(tiles: list[Array], inputs: list[Box], outputs: list[Box], layout: TiledVaeLayout) -> Array:
    """Copy each tile's core (its output box) into one array; nothing is blended."""
    first = tiles[0]
    height = max(box[3] for box in outputs)
    width = max(box[1] for box in outputs)
    result = np.zeros((first.shape[0], first.shape[1], height, width), dtype=first.dtype)
    for tile, (ix0, _, iy0, _), (ox0, ox1, oy0, oy1) in zip(tiles, inputs, outputs):
        top, left = oy0 - layout.scale(iy0), ox0 - layout.scale(ix0)
        result[:, :, oy0:oy1, ox0:ox1] = tile[:, :, top : top + oy1 - oy0, left : left + ox1 - ox0]
    return result


RunFn = Callable[[str, dict[str, Any]], list[Array]]


class TileStates:
    """The tensors each tile carries from one segment to the next (its hidden state, a residual).

    In memory by default; with ``spill_dir``, each is written to a .npy file there and memory-mapped
    back when its tile runs, so the operating system can page them out: resident memory then stays
    near one tile's activations whatever the image size, at the cost of disk traffic."""

    def __init__(self, spill_dir: str | Path | None = None):
        self._dir = tempfile.mkdtemp(prefix="seesr-tiles-", dir=spill_dir) if spill_dir is not None else None
        self._items: dict[tuple[str, int], Array | str | None] = {}  # an array, or the .npy file holding it
        self._writes = 0

    def put(self, key: tuple[str, int], array: Array | None) -> None:
        previous = self._items.pop(key, None)
        if isinstance(previous, str):
            os.unlink(previous)  # a live memory map of it stays valid until released
        if self._dir is None or array is None:
            self._items[key] = array
            return
        self._writes += 1
        path = os.path.join(self._dir, f"{self._writes}.npy")
        np.save(path, array)
        self._items[key] = path

    def get(self, key: tuple[str, int]) -> Array | None:
        item = self._items.get(key)
        return np.load(item, mmap_mode="r") if isinstance(item, str) else item

    def close(self) -> None:
        self._items.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


def run_tiled_vae(
    run: RunFn,
    network: str,
    tiled: dict[str, Any],
    x: Array,
    tile: int,
    spill_dir: str | Path | None = None,
    segment_done: Callable[[str], None] | None = None,
    shape_done: Callable[[str], None] | None = None,
) -> list[Array]:
    """The tiled VAE half ``network`` (``"vae_encoder"``/``"vae_decoder"``) on ``x`` through ``run``
    (``backend.run``); ``tiled`` is the network's ``tiled`` manifest entry; ``spill_dir``: see
    ``TileStates``; ``segment_done(name)`` once every tile has run segment ``name`` ("vae_decoder#2"), which no
    tile needs again (a backend frees its working memory there, a staged memory plan the segment).
    A segment runs its tiles grouped by shape (a grid has up to four: edge and interior tiles), so that
    ``shape_done(name)``, called after each group, lets a backend free the working memory of that shape
    before the next one allocates its own (a memory plan asks for it; the order changes no result).
    Returns the network's outputs: ``[mean, logvar]`` or ``[image]``."""
    layout = TiledVaeLayout(pad=tiled["pad"], decoder=network == "vae_decoder")
    groups, segments = tiled["groups"], tiled["segments"]
    inputs, outputs = split_tiles(x.shape[2], x.shape[3], tile, layout)
    by_shape = tiles_by_shape(inputs)
    states = TileStates(spill_dir)
    try:
        for i, (x0, x1, y0, y1) in enumerate(inputs):
            states.put(("hidden", i), np.ascontiguousarray(x[:, :, y0:y1, x0:x1]))
        for k, segment in enumerate(segments[:-1]):
            name = f"{network}#{k}"
            _run_segment(run, name, segment, states, by_shape, groups if k > 0 else None, shape_done=shape_done)
            if segment_done is not None:
                segment_done(name)
        last = f"{network}#{len(segments) - 1}"
        results = _run_segment(run, last, segments[-1], states, by_shape, groups, last=True, shape_done=shape_done)
        if segment_done is not None:
            segment_done(last)
    finally:
        states.close()
    return [assemble_tiles([r[j] for r in results], inputs, outputs, layout) for j in range(len(results[0]))]


def tiles_by_shape(inputs: list[Box]) -> list[list[int]]:
    """The tile indices grouped by the shape of their input box, groups in order of first appearance."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (x0, x1, y0, y1) in enumerate(inputs):
        groups.setdefault((x1 - x0, y1 - y0), []).append(i)
    return list(groups.values())


def _run_segment(
    run: RunFn,
    name: str,
    segment: dict[str, Any],
    states: TileStates,
    by_shape: list[list[int]],
    groups: int | None,
    last: bool = False,
    shape_done: Callable[[str], None] | None = None,
) -> list[list[Array]]:
    """One segment over every tile, a shape at a time (the first segment has no GroupNorm: ``groups``
    None). The last returns every tile's outputs, in tile order; the others leave their outputs in
    ``states`` (and return [])."""
    count = sum(len(group) for group in by_shape)
    feeds: dict[str, Any] = {}
    if groups is not None:  # every tile waits here for the shared statistics
        per_tile: list[tuple[Stats, Stats]] = []
        pixels: list[int] = []
        for i in range(count):  # one tile mapped at a time: spilled states stay out of memory
            hidden = states.get(("hidden", i))
            assert hidden is not None  # every tile's hidden state is put before the next segment runs
            per_tile.append(tile_stats(hidden, groups))
            pixels.append(hidden.shape[2] * hidden.shape[3])
            del hidden
        feeds["group_mean"], feeds["group_var"] = shared_group_stats(per_tile, pixels)
    results: dict[int, list[Array]] = {}
    for tiles in by_shape:
        for i in tiles:
            tile_feeds = {"hidden": states.get(("hidden", i)), **feeds}
            if segment["takes_residual"]:
                tile_feeds["residual"] = states.get(("residual", i))
            out = run(name, tile_feeds)
            del tile_feeds
            if last:
                results[i] = out
                states.put(("hidden", i), None)
            else:
                states.put(("hidden", i), out[0])
                states.put(("residual", i), out[1] if segment["hands_residual"] else None)
        if shape_done is not None:
            shape_done(name)
    return [results[i] for i in sorted(results)]
