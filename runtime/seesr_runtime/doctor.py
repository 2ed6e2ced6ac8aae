"""``seesr doctor``: what this machine can run, and what to type.

It reports the CPU and its features, the engines installed, NVIDIA GPUs, free memory and disk; given a
bundle it verifies it (the runtime's own check, ``Manifest.load``) and lists what it holds. Then it
recommends a ``seesr upscale`` command line, with the time a committed measurement
(``reference_figures.json``) leads one to expect. ``recommend`` is the one rule: ``seesr upscale`` runs
it too when no backend option is given (``upscaling.choose_default``).

Nothing here needs more than the base install: each engine is imported only to ask it what it has, and
a missing one is reported as missing.

``seesr doctor --json`` prints one object (format "seesr-doctor", version 1). Its keys:

- ``format``, ``version``, ``seesr_runtime`` (the runtime's version)
- ``system``: ``os``, ``arch``, ``python``, ``cpu_count``
- ``cpu``: ``model``; ``flags`` (each of ``machine.FLAGS`` -> bool), ``features`` (``avx512``,
  ``avx512_bf16``, ``amx``, ``vnni`` -> bool) and ``bf16_units`` (bool): null where /proc/cpuinfo is missing
- ``memory``: ``total_bytes``, ``available_bytes`` (MemAvailable; null where unknown)
- ``disk``: a list of ``path``, ``free_bytes``: the working directory, then the bundle's folder
- ``engines``:
  - ``onnxruntime``: ``installed``, ``version``, ``providers`` (available execution providers)
  - ``openvino``: ``installed``, ``version``, ``devices`` (each: ``name``, ``full_name``, ``capabilities``
    (OPTIMIZATION_CAPABILITIES, sorted), ``bf16`` (BF16 among them), ``precisions`` (the OpenVINO backend's
    precisions the device can run)), ``error`` (why OpenVINO could not be asked; else null)
  - ``tensorrt``: ``installed``, ``version``, ``error``
- ``gpus``: NVIDIA GPUs (nvidia-smi): ``name``, ``memory_total_mb``, ``memory_free_mb``
- ``bundle``: null without ``--bundle``; else ``path``, ``name``, ``variant`` ("standard" or "turbo"),
  ``files_hashed``, ``files_trusted`` (vouched for by the verification stamp), ``precisions`` (graphs
  present in any network), ``graphs`` (network -> precisions), ``tensorrt_engines`` (precisions)
- ``recommendation``: ``backend``, ``precision``, ``providers`` (null for OpenVINO), ``arguments`` (the
  backend options as argv), ``command`` (a whole ``seesr upscale`` line), ``reason``, ``hints`` (what would
  make this machine faster), ``expected`` (null, or the reference figure: ``seconds``, ``steps``, ``size``,
  ``backend``, ``precision``, ``device``, ``variant``, ``machine``, ``source``, ``bundle_matches``: whether the
  bundle's networks are the size measured, null without a bundle)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from . import __version__, machine, openvino_backend
from .lazy import available, install_hint, lazy_import
from .manifest import Manifest

log = logging.getLogger(__name__)

onnxruntime = lazy_import("onnxruntime")
tensorrt = lazy_import("tensorrt", extra="tensorrt")

FORMAT = "seesr-doctor"
VERSION = 1
CUDA_PROVIDER = "CUDAExecutionProvider"


# ---------------------------------------------------------------- the decision


@dataclass(frozen=True)
class Facts:
    """What ``recommend`` decides from: gathered on this machine (``gather_facts``) or given as data."""

    cpu_flags: frozenset[str] | None = None  # /proc/cpuinfo's; None where unknown
    # OpenVINO's OPTIMIZATION_CAPABILITIES of the CPU device; None: OpenVINO is not installed (or cannot run)
    openvino_cpu_capabilities: frozenset[str] | None = None
    onnxruntime_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    cuda_gpus: tuple[str, ...] = ()  # names of the NVIDIA GPUs nvidia-smi lists
    bundle_precisions: frozenset[str] | None = None  # graphs the bundle holds; None: no bundle given


@dataclass(frozen=True)
class Recommendation:
    backend: str
    precision: str
    providers: tuple[str, ...] | None  # onnxruntime execution providers; None: the backend's default
    reason: str
    hints: tuple[str, ...] = ()

    @property
    def device(self) -> str:
        return "cuda" if self.providers and "cuda" in self.providers else "cpu"

    @property
    def label(self) -> str:
        engine = "OpenVINO" if self.backend == "openvino" else self.backend
        return f"{engine} {self.precision}" + (" on CUDA" if self.device == "cuda" else "")

    def arguments(self) -> list[str]:
        """The ``seesr upscale`` options that select it."""
        return ["--backend", self.backend, "--precision", self.precision] + (
            ["--providers", *self.providers] if self.providers else []
        )


def recommend(facts: Facts) -> Recommendation:
    """The fastest configuration measured for these facts: onnxruntime on an NVIDIA GPU (fp16 where the
    bundle has fp16 graphs); else OpenVINO bf16 on a CPU with bf16 units (the fastest CPU configuration
    within 35 dB of fp32: benchmarks/results/cpu/README.md), OpenVINO fp32 on one without (measured at twice
    onnxruntime fp32's speed, 79.8 dB from its image), and onnxruntime fp32 where OpenVINO is not installed."""
    if CUDA_PROVIDER in facts.onnxruntime_providers and facts.cuda_gpus:
        fp16 = facts.bundle_precisions is None or "fp16" in facts.bundle_precisions
        return Recommendation(
            "onnxruntime",
            "fp16" if fp16 else "fp32",
            ("cuda", "cpu"),
            f"an NVIDIA GPU ({facts.cuda_gpus[0]}) and onnxruntime's CUDA provider",
            () if fp16 else ("a bundle built with --precision fp16 runs the GPU's fp16 graphs",),
        )
    hints = []
    if facts.cuda_gpus:
        hints.append(f"onnxruntime's CUDA provider would use the {facts.cuda_gpus[0]}: {install_hint('gpu')}")
    if facts.openvino_cpu_capabilities is not None:
        precision, reason = openvino_cpu_precision(facts.openvino_cpu_capabilities)
        return Recommendation("openvino", precision, None, reason, tuple(hints))
    bf16 = machine.has_bf16_units(facts.cpu_flags)
    if bf16:
        reason = "OpenVINO, which would run bf16 on this CPU's bf16 units (AVX512_BF16 or AMX), is not available"
    else:
        reason = "OpenVINO, faster than onnxruntime in f32 too, is not available"
    hints.append(f"OpenVINO {'bf16' if bf16 else 'fp32'}: {install_hint('openvino')}")
    return Recommendation("onnxruntime", "fp32", None, reason, tuple(hints))


def openvino_cpu_precision(capabilities: frozenset[str]) -> tuple[str, str]:
    """OpenVINO's precision on a CPU of these OPTIMIZATION_CAPABILITIES, and why: bf16 on bf16 units, else f32."""
    if "BF16" in capabilities:
        return "bf16", "OpenVINO is installed and runs bf16 on this CPU's bf16 units"
    return "fp32", "OpenVINO is installed; this CPU has no bf16 units (OpenVINO lists no BF16), so f32"


def openvino_precision_here() -> tuple[str, str]:
    """``openvino_cpu_precision`` for this machine's CPU (for a backend already chosen to be OpenVINO, e.g. a
    Triton model of precision "auto"); f32 where OpenVINO cannot say, whose backend then reports why."""
    cpu = next((d for d in openvino_report(only_cpu=True)["devices"] if d["name"] == "CPU"), None)
    if cpu is None:
        return "fp32", "OpenVINO could not report this CPU's capabilities, so f32"
    return openvino_cpu_precision(frozenset(cpu["capabilities"]))


def gather_facts(manifest: Manifest | None = None) -> Facts:
    """This machine's facts, asking each engine no more than ``recommend`` needs (OpenVINO about its CPU
    device only; nvidia-smi only where onnxruntime has the CUDA provider)."""
    providers = onnxruntime_report()["providers"]
    gpus = machine.nvidia_gpus() if CUDA_PROVIDER in providers else []
    return facts_from(machine.cpu_flags(), openvino_report(only_cpu=True), providers, gpus, manifest)


def facts_from(
    flags: frozenset[str] | None,
    openvino: dict[str, Any],
    providers: list[str],
    gpus: list[dict[str, Any]],
    manifest: Manifest | None,
) -> Facts:
    cpu = next((d for d in openvino["devices"] if d["name"] == "CPU"), None)
    return Facts(
        cpu_flags=flags,
        openvino_cpu_capabilities=frozenset(cpu["capabilities"]) if cpu is not None else None,
        onnxruntime_providers=tuple(providers),
        cuda_gpus=tuple(gpu["name"] for gpu in gpus),
        bundle_precisions=frozenset(bundle_precisions(manifest)) if manifest is not None else None,
    )


# ---------------------------------------------------------------- what is installed


def onnxruntime_report() -> dict[str, Any]:
    try:
        return {
            "installed": True,
            "version": onnxruntime.__version__,
            "providers": list(onnxruntime.get_available_providers()),
        }
    except ImportError:  # a dependency of the base install, but reported rather than raised
        return {"installed": False, "version": None, "providers": []}


def openvino_report(only_cpu: bool = False) -> dict[str, Any]:
    """OpenVINO's version and devices (``only_cpu``: the CPU device alone, without loading other plugins)."""
    report: dict[str, Any] = {"installed": available("openvino"), "version": None, "devices": [], "error": None}
    if not report["installed"]:
        return report
    try:
        ov = openvino_backend.import_openvino()
        report["version"] = ov.get_version()
        core = ov.Core()
        names = ["CPU"] if only_cpu else core.available_devices
        report["devices"] = [openvino_device(core, name) for name in names]
    except Exception as exc:  # noqa: BLE001 - a broken install or plugin is reported, not raised
        report["error"] = f"{type(exc).__name__}: {exc}"
    return report


def openvino_device(core: Any, name: str) -> dict[str, Any]:
    capabilities = sorted(openvino_backend.device_capabilities(core, name))
    return {
        "name": name,
        "full_name": str(core.get_property(name, "FULL_DEVICE_NAME")),
        "capabilities": capabilities,
        "bf16": "BF16" in capabilities,
        "precisions": [
            precision
            for precision, (_, _, needs) in openvino_backend.PRECISIONS.items()
            if needs is None or needs in capabilities
        ],
    }


def tensorrt_report() -> dict[str, Any]:
    report: dict[str, Any] = {"installed": available("tensorrt"), "version": None, "error": None}
    if report["installed"]:
        try:
            report["version"] = tensorrt.__version__
        except Exception as exc:  # noqa: BLE001 - found but not importable (its CUDA libraries): say why
            report["error"] = f"{type(exc).__name__}: {exc}"
    return report


# ---------------------------------------------------------------- the bundle


def bundle_precisions(manifest: Manifest) -> list[str]:
    found = {precision for entry in manifest.data["networks"].values() for precision in entry.get("files", {})}
    return sorted(found)


def bundle_report(manifest: Manifest) -> dict[str, Any]:
    networks = manifest.data["networks"]
    verification = manifest.verification
    return {
        "path": str(manifest.root),
        "name": manifest.data["name"],
        "variant": manifest.data["pipeline"].get("variant", "standard"),
        "files_hashed": len(verification.hashed) if verification else 0,
        "files_trusted": len(verification.trusted) if verification else 0,
        "precisions": bundle_precisions(manifest),
        "graphs": {name: sorted(entry.get("files", {})) for name, entry in networks.items()},
        "tensorrt_engines": sorted({p for entry in networks.values() for p in entry.get("engines", {})}),
    }


# ---------------------------------------------------------------- the report


def reference_figures() -> dict[str, Any]:
    """The committed measurements doctor quotes (``reference_figures.json``: each row names its source)."""
    table: dict[str, Any] = json.loads(resources.files(__package__).joinpath("reference_figures.json").read_text())
    return table


def expected_figure(recommendation: Recommendation, manifest: Manifest | None) -> dict[str, Any] | None:
    """The reference figure of the recommended configuration (for the bundle's variant), with
    ``bundle_matches``: whether the bundle's networks are the size measured (null without a bundle)."""
    table = reference_figures()
    variant = manifest.data["pipeline"].get("variant", "standard") if manifest is not None else "standard"
    keys = ("backend", "precision", "device", "variant", "size", "steps", "seconds", "machine", "source")
    for row in table["figures"]:
        if (row["backend"], row["precision"], row["device"], row["variant"]) == (
            recommendation.backend,
            recommendation.precision,
            recommendation.device,
            variant,
        ):
            measured = {k: v for k, v in table["networks"].items() if k != "about"}
            matches = None if manifest is None else all(manifest.data["dims"].get(k) == v for k, v in measured.items())
            return {**{key: row[key] for key in keys}, "bundle_matches": matches}
    return None


def gather_report(bundle: Path | None) -> dict[str, Any]:
    """The whole report (module doc). The bundle is loaded and verified first: a bad one fails fast
    (BundleError) before any engine is asked."""
    manifest = Manifest.load(bundle, verify="auto") if bundle is not None else None
    flags = machine.cpu_flags()
    engines = {"onnxruntime": onnxruntime_report(), "openvino": openvino_report(), "tensorrt": tensorrt_report()}
    gpus = machine.nvidia_gpus()
    facts = facts_from(flags, engines["openvino"], engines["onnxruntime"]["providers"], gpus, manifest)
    chosen = recommend(facts)
    bundle_info = bundle_report(manifest) if manifest is not None else None
    folders = [Path.cwd()] + ([Path(bundle).resolve()] if bundle is not None else [])
    command = ["seesr", "upscale", "INPUT", "-o", "OUTPUT", "--bundle", str(bundle or "BUNDLE"), *chosen.arguments()]
    return {
        "format": FORMAT,
        "version": VERSION,
        "seesr_runtime": __version__,
        "system": {
            "os": platform.system(),
            "arch": platform.machine(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
        },
        "cpu": {
            "model": machine.cpu_model(),
            "flags": {flag: flag in flags for flag in machine.FLAGS} if flags is not None else None,
            "features": machine.cpu_features(flags),
            "bf16_units": machine.has_bf16_units(flags),
        },
        "memory": {"total_bytes": machine.total_memory_bytes(), "available_bytes": machine.available_memory_bytes()},
        "disk": [{"path": str(folder), "free_bytes": machine.free_disk_bytes(folder)} for folder in folders],
        "engines": engines,
        "gpus": gpus,
        "bundle": bundle_info,
        "recommendation": {
            "backend": chosen.backend,
            "precision": chosen.precision,
            "providers": list(chosen.providers) if chosen.providers else None,
            "arguments": chosen.arguments(),
            "command": shlex.join(command),
            "reason": chosen.reason,
            "hints": list(chosen.hints),
            "expected": expected_figure(chosen, manifest),
        },
    }


# ---------------------------------------------------------------- printing


def format_report(report: dict[str, Any]) -> str:
    lines = [f"seesr doctor (seesr-runtime {report['seesr_runtime']})", ""]
    cpu = report["cpu"]
    system = report["system"]
    lines.append(f"CPU       {cpu['model']} ({system['cpu_count']} logical cores, {system['arch']})")
    if cpu["features"] is None:
        lines.append("          features unknown (no /proc/cpuinfo)")
    else:
        names = {"avx512": "AVX-512", "avx512_bf16": "AVX512_BF16", "amx": "AMX", "vnni": "VNNI"}
        shown = ", ".join(f"{label} {_yes(cpu['features'][key])}" for key, label in names.items())
        lines.append(f"          {shown}; bf16 units: {_yes(cpu['bf16_units'])}")
    memory = report["memory"]
    lines.append(f"Memory    {_gb(memory['available_bytes'])} available of {_gb(memory['total_bytes'])}")
    lines += [f"Disk      {_gb(d['free_bytes'])} free in {d['path']}" for d in report["disk"]]
    gpus = report["gpus"]
    lines.append(
        "GPUs      "
        + (
            "; ".join(f"{g['name']} ({_mb(g['memory_total_mb'])}, {_mb(g['memory_free_mb'])} free)" for g in gpus)
            or "no NVIDIA GPU found (nvidia-smi)"
        )
    )
    lines += _engine_lines(report["engines"])
    if report["bundle"] is not None:
        lines += _bundle_lines(report["bundle"])
    lines += ["", "Recommended for this machine:", f"  {report['recommendation']['command']}"]
    chosen = report["recommendation"]
    lines.append(f"  why: {chosen['reason']}")
    expected = chosen["expected"]
    if expected is None:
        lines.append("  expect: no committed measurement of this configuration")
    else:
        seconds = f"{expected['seconds']:.0f}" if expected["seconds"] >= 10 else f"{expected['seconds']:.1f}"
        lines.append(
            f"  expect: measured on {expected['machine']}: ~{seconds} s per {expected['size']} px image at "
            f"{expected['steps']} steps; expect roughly this on similar hardware"
        )
        lines.append(f"          ({expected['source']})")
        if expected["bundle_matches"] is False:
            lines.append("          not this bundle's figure: its networks are not the size measured (SD2-base's)")
    lines += [f"  faster: {hint}" for hint in chosen["hints"]]
    return "\n".join(lines)


def _engine_lines(engines: dict[str, Any]) -> list[str]:
    ort, ov, trt = engines["onnxruntime"], engines["openvino"], engines["tensorrt"]
    onnx_runtime = (
        f"onnxruntime {ort['version']}: {', '.join(ort['providers'])}" if ort["installed"] else "onnxruntime: missing"
    )
    lines = [f"Engines   {onnx_runtime}"]
    if not ov["installed"]:
        lines.append(f"          OpenVINO: not installed ({install_hint('openvino')})")
    elif ov["error"] is not None:
        lines.append(f"          {_named('OpenVINO', ov['version'])}: cannot be used ({ov['error']})")
    else:
        lines.append(f"          OpenVINO {ov['version']}:")
        for device in ov["devices"]:
            lines.append(
                f"            {device['name']}: {device['full_name']}; bf16 {_yes(device['bf16'])}; "
                f"precisions {', '.join(device['precisions'])}"
            )
    if not trt["installed"]:
        lines.append("          TensorRT: not installed")
    else:
        problem = f": cannot be used ({trt['error']})" if trt["error"] else ""
        lines.append(f"          {_named('TensorRT', trt['version'])}{problem}")
    return lines


def _bundle_lines(bundle: dict[str, Any]) -> list[str]:
    return [
        f"Bundle    {bundle['path']}: {bundle['name']} ({bundle['variant']}), verified "
        f"({bundle['files_hashed']} files hashed, {bundle['files_trusted']} vouched for by the verification stamp)",
        f"          graphs: {', '.join(bundle['precisions'])}; TensorRT engines: "
        + (", ".join(bundle["tensorrt_engines"]) or "none"),
    ]


def _named(engine: str, version: str | None) -> str:
    return f"{engine} {version}" if version else engine


def _yes(value: bool | None) -> str:
    return "unknown" if value is None else "yes" if value else "no"


def _gb(size: int | None) -> str:
    return "unknown" if size is None else f"{size / 1024**3:.1f} GB"


def _mb(size: int | None) -> str:
    return "? MiB" if size is None else f"{size} MiB"


def cmd_doctor(args: argparse.Namespace) -> int:
    report = gather_report(args.bundle)
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        print()
    else:
        print(format_report(report))
    return 0
