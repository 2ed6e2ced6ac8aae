"""Hypothesis strategies and settings for the fuzz campaign (``tests/test_fuzz.py``).

Two profiles, chosen by $SEESR_FUZZ: ``ci`` (default; the whole campaign well under 2 minutes on a
2-core machine) and ``long`` (``make fuzz``). No example database: a run is reproduced with
``--hypothesis-seed`` (or the ``@reproduce_failure`` line Hypothesis prints on a failure).
"""

from __future__ import annotations

import io
import json
import os
from datetime import timedelta

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from image_bytes import png_header
from PIL import Image

# deadline: one example taking longer fails (a slow path or a decoded bomb); generous, as the build
# machine is shared. A true hang is left to CI's job timeout.
PROFILES = {
    "ci": dict(max_examples=150, deadline=timedelta(seconds=10)),
    "long": dict(max_examples=2000, deadline=timedelta(seconds=10)),
}


def fuzz_settings(scale: float = 1.0) -> settings:
    """The settings of one fuzz target under $SEESR_FUZZ's profile; ``scale`` sizes the target against the
    profile's examples (more for cheap targets, fewer for slow ones)."""
    name = os.environ.get("SEESR_FUZZ", "ci")
    if name not in PROFILES:
        raise ValueError(f"SEESR_FUZZ={name!r}: expected one of {sorted(PROFILES)}")
    profile = PROFILES[name]
    return settings(
        max_examples=max(1, int(profile["max_examples"] * scale)),
        deadline=profile["deadline"],
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    )


# ---------------------------------------------------------------- images

# (format, mode, suffix): every mode each format's PIL writer accepts that a user might hand us.
IMAGE_KINDS = [
    ("PNG", "RGB", ".png"),
    ("PNG", "L", ".png"),
    ("PNG", "LA", ".png"),
    ("PNG", "P", ".png"),
    ("PNG", "RGBA", ".png"),
    ("PNG", "I;16", ".png"),
    ("PNG", "1", ".png"),
    ("JPEG", "RGB", ".jpg"),
    ("JPEG", "L", ".jpg"),
    ("JPEG", "CMYK", ".jpg"),
    ("WEBP", "RGB", ".webp"),
    ("WEBP", "RGBA", ".webp"),
    ("TIFF", "RGB", ".tif"),
    ("TIFF", "CMYK", ".tif"),
    ("TIFF", "I;16", ".tif"),
    ("TIFF", "LA", ".tif"),
    ("BMP", "RGB", ".bmp"),
    ("BMP", "P", ".bmp"),
    ("BMP", "L", ".bmp"),
    ("GIF", "P", ".gif"),
    ("GIF", "L", ".gif"),
]
SUFFIXES = sorted({kind[2] for kind in IMAGE_KINDS})


def encode_image(fmt: str, mode: str, width: int, height: int, seed: int, frames: int = 1) -> bytes:
    """A small valid image file (``frames`` > 1: an animated GIF/PNG/WebP) with pseudo-random pixels."""
    rng = np.random.default_rng(seed)

    def frame():
        rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        if mode == "I;16":
            return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
        return rgb.convert(mode)

    out = io.BytesIO()
    first = frame()
    if frames > 1 and fmt in ("GIF", "PNG", "WEBP"):
        first.save(out, fmt, save_all=True, append_images=[frame() for _ in range(frames - 1)], duration=50)
    else:
        first.save(out, fmt)
    return out.getvalue()


@st.composite
def valid_images(draw, max_side: int = 48):
    fmt, mode, suffix = draw(st.sampled_from(IMAGE_KINDS))
    width = draw(st.integers(1, max_side))
    height = draw(st.integers(1, max_side))
    frames = draw(st.sampled_from([1, 1, 1, 3])) if fmt in ("GIF", "PNG", "WEBP") else 1
    return suffix, encode_image(fmt, mode, width, height, draw(st.integers(0, 2**16)), frames)


@st.composite
def mutated(draw, blob: bytes) -> bytes:
    """``blob`` truncated, with bytes overwritten, or with bytes inserted (one to three edits)."""
    data = bytearray(blob)
    for _ in range(draw(st.integers(1, 3))):
        edit = draw(st.sampled_from(["truncate", "overwrite", "insert"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if edit == "truncate":
            del data[at:]
        elif edit == "overwrite":
            patch = draw(st.binary(min_size=1, max_size=8))
            data[at : at + len(patch)] = patch
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


@st.composite
def image_files(draw):
    """(suffix, bytes) of a file a user might pass as an input image, valid or not."""
    kind = draw(st.sampled_from(["random", "valid", "mutated", "declared_size", "thin"]))
    if kind == "random":
        return draw(st.sampled_from(SUFFIXES)), draw(st.binary(max_size=512))
    if kind == "declared_size":
        width, height = draw(st.integers(0, 2**31 - 1)), draw(st.integers(0, 2**31 - 1))
        depth, color = draw(st.sampled_from([(8, 2), (8, 0), (16, 2), (16, 0), (8, 6), (8, 3), (1, 0)]))
        return ".png", png_header(width, height, depth, color, draw(st.binary(max_size=64)))
    if kind == "thin":  # 1xN, Nx1 and other sides around the minimum
        side = draw(st.integers(1, 4096))
        short = draw(st.integers(1, 9))
        width, height = (short, side) if draw(st.booleans()) else (side, short)
        fmt, mode, suffix = draw(st.sampled_from([("PNG", "RGB", ".png"), ("GIF", "P", ".gif"), ("BMP", "L", ".bmp")]))
        return suffix, encode_image(fmt, mode, width, height, 0)
    suffix, blob = draw(valid_images())
    return (suffix, draw(mutated(blob))) if kind == "mutated" else (suffix, blob)


# ---------------------------------------------------------------- manifests

ODD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([10**400, -(10**30), 2**63, float("nan"), float("inf"), -0.0, 1e308]),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(
        [
            "",
            "..",
            "../manifest.json",
            "../../etc/passwd",
            "/etc/passwd",
            "C:\\x",
            "\\\\host\\share",
            "a\0b",
            "\ud800",
            "é/ü.onnx",
            "x" * 5000,
            "./",
            ".",
            "~",
            "fp32",
            "unet",
            "unet#0",
        ]
    ),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    st.integers(1, 200).map(lambda depth: json.loads("[" * depth + "]" * depth)),
)


def json_paths(node, prefix=()):
    """Every path (tuple of keys and indices) into a JSON value, the root included."""
    yield prefix
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        yield from json_paths(child, prefix + (key,))


def _at(node, path):
    for key in path:
        node = node[key]
    return node


@st.composite
def mutated_manifests(draw, data: dict):
    """A deep copy of ``data`` with one to four keys deleted or values replaced by odd ones."""
    data = json.loads(json.dumps(data))
    for _ in range(draw(st.integers(1, 4))):
        paths = [p for p in json_paths(data) if p]
        if draw(st.booleans()):  # half the time a string: most are the paths a bundle must contain
            paths = [p for p in paths if isinstance(_at(data, p), str)] or paths
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(ODD_VALUES)
    return data
