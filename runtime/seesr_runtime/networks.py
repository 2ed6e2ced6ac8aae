"""The networks of a SeeSR bundle: names, tensors, symbolic shapes and shape profiles.

This is the one description every stage reads: the exporter names ONNX inputs
and dynamic axes from it, the bundle manifest stores it, the TensorRT builder
turns its profiles into optimization profiles, and the runtime checks feeds
against it. It is plain Python (no torch, no onnx) so the runtime and C++
embedders can rely on it.

Shapes mix integers and small expressions over named dimensions: ``"B"``
(batch), ``"h"``/``"w"`` (latent size), ``"8*h"`` (pixels) and ``"ceil(h/4)"``
(a UNet level; odd sizes round up as a stride-2 convolution does).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .tensors import Array

DTYPES = ("float32", "float16", "int64")
_EXPR = re.compile(
    r"^(?:(?P<int>\d+)|(?P<name>[A-Za-z_]\w*)|(?P<k>\d+)\*(?P<scaled>[A-Za-z_]\w*)"
    r"|ceil\((?P<ceil>[A-Za-z_]\w*)/(?P<div>\d+)\))$"
)


def eval_dim(expr: int | str, env: dict[str, int]) -> int:
    """Value of one dimension expression given the named dimensions."""
    if isinstance(expr, int):
        return expr
    m = _EXPR.match(expr.replace(" ", ""))
    if m is None:
        raise ValueError(f"unsupported dimension expression {expr!r}")
    if m["int"]:
        return int(m["int"])
    name = m["name"] or m["scaled"] or m["ceil"]
    if name not in env:
        raise KeyError(f"dimension {name!r} (in {expr!r}) has no value; known: {sorted(env)}")
    if m["name"]:
        return env[name]
    if m["scaled"]:
        return int(m["k"]) * env[name]
    return math.ceil(env[name] / int(m["div"]))


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int | str, ...]  # sizes and expressions over named dimensions ("B", "8*h")

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"tensor {self.name}: dtype {self.dtype!r} not in {DTYPES}")
        object.__setattr__(self, "shape", tuple(self.shape))

    def concrete_shape(self, env: dict[str, int]) -> tuple[int, ...]:
        return tuple(eval_dim(d, env) for d in self.shape)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(data["name"], data["dtype"], tuple(data["shape"]))


@dataclass(frozen=True)
class Profile:
    """A range of named dimensions: TensorRT optimization profiles are built from these."""

    name: str
    min: dict[str, int]
    opt: dict[str, int]
    max: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Profile:
        return cls(data["name"], dict(data["min"]), dict(data["opt"]), dict(data["max"]))


@dataclass(frozen=True)
class NetworkSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profiles: tuple[Profile, ...] = field(default=())

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Non-constant axes of every tensor, named by their expression (ONNX dim_param)."""
        axes: dict[str, dict[int, str]] = {}
        for spec in (*self.inputs, *self.outputs):
            dynamic = {i: str(d) for i, d in enumerate(spec.shape) if not isinstance(d, int)}
            if dynamic:
                axes[spec.name] = dynamic
        return axes

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "profiles": [p.to_json() for p in self.profiles],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NetworkSpec:
        return cls(
            data["name"],
            tuple(TensorSpec.from_json(t) for t in data["inputs"]),
            tuple(TensorSpec.from_json(t) for t in data["outputs"]),
            tuple(Profile.from_json(p) for p in data.get("profiles", [])),
        )


@dataclass(frozen=True)
class ModelDims:
    """The few numbers the network interfaces depend on, read off the checkpoints."""

    text_dim: int  # CLIP hidden size (1024 for SD2)
    num_tags: int  # RAM classes (4585)
    residual_channels: tuple[int, ...]  # ControlNet output channels, one per UNet skip (12 for SD2)
    residual_strides: tuple[int, ...]  # spatial stride of each skip relative to the latent
    mid_channels: int
    latent_channels: int = 4
    image_tokens: int = 145
    image_embed_dim: int = 512
    dape_size: int = 384
    text_tokens: int = 77

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelDims:
        data = dict(data)
        data["residual_channels"] = tuple(data["residual_channels"])
        data["residual_strides"] = tuple(data["residual_strides"])
        return cls(**data)


def _level(dim: str, stride: int) -> str:
    return dim if stride == 1 else f"ceil({dim}/{stride})"


def residual_specs(dims: ModelDims, dtype: str = "float32") -> tuple[list[TensorSpec], TensorSpec]:
    down = [
        TensorSpec(f"down_res_{i}", dtype, ("B", c, _level("h", s), _level("w", s)))
        for i, (c, s) in enumerate(zip(dims.residual_channels, dims.residual_strides))
    ]
    deepest = max(dims.residual_strides)
    mid = TensorSpec("mid_res", dtype, ("B", dims.mid_channels, _level("h", deepest), _level("w", deepest)))
    return down, mid


# Latent sizes: SD2-base works at 64x64 for 512 px; SeeSR's latent tile is 96.
# Batch 2 is the guided [uncond, cond] pair, batch 1 the unguided (guidance 1.0) case.
DENOISER_PROFILES = (
    Profile("512px", {"B": 1, "h": 64, "w": 64}, {"B": 2, "h": 64, "w": 64}, {"B": 2, "h": 64, "w": 64}),
    Profile("tile96", {"B": 1, "h": 96, "w": 96}, {"B": 2, "h": 96, "w": 96}, {"B": 2, "h": 96, "w": 96}),
    Profile("dynamic", {"B": 1, "h": 8, "w": 8}, {"B": 2, "h": 64, "w": 64}, {"B": 2, "h": 128, "w": 128}),
)
# The VAE sees the whole image (untiled up to 1088 px on the encoder side, as the official pipeline).
VAE_PROFILES = (
    Profile("512px", {"B": 1, "h": 64, "w": 64}, {"B": 1, "h": 64, "w": 64}, {"B": 1, "h": 64, "w": 64}),
    Profile("dynamic", {"B": 1, "h": 8, "w": 8}, {"B": 1, "h": 64, "w": 64}, {"B": 1, "h": 136, "w": 136}),
)
SINGLE_PROFILES = (Profile("batch", {"B": 1}, {"B": 1}, {"B": 2}),)


def network_specs(dims: ModelDims) -> dict[str, NetworkSpec]:
    """The public ONNX interface of every SeeSR network (C++ and Triton users code against it)."""
    f32, c = "float32", dims.latent_channels
    sample = TensorSpec("sample", f32, ("B", c, "h", "w"))
    timestep = TensorSpec("timestep", f32, ("B",))
    text = TensorSpec("encoder_hidden_states", f32, ("B", dims.text_tokens, dims.text_dim))
    image_embeds = TensorSpec("image_embeds", f32, ("B", dims.image_tokens, dims.image_embed_dim))
    down, mid = residual_specs(dims)
    specs = [
        NetworkSpec(
            "dape",
            (TensorSpec("image", f32, ("B", 3, dims.dape_size, dims.dape_size)),),
            (image_embeds, TensorSpec("tag_logits", f32, ("B", dims.num_tags))),
            SINGLE_PROFILES,
        ),
        NetworkSpec(
            "text_encoder",
            (TensorSpec("input_ids", "int64", ("B", dims.text_tokens)),),
            (TensorSpec("last_hidden_state", f32, ("B", dims.text_tokens, dims.text_dim)),),
            SINGLE_PROFILES,
        ),
        NetworkSpec(
            "controlnet",
            (
                sample,
                timestep,
                text,
                image_embeds,
                TensorSpec("controlnet_cond", f32, ("B", 3, "8*h", "8*w")),
                TensorSpec("conditioning_scale", f32, ()),
            ),
            (*down, mid),
            DENOISER_PROFILES,
        ),
        NetworkSpec(
            "unet",
            (sample, timestep, text, image_embeds, *down, mid),
            (TensorSpec("noise_pred", f32, ("B", c, "h", "w")),),
            DENOISER_PROFILES,
        ),
        NetworkSpec(
            "vae_encoder",
            (TensorSpec("image", f32, ("B", 3, "8*h", "8*w")),),
            (TensorSpec("mean", f32, ("B", c, "h", "w")), TensorSpec("logvar", f32, ("B", c, "h", "w"))),
            VAE_PROFILES,
        ),
        NetworkSpec(
            "vae_decoder",
            (TensorSpec("latent", f32, ("B", c, "h", "w")),),
            (TensorSpec("image", f32, ("B", 3, "8*h", "8*w")),),
            VAE_PROFILES,
        ),
    ]
    return {s.name: s for s in specs}


@dataclass(frozen=True)
class NetworkRole:
    """Where a network comes from and where it runs: the one table the exporter's model loading, cache
    keys and export order, and the runtime's stage order read."""

    name: str
    model: str  # the torch model it is traced from; networks sharing one (the VAE halves) load it once
    sources: tuple[str, ...]  # the checkout's file roles that shape its graphs (the build's cache key hashes them)
    call_order: int  # position in one upscale: tagger, prompt, VAE encode, per step ControlNet then UNet, decode
    export_order: int  # parallel builds start the largest first, so the UNet does not start last


NETWORK_TABLE = {
    role.name: role
    for role in (
        NetworkRole("dape", model="dape", sources=("ram", "dape"), call_order=0, export_order=3),
        NetworkRole("text_encoder", model="text_encoder", sources=("text_encoder",), call_order=1, export_order=2),
        NetworkRole("controlnet", model="controlnet", sources=("controlnet",), call_order=3, export_order=1),
        NetworkRole("unet", model="unet", sources=("unet",), call_order=4, export_order=0),
        NetworkRole("vae_encoder", model="vae", sources=("vae",), call_order=2, export_order=4),
        NetworkRole("vae_decoder", model="vae", sources=("vae",), call_order=5, export_order=4),
    )
}
NETWORK_NAMES = tuple(NETWORK_TABLE)  # the manifest's order
NETWORK_CALL_ORDER = tuple(sorted(NETWORK_NAMES, key=lambda n: NETWORK_TABLE[n].call_order))


def part_of(name: str, network: str) -> bool:
    """Whether the network or tiled-VAE segment ``name`` is ``network`` or one of its segments ("vae_decoder#2")."""
    return name == network or name.startswith(network + "#")


def networks_of_model() -> dict[str, tuple[str, ...]]:
    """torch model -> the networks traced from it."""
    models: dict[str, tuple[str, ...]] = {}
    for role in NETWORK_TABLE.values():
        models.setdefault(role.model, ())
        models[role.model] += (role.name,)
    return models


def networks_by_size(names: Iterable[str]) -> list[str]:
    """``names``, largest network first."""
    return sorted(names, key=lambda n: NETWORK_TABLE[n].export_order)


# The int8 policy: int8 bundles quantize the two networks called every step, where int8 pays; the others
# run a fallback graph: fp32 on onnxruntime and OpenVINO, fp16 engines on TensorRT.
INT8_NETWORKS = ("controlnet", "unet")
INT8_FALLBACK = "fp32"
INT8_ENGINE_FALLBACK = "fp16"


def graph_for_precision(files: dict[str, Any], precision: str, int8_fallback: str = INT8_FALLBACK) -> str:
    """Which of a network's graphs (its manifest ``files``) runs at ``precision``: its own, except that a
    network int8 left alone runs ``int8_fallback``."""
    if precision == "int8" and "int8" not in files:
        return int8_fallback
    return precision


def dummy_feeds(
    spec: NetworkSpec, env: dict[str, int], seed: int = 0, vocab: int = 49408, conditioning_scale: float = 1.0
) -> dict[str, Array]:
    """Random inputs of ``spec`` at the named dimensions ``env``, in ranges the networks see in use:
    token ids below ``vocab``, whole timesteps in [1, 999] as float, the ControlNet's image in [0, 1] and
    its residuals at their small scale, a 0-d ``conditioning_scale``, standard normal for the rest
    (latents, embeddings, normalized images). Tracing, the build's parity check and the benchmarks use
    these; the parity errors a bundle records depend on the exact values."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, Array] = {}
    for tensor in spec.inputs:
        shape = tensor.concrete_shape(env)
        value: Array
        if tensor.dtype == "int64":
            value = rng.integers(0, vocab, shape, dtype=np.int64)
        elif tensor.name == "timestep":
            value = rng.integers(1, 1000, shape).astype(np.float32)
        elif tensor.name == "conditioning_scale":
            value = np.array(conditioning_scale, dtype=np.float32)
        elif tensor.name == "controlnet_cond":
            value = rng.random(shape, dtype=np.float32)
        elif tensor.name.endswith("_res"):
            value = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            value = rng.standard_normal(shape).astype(np.float32)
        feeds[tensor.name] = value.astype(tensor.dtype) if tensor.dtype == "float16" else value
    return feeds
