"""The upscale options, described once: type, default, accepted range, help and command-line flag.

Everything that takes upscale options derives from ``OPTIONS``: the pipeline validates each call
through ``resolve``; ``seesr upscale``, ``seesr-export reference``/``demo`` and
``seesr-triton-client`` build their flags with ``add_arguments``; the Triton model and its
config generator check values with ``check``; the bundle writer records ``bundle_defaults`` and
``describe`` (JSON) in the manifest under ``pipeline.options``, which the C++ runtime reads.

``PIPELINE_OPTIONS`` (``memory_budget``) are declared, parsed and described the same way but are set once
for a pipeline (``SeeSRPipeline.from_bundle(..., memory_budget=...)``, ``seesr upscale --memory-budget``)
rather than per call: they say how the runtime runs, not which image it makes, so the manifest's
description (per-call options, read by the C++ runtime) leaves them out.

Defaults marked ``in_bundle`` come from the bundle's manifest where it has them (the values here
are the official ``test_seesr.py`` ones, which ``seesr-export build`` writes). A value outside its
range raises ``OptionError`` naming the option, the value and what is accepted; an unusable image
raises ``ImageRejected``. Standard library only, like the manifest reader that uses it.
"""

from __future__ import annotations

import argparse
import math
import numbers
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .errors import ImageRejected, OptionError

MIN_SIDE = 8  # smaller inputs break DAPE's resize and leave no latent pixel


@dataclass(frozen=True)
class Option:
    name: str
    kind: type  # str, int, float or bool
    default: object  # the official value: what a bundle records, and what applies where none does
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[object, ...] | None = None
    in_bundle: str | None = None  # where a manifest's "pipeline" section keeps this default ("defaults.steps")
    flag: str | None = None  # command-line flag; None: --name-with-dashes
    flag_help: str | None = None  # a switch's help (what giving the flag does), where it differs from ``help``
    byte_size: bool = False  # an int of bytes, also given as text with a unit (``parse_byte_size``)

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def accepted(self) -> str:
        """What this option accepts, in words: "an integer in [1, 1000]", "one of ('lr', 'noise')"."""
        if self.choices is not None:
            return f"one of {self.choices}"
        if self.byte_size:
            return BYTE_SIZE_FORMS
        what = {str: "a string", int: "an integer", float: "a finite number", bool: "true or false"}[self.kind]
        if self.minimum is not None and self.maximum is not None:
            return f"{what} in [{self.minimum}, {self.maximum}]"
        if self.minimum is not None:
            return f"{what} >= {self.minimum}"
        return what

    def check(self, value: Any) -> Any:
        """``value`` as this option's type, or OptionError naming the option, the value and the range."""
        value = self._typed(value)
        out_of_range = (
            self.choices is not None
            and value not in self.choices
            or self.kind is float
            and not math.isfinite(value)
            or self.minimum is not None
            and value < self.minimum
            or self.maximum is not None
            and value > self.maximum
        )
        if out_of_range:
            wanted = self.accepted() if self.byte_size else self.range_text()
            raise OptionError(f"{self.name} must be {wanted}, got {_shown(value)}", self.name)
        return value

    def _typed(self, value: Any) -> Any:
        # numpy's bool is no Python bool (and this module imports no numpy)
        is_bool = (
            isinstance(value, bool) or type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")
        )
        if self.kind is bool and is_bool:
            return bool(value)
        if self.kind is int and isinstance(value, numbers.Integral) and not is_bool:
            return int(value)
        if self.byte_size and isinstance(value, str):
            return parse_byte_size(self.name, value)
        if self.kind is float and isinstance(value, numbers.Real) and not is_bool:
            return float(value)
        if self.kind is str and isinstance(value, str):
            return value
        raise OptionError(
            f"{self.name} must be {self.accepted()}, got {_shown(value)} ({type(value).__name__})", self.name
        )

    def range_text(self) -> str:
        """The accepted range of a value of the right type: "in [1, 1000]", ">= 0", "a finite number >= 0.0"."""
        if self.choices is not None:
            return f"one of {self.choices}"
        if self.minimum is not None and self.maximum is not None:
            bounds = f"in [{self.minimum}, {self.maximum}]"
        else:
            bounds = f">= {self.minimum}" if self.minimum is not None else ""
        return f"a finite number {bounds}".strip() if self.kind is float else bounds

    def describe(self, default: object = None) -> dict[str, Any]:
        """JSON-able description (the manifest's ``pipeline.options`` entries)."""
        entry: dict[str, Any] = {
            "name": self.name,
            "type": self.kind.__name__,
            "default": self.default if default is None else default,
            "help": self.help,
        }
        for key in ("minimum", "maximum"):
            if getattr(self, key) is not None:
                entry[key] = getattr(self, key)
        if self.choices is not None:
            entry["choices"] = list(self.choices)
        if self.in_bundle is not None:
            entry["in_bundle"] = self.in_bundle
        return entry


OPTIONS: tuple[Option, ...] = (
    Option("prompt", str, "", "user prompt inserted after the tags"),
    Option(
        "added_prompt",
        str,
        "clean, high-resolution, 8k",
        "prompt appended after the user prompt",
        in_bundle="added_prompt",
    ),
    Option(
        "negative_prompt",
        str,
        "dotted, noise, blur, lowres, smooth",
        "negative prompt (guidance above 1 only)",
        in_bundle="negative_prompt",
    ),
    # 999: at 1000 steps the released SD2 scheduler ("leading" spacing, steps_offset 1) reaches t=1000, one past
    # its last trained timestep (the scheduler refuses such counts for any other configuration)
    Option("steps", int, 50, "DDPM steps", minimum=1, maximum=999, in_bundle="defaults.steps"),
    Option(
        "guidance",
        float,
        5.5,
        "classifier-free guidance scale; 1.0 or less disables it",
        minimum=0.0,
        in_bundle="defaults.guidance",
    ),
    Option(
        "conditioning_scale",
        float,
        1.0,
        "ControlNet conditioning scale",
        minimum=0.0,
        in_bundle="defaults.conditioning_scale",
    ),
    Option(
        "process_size",
        int,
        512,
        "minimum working size in pixels (smaller inputs are enlarged to it)",
        minimum=8,
        maximum=8192,
        in_bundle="defaults.process_size",
    ),
    Option("upscale", int, 4, "scale factor", minimum=1, maximum=8, in_bundle="defaults.upscale"),
    Option(
        "latent_tile_size",
        int,
        96,
        "latent tile, in latent pixels (8 image pixels each)",
        minimum=8,
        maximum=4096,
        in_bundle="defaults.latent_tile_size",
    ),
    Option(
        "latent_tile_overlap",
        int,
        4,
        "latent tile overlap, in latent pixels; less than the tile size",
        minimum=0,
        in_bundle="defaults.latent_tile_overlap",
    ),
    Option(
        "color_fix",
        str,
        "adain",
        "colour correction against the working image",
        choices=("adain", "wavelet", "none"),
        in_bundle="defaults.color_fix",
    ),
    Option(
        "start_point",
        str,
        "lr",
        "lr: start from the noised LR latent; noise: from pure noise",
        choices=("lr", "noise"),
        in_bundle="defaults.start_point",
    ),
    Option(
        "vae_encoder_tile_size",
        int,
        1024,
        "tiled VAE encoder tile, in image pixels; tiles above tile + 64",
        minimum=64,
        maximum=16384,
        in_bundle="defaults.vae_encoder_tile_size",
    ),
    Option(
        "vae_decoder_tile_size",
        int,
        224,
        "tiled VAE decoder tile, in latent pixels; tiles above tile + 22",
        minimum=8,
        maximum=2048,
        in_bundle="defaults.vae_decoder_tile_size",
    ),
    Option(
        "tiled_vae",
        bool,
        True,
        "run the VAE tiled above the thresholds of the tile sizes, as the official code; false: untiled at any size",
        in_bundle="defaults.tiled_vae",
        flag="--no-tiled-vae",
        flag_help="run the VAE untiled at any size: differs from the official output above the thresholds, "
        "and its memory grows with the image",
    ),
    Option("seed", int, 0, "noise seed", minimum=0),
    Option(
        "max_pixels",
        int,
        4096 * 4096,
        "refuse input images with more pixels (the output has 16 times as many at x4; a decompression-bomb guard)",
        minimum=MIN_SIDE * MIN_SIDE,
    ),
)
# Set once per pipeline, not per call (see the module's doc).
PIPELINE_OPTIONS: tuple[Option, ...] = (
    Option(
        "memory_budget",
        int,
        None,
        "the most memory an upscale may use, as a memory-limited container counts it: each network is loaded "
        "when its stage starts and freed when it ends (ControlNet and UNet together, only in the denoising "
        "loop; so every image loads them again), OpenVINO maps its weights from prepared files, and where a "
        "stage still does not fit, the VAE's waiting tiles go to files, then (the image then differs slightly; "
        "-v says what changed) the denoisers' linear layers run with int8 weights (OpenVINO) and tiles shrink. "
        "An image no plan fits is refused before any work, naming the smallest budget that would do. E.g. 4GB, "
        "2500MB, 6GiB; CPU backends only (openvino, onnxruntime on the CPU)",
        minimum=1,
        byte_size=True,
    ),
)
OPTION = {option.name: option for option in (*OPTIONS, *PIPELINE_OPTIONS)}
NAMES = tuple(option.name for option in OPTIONS)  # the per-call options
PIPELINE_NAMES = tuple(option.name for option in PIPELINE_OPTIONS)

# ---------------------------------------------------------------- sizes in bytes

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})
_SIZE = re.compile(r"^\s*(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[A-Za-z]*)\s*$")
BYTE_SIZE_FORMS = (
    "a positive size: a whole number of bytes, or a number with a unit, as '4GB', '2500MB', '4GiB', '3.5GB' "
    "(B, KB, MB, GB, TB: powers of 1000; KiB, MiB, GiB, TiB: powers of 1024)"
)


def parse_byte_size(name: str, text: str) -> int:
    """``text`` ("4GB", "2500MB", "4GiB", "3.5 GB", "4000000000") in bytes; OptionError naming the option,
    the text and the accepted forms for anything else."""
    match = _SIZE.match(text)
    unit = match["unit"].lower() if match else ""
    if match is None or unit not in _UNITS or ("." in match["number"] and _UNITS[unit] == 1):
        raise OptionError(f"{name} must be {BYTE_SIZE_FORMS}, got {text!r}", name)
    whole, _, fraction = str(match["number"]).partition(".")
    scale, places = _UNITS[unit], int("1" + "0" * len(fraction))
    size = int(whole) * scale + int(fraction or "0") * scale // places
    if size < 1:
        raise OptionError(f"{name} must be {BYTE_SIZE_FORMS}, got {text!r}", name)
    return size


def format_bytes(size: float) -> str:
    """``size`` bytes as a short decimal figure: "3.71 GB", "512 MB" (what error messages and plans print)."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{int(size)} B"


def _shown(value: object) -> str:
    return repr(value) if isinstance(value, (str, bytes)) else str(value)


def default(name: str) -> Any:
    return OPTION[name].default


def check(name: str, value: Any) -> Any:
    """One option's value, checked (OptionError also for an unknown name)."""
    if name not in OPTION:
        raise OptionError(f"unknown option {name!r}; known: {list(NAMES)}", name)
    return OPTION[name].check(value)


def check_given(given: dict[str, Any]) -> dict[str, Any]:
    """The options a caller set (None: not set), checked one by one; defaults are not filled in."""
    per_pipeline = sorted(set(given) & set(PIPELINE_NAMES))
    if per_pipeline:
        raise OptionError(
            f"{per_pipeline[0]} is set once for a pipeline, not per call: "
            f"SeeSRPipeline.from_bundle(..., {per_pipeline[0]}=...)",
            per_pipeline[0],
        )
    unknown = sorted(set(given) - set(NAMES))
    if unknown:
        raise OptionError(f"unknown option(s) {unknown}; known: {list(NAMES)}", unknown[0])
    return {name: OPTION[name].check(value) for name, value in given.items() if value is not None}


def resolve(given: dict[str, Any], defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every option: ``given`` (None: not set) over ``defaults`` (a bundle's) over the table's, checked,
    including the rules between options."""
    defaults = {**{o.name: o.default for o in OPTIONS}, **(defaults or {})}
    values = {name: OPTION[name].check(value) for name, value in {**defaults, **check_given(given)}.items()}
    if values["latent_tile_overlap"] >= values["latent_tile_size"]:
        raise OptionError(
            f"latent_tile_overlap must be smaller than latent_tile_size ({values['latent_tile_size']}), "
            f"got {values['latent_tile_overlap']}",
            "latent_tile_overlap",
        )
    return values


def bundle_defaults() -> dict[str, Any]:
    """The ``pipeline.defaults`` section a bundle records (the official values)."""
    return {o.name: o.default for o in OPTIONS if o.in_bundle and o.in_bundle.startswith("defaults.")}


_ABSENT = object()


def defaults_from_manifest(pipeline: dict[str, Any]) -> dict[str, Any]:
    """Each option's default: the manifest's ``pipeline`` section's where it records one, else the table's
    (bundles built before an option existed)."""
    found: dict[str, Any] = {}
    for option in OPTIONS:
        found[option.name] = option.default
        section: Any = pipeline
        for key in option.in_bundle.split(".") if option.in_bundle else ():
            section = section.get(key, _ABSENT) if isinstance(section, dict) else _ABSENT
        if option.in_bundle and section is not _ABSENT:
            found[option.name] = section
    return found


def describe(defaults: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every option as JSON (name, type, default, minimum/maximum or choices, help), for the manifest."""
    defaults = defaults or {}
    return [option.describe(defaults.get(option.name)) for option in OPTIONS]


def description_problems(entries: object) -> list[str]:
    """What is wrong with a manifest's ``pipeline.options`` (empty when nothing is)."""
    if not isinstance(entries, list):
        return ["pipeline.options must be a list of option descriptions"]
    problems = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            problems.append(f"pipeline.options[{i}]: needs a 'name'")
        elif entry.get("type") not in ("str", "int", "float", "bool") or "default" not in entry:
            problems.append(
                f"pipeline.options[{i}] ({entry['name']}): needs 'type' (str, int, float, bool) and 'default'"
            )
    return problems


# ---------------------------------------------------------------- images


def check_image_size(width: int, height: int, max_pixels: int, raise_with: str = "the max_pixels option") -> None:
    """ImageRejected for an image with a side under MIN_SIDE or more than ``max_pixels`` pixels."""
    if min(width, height) < MIN_SIDE:
        raise ImageRejected(f"{width}x{height} is too small (at least {MIN_SIDE}x{MIN_SIDE} pixels)")
    if width * height > max_pixels:
        raise ImageRejected(
            f"{width}x{height} is {width * height} pixels, over the limit of {max_pixels} (raise it with {raise_with})"
        )


# ---------------------------------------------------------------- command lines


def add_arguments(parser: argparse.ArgumentParser, names: Iterable[str] = NAMES, server_side: bool = False) -> None:
    """Flags for ``names``, all defaulting to None (not set: the bundle's or the table's default applies).
    ``server_side``: the defaults are a server's (the Triton client), which the help says."""
    for name in names:
        option = OPTION[name]
        if option.kind is bool:
            parser.add_argument(
                option.cli_flag,
                dest=name,
                action="store_const",
                const=not option.default,
                default=None,
                help=(option.flag_help or option.help).replace("%", "%%"),
            )
            continue
        shown = "none" if option.default is None else _shown(option.default) if option.default != "" else "empty"
        if option.in_bundle:
            # The table's default is a standard bundle's; a turbo bundle has its own (2 steps, guidance 1.0).
            note = f"default: {'the server' if server_side else 'the bundle'}'s; {shown} in a standard bundle"
        else:
            note = f"default {'on the server ' if server_side else ''}{shown}"
        numeric = option.kind in (int, float) and option.minimum is not None and not option.byte_size
        accepted = f"; {option.range_text()}" if numeric else ""
        text = f"{option.help}{accepted} ({note})".replace("%", "%%")
        extra: dict[str, Any] = {"choices": option.choices} if option.choices else {}
        parser.add_argument(
            option.cli_flag,
            dest=name,
            type=str if option.byte_size else option.kind,  # the text is parsed by ``check``: OptionError
            default=None,
            help=text,
            metavar="SIZE"
            if option.byte_size
            else {int: "N", float: "X", str: None}[option.kind]
            if not extra
            else None,
            **extra,
        )


def given_in(args: argparse.Namespace, names: Iterable[str] = NAMES) -> dict[str, Any]:
    """The options set on a parsed command line, checked (per-call and pipeline options alike)."""
    given = {name: getattr(args, name) for name in names if hasattr(args, name)}
    per_pipeline = {
        name: check(name, value) for name, value in given.items() if name in PIPELINE_NAMES and value is not None
    }
    return {**check_given({n: v for n, v in given.items() if n not in PIPELINE_NAMES}), **per_pipeline}
