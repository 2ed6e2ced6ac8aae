"""A SeeSR-turbo bundle: what ``seesr-export build --turbo`` changes in a build (``seesr_export.turbo``
says what the turbo mode is).

The bundle has the standard layout, so the runtime, ``seesr bench``, int8, TensorRT and Triton take it
like any other. What differs: the base model folder is sd-turbo; the UNet graph is traced from the
composed UNet (``TorchModels(paths, turbo=True)``); the manifest records sd-turbo's scheduler
(trailing timesteps) and the turbo defaults (2 steps, guidance 1.0, tile overlap 32); the ControlNet
and UNet shape profiles are optimised for batch 1 (no guidance) and still accept batch 2 (guidance
above 1 when a caller asks for it).
"""

from __future__ import annotations

import dataclasses

from seesr_runtime.manifest import sha256_file
from seesr_runtime.networks import NetworkSpec, Profile
from seesr_runtime.options import bundle_defaults, describe

from .cache_keys import hash_sources
from .layout import SeeSRPaths
from .turbo import turbo_scheduler_config
from .turbo_options import TURBO_DEFAULTS, UNET_WEIGHTS, turbo_paths

DENOISERS = ("controlnet", "unet")  # the networks run once per step, at batch 2 only when guided


def turbo_sources(paths: SeeSRPaths) -> dict[str, dict[str, str]]:
    """The source hashes of a turbo checkout: the UNet role covers both UNets it is composed from."""
    sources = hash_sources(paths)
    turbo_unet = sorted(f for f in (paths.sd2 / "unet").iterdir() if f.is_file())
    sources["unet"] = {**sources["unet"], **{f"sd-turbo/{f.name}": sha256_file(f) for f in turbo_unet}}
    return sources


def batch_one_profiles(specs: dict[str, NetworkSpec]) -> dict[str, NetworkSpec]:
    """``specs`` with the denoisers' profiles optimised for batch 1; their range still reaches batch 2."""

    def at_batch_one(profile: Profile) -> Profile:
        return Profile(profile.name, profile.min, {**profile.opt, "B": 1}, profile.max)

    return {
        name: dataclasses.replace(spec, profiles=tuple(map(at_batch_one, spec.profiles))) if name in DENOISERS else spec
        for name, spec in specs.items()
    }


def turbo_manifest(manifest: dict, paths: SeeSRPaths) -> dict:
    """The manifest of a turbo build: sd-turbo's scheduler and the turbo defaults in ``pipeline``."""
    defaults = {**bundle_defaults(), **TURBO_DEFAULTS}
    pipeline = manifest["pipeline"]
    pipeline["scheduler"] = {"type": "DDPMScheduler", **turbo_scheduler_config(paths.sd2)}
    pipeline["defaults"] = defaults
    pipeline["options"] = describe(defaults)
    pipeline["variant"] = "turbo"
    manifest["provenance"]["unet_composition"] = {
        "config_and_weights": str(paths.sd2 / "unet" / UNET_WEIGHTS),
        "image_attentions": str(paths.unet),
    }
    return manifest


def turbo_checkout(paths: SeeSRPaths, options) -> SeeSRPaths:
    """The checkout a build of ``options`` reads: ``paths``, or its turbo variant (checked)."""
    return paths if options.sd_turbo is None else turbo_paths(paths, options.sd_turbo)


def reusable(previous, options):
    """The previous bundle at ``--out`` if it is of the variant being built, else None: a standard and a
    turbo bundle share some graphs' cache keys (ControlNet, DAPE) but not their shape profiles."""
    if previous is None:
        return None
    wanted = "turbo" if options.sd_turbo is not None else None
    return previous if previous.data["pipeline"].get("variant") == wanted else None
