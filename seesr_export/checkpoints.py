"""Reading checkpoint files safely and accounting for every key.

Only ``torch.load(weights_only=True)`` and safetensors are used: a checkpoint
is data, never code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .errors import CheckpointError


def require_file(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what}: file not found: {path}")
    return path


def load_state_dict(path: Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Load a flat tensor dict from ``.safetensors`` or a torch pickle (weights only)."""
    path = require_file(path, what)
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise many types
        raise CheckpointError(f"{what}: cannot read {path}: {exc}") from exc


def find_weights(folder: Path, stem: str, what: str) -> Path:
    """The weights file of a diffusers/transformers folder (safetensors preferred)."""
    for name in (f"{stem}.safetensors", f"{stem}.bin"):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    # Hugging Face releases add half-precision variants beside the full files; the official code (and this
    # exporter) loads the full ones, so a folder holding only variants is named as such.
    variants = sorted(p.name for p in Path(folder).glob(f"{stem}.*.*") if p.suffix in (".safetensors", ".bin"))
    found = f"; found only the variant {', '.join(variants)}: download the full-precision file too" if variants else ""
    raise CheckpointError(f"{what}: no weights in {folder} (expected {stem}.safetensors or {stem}.bin){found}")


def load_strict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: Path | str,
    ignore_prefixes: Iterable[str] = (),
    ignore_keys: Iterable[str] = (),
) -> None:
    """Copy ``state_dict`` into ``module``; every key must be used, or explicitly ignored.

    Missing, unexpected and mis-shaped keys are all reported in one error that
    names ``source`` and each offending key with its expected shape.
    """
    ignore_prefixes = tuple(ignore_prefixes)
    ignore_keys = set(ignore_keys)
    wanted = module.state_dict()
    given = {k: v for k, v in state_dict.items() if k not in ignore_keys and not k.startswith(ignore_prefixes)}
    problems = []
    for key in sorted(set(wanted) - set(given)):
        problems.append(f"missing key {key!r} (expected shape {tuple(wanted[key].shape)})")
    for key in sorted(set(given) - set(wanted)):
        problems.append(f"unexpected key {key!r} (shape {tuple(given[key].shape)})")
    for key in sorted(set(given) & set(wanted)):
        if tuple(given[key].shape) != tuple(wanted[key].shape):
            problems.append(f"key {key!r} has shape {tuple(given[key].shape)}, expected {tuple(wanted[key].shape)}")
    if problems:
        raise CheckpointError(f"{source}: checkpoint does not match the model:\n  " + "\n  ".join(problems))
    module.load_state_dict({k: v for k, v in given.items()}, strict=True)
