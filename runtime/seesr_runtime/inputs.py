"""The LR images a command reads: files and folders of them, each opened defensively.

Shared by ``seesr upscale`` and ``seesr bench``, the Triton client and the build side's demo: whatever
a file's bytes, ``load_lr_image`` (and ``load_lr_image_bytes``, for bytes received over the wire)
returns an RGB image or raises ``ImageRejected`` saying why.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from . import options as option_table
from .errors import ImageRejected

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
DEFAULT_MAX_PIXELS = option_table.default("max_pixels")  # input pixels; the output is 16x that


def load_lr_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, str | None]:
    """Open ``path`` as an RGB PIL image, or raise ImageRejected with a clear reason (whatever the file's
    bytes: ``tests/test_fuzz.py`` holds it to that); OSError only when ``path`` cannot be stat'ed.

    Returns ``(image, note)``: note says what conversion was applied, if any
    (grayscale, alpha dropped as the official script does, 16-bit scaled to 8-bit).
    """
    if path.stat().st_size == 0:
        raise ImageRejected("empty file")
    # Decoded from the bytes, as ``load_lr_image_bytes`` does: given a path, Pillow's TIFF reader hands libtiff
    # the file descriptor, whose errors differ from its in-memory reader's (Pillow 12.3: "buffer is not large
    # enough" against "image file is truncated"), and a file must get the verdict its bytes get.
    return _decode_lr_image(io.BytesIO(path.read_bytes()), max_pixels, "--max-pixels")


def load_lr_image_bytes(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, raise_with: str = "--max-pixels"
) -> tuple[Image.Image, str | None]:
    """``load_lr_image`` for an image file's bytes (a Triton request's): same checks, same conversions;
    ``raise_with`` names the setting that raises the pixel limit."""
    if not data:
        raise ImageRejected("empty file")
    return _decode_lr_image(io.BytesIO(data), max_pixels, raise_with)


def _decode_lr_image(source: Path | BinaryIO, max_pixels: int, raise_with: str) -> tuple[Image.Image, str | None]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as opened:
                if opened.size[0] * opened.size[1] > max_pixels:  # refused before decoding
                    option_table.check_image_size(*opened.size, max_pixels, raise_with=raise_with)
                opened.load()
                image = opened.copy()
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(f"refused as a decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise ImageRejected("not a readable image (corrupt or unknown format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected(f"cannot decode the image ({exc}); truncated or corrupt?") from None
    option_table.check_image_size(*image.size, max_pixels, raise_with=raise_with)
    note = None
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        scale = 257.0 if array.max() > 255 else 1.0
        image = Image.fromarray(np.clip(np.round(array / scale), 0, 255).astype(np.uint8))
        note = "16-bit grayscale scaled to 8-bit RGB"
    elif image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        note = "alpha channel dropped (as the official script does)"
    elif image.mode in ("L", "1"):
        note = "grayscale converted to RGB"
    elif image.mode not in ("RGB", "P"):
        note = f"{image.mode} converted to RGB"
    return image.convert("RGB"), note


def expand_inputs(inputs: list[Path]) -> list[Path]:
    """Files as given; directories expanded to their images (sorted, not recursive)."""
    files = []
    for path in inputs:
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        else:
            files.append(path)
    return files
