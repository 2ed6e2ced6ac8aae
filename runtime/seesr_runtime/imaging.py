"""Image geometry, DAPE preprocessing, latent tiling and colour fix: SeeSR's numpy side.

Each function reproduces one step of the official ``test_seesr.py`` /
``pipeline_seesr.py`` (see the notes in each docstring for the exact rule).

Twins in ``seesr_export.reference`` (torch): ``adain_color_fix``, ``wavelet_color_fix`` (held equal by
``tests/test_runtime_parity.py::test_colour_fixes_match_torch``) and ``resize_bilinear`` against torch's
bilinear interpolation (``test_bilinear_resize_matches_torch``). The geometry (``working_image``,
``tile_origins``, ``gaussian_tile_weights``) has no twin: the reference imports it from here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
from PIL import Image

from .tensors import FloatArray

# ---------------------------------------------------------------- geometry


def working_image(lr: Image.Image, process_size: int, upscale: int) -> Image.Image:
    """The LR image at the size SeeSR denoises: short side raised to process_size/upscale if smaller,
    then x upscale, then resampled (not cropped) to multiples of 8. PIL bicubic throughout."""
    enlarged = _enlarged_size(*lr.size, process_size, upscale)
    if enlarged != lr.size:
        lr = lr.resize(enlarged, Image.Resampling.BICUBIC)
    lr = lr.resize((lr.size[0] * upscale, lr.size[1] * upscale), Image.Resampling.BICUBIC)
    return lr.resize((lr.size[0] // 8 * 8, lr.size[1] // 8 * 8), Image.Resampling.BICUBIC)


def working_size(width: int, height: int, process_size: int, upscale: int) -> tuple[int, int]:
    """The size ``working_image`` gives an LR image of ``width`` x ``height``, without the image."""
    w, h = _enlarged_size(width, height, process_size, upscale)
    return w * upscale // 8 * 8, h * upscale // 8 * 8


def _enlarged_size(w: int, h: int, process_size: int, upscale: int) -> tuple[int, int]:
    short = process_size // upscale
    if w < short or h < short:
        scale = short / min(w, h)
        return int(scale * w), int(scale * h)
    return w, h


def to_chw(image: Image.Image) -> FloatArray:
    """PIL RGB -> float32 [1, 3, H, W] in [0, 1]."""
    pixels: FloatArray = np.asarray(image, dtype=np.float32)  # typed here: PIL images are not numpy-typed
    return (pixels / np.float32(255.0)).transpose(2, 0, 1)[None].copy()


def to_uint8_rounded(image: FloatArray) -> npt.NDArray[np.uint8]:
    """VAE output [1, 3, H, W] in about [-1, 1] -> HxWx3 uint8, rounding as diffusers does."""
    x: FloatArray = np.clip(image[0] / np.float32(2.0) + np.float32(0.5), 0.0, 1.0)
    return np.round(x.transpose(1, 2, 0) * np.float32(255.0)).astype(np.uint8)


# ---------------------------------------------------------------- DAPE input


def resize_bilinear(x: FloatArray, size: tuple[int, int]) -> FloatArray:
    """torch's ``interpolate(mode="bilinear", align_corners=False, antialias=False)`` on [N, C, H, W]."""
    out_h, out_w = size

    def axis(n_in: int, n_out: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], FloatArray]:
        src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
        src = np.maximum(src, 0.0)
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        frac = (src - i0).astype(np.float32)
        return i0, i1, frac

    y0, y1, fy = axis(x.shape[2], out_h)
    x0, x1, fx = axis(x.shape[3], out_w)
    top = x[:, :, y0] * (1 - fy)[:, None] + x[:, :, y1] * fy[:, None]
    return (top[..., x0] * (1 - fx) + top[..., x1] * fx).astype(np.float32)


def dape_input(lr: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> FloatArray:
    """The original LR as a tensor, bilinear-resized to size x size without antialias (SeeSR's
    torchvision 0.15 did not antialias tensors, so large inputs alias as they did), normalised."""
    x = resize_bilinear(to_chw(lr), (size, size))
    mean_ = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std_ = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
    return ((x - mean_) / std_).astype(np.float32)


def select_tags(tag_logits: FloatArray, tags: list[str], thresholds: FloatArray) -> str:
    """Tags whose sigmoid(logit) is strictly above their threshold, in class order, joined with ", "."""
    probs = 1.0 / (1.0 + np.exp(-tag_logits.astype(np.float32)))
    return ", ".join(tag for tag, fired in zip(tags, probs > thresholds) if fired)


# ---------------------------------------------------------------- latent tiling


def needs_latent_tiles(height: int, width: int, tile: int) -> bool:
    """The official rule: the denoiser runs in tiles when the latent has more than tile² pixels."""
    return height * width > tile * tile


def latent_windows(height: int, width: int, tile: int, overlap: int) -> tuple[int, int, int]:
    """(height, width, count) of the windows the denoiser runs on per step: the whole latent, or its tiles."""
    if not needs_latent_tiles(height, width, tile):
        return height, width, 1
    side = min(tile, height, width)
    return side, side, len(tile_origins(height, width, side, overlap))


def tile_origins(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Top-left corners (y, x) of the latent tiles in the official order (x outer, y inner);
    tiles step by tile-overlap and the last row/column is pushed against the far edge."""

    def starts(extent: int) -> list[int]:
        count = 1
        while (count - 1) * (tile - overlap) + tile < extent:
            count += 1
        return [i * (tile - overlap) if i < count - 1 else extent - tile for i in range(count)]

    return [(y, x) for x in starts(width) for y in starts(height)]


def gaussian_tile_weights(tile: int) -> npt.NDArray[np.float64]:
    """float64 [tile, tile] blend weights; the official code centres x at (T-1)/2 but y at T/2."""
    var = 0.01

    def profile(midpoint: float) -> npt.NDArray[np.float64]:
        i = np.arange(tile, dtype=np.float64)
        density: npt.NDArray[np.float64] = np.exp(-((i - midpoint) ** 2) / (tile * tile) / (2 * var)) / np.sqrt(
            2 * np.pi * var
        )
        return density

    weights: npt.NDArray[np.float64] = np.outer(profile(tile / 2), profile((tile - 1) / 2))
    return weights


# ---------------------------------------------------------------- colour fix


def _truncate_to_image(x: FloatArray) -> Image.Image:
    # torchvision's ToPILImage: x*255 then a byte cast, i.e. truncation (not rounding).
    x = np.clip(x[0], 0.0, 1.0).transpose(1, 2, 0) * np.float32(255.0)
    return Image.fromarray(x.astype(np.uint8))


def adain_color_fix(target: Image.Image, source: Image.Image) -> Image.Image:
    """Give target the per-channel mean and (unbiased, +1e-5) std of source."""
    t, s = to_chw(target), to_chw(source)

    def stats(x: FloatArray) -> tuple[FloatArray, FloatArray]:
        flat = x.reshape(3, -1)
        return flat.mean(axis=1).reshape(1, 3, 1, 1), np.sqrt(flat.var(axis=1, ddof=1) + 1e-5).reshape(1, 3, 1, 1)

    t_mean, t_std = stats(t)
    s_mean, s_std = stats(s)
    return _truncate_to_image(((t - t_mean) / t_std * s_std + s_mean).astype(np.float32))


def _wavelet_blur(x: FloatArray, radius: int) -> FloatArray:
    """3x3 [1,2,1]x[1,2,1]/16 kernel, dilation radius, replicate padding."""
    p = np.pad(x, ((0, 0), (0, 0), (radius, radius), (radius, radius)), mode="edge")
    h, w = x.shape[2], x.shape[3]
    out = np.zeros_like(x)
    for dy, wy in ((0, 1.0), (1, 2.0), (2, 1.0)):
        for dx, wx in ((0, 1.0), (1, 2.0), (2, 1.0)):
            out += np.float32(wy * wx / 16.0) * p[:, :, dy * radius : dy * radius + h, dx * radius : dx * radius + w]
    return out


def _wavelet_split(x: FloatArray, levels: int = 5) -> tuple[FloatArray, FloatArray]:
    high = np.zeros_like(x)
    for i in range(levels):
        low = _wavelet_blur(x, 2**i)
        high += x - low
        x = low
    return high, x


def wavelet_color_fix(target: Image.Image, source: Image.Image) -> Image.Image:
    """High frequencies of target plus the low frequency of source (5-level a-trous wavelet)."""
    target_high, _ = _wavelet_split(to_chw(target))
    _, source_low = _wavelet_split(to_chw(source))
    return _truncate_to_image(target_high + source_low)


COLOR_FIXES: dict[str, Callable[[Image.Image, Image.Image], Image.Image]] = {
    "adain": adain_color_fix,
    "wavelet": wavelet_color_fix,
    "none": lambda target, source: target,
}
