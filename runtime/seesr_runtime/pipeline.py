"""SeeSR x4 super-resolution, top to bottom, in numpy over a bundle's networks.

    lr image ──DAPE──> tags (hard prompt) + 145x512 image embeddings (soft prompt)
             ──resize──> working image (x4, multiple of 8) ──> ControlNet condition
    prompt = "{tags}, {user prompt}," + added prompt ──CLIP──> text embeddings
    latent = VAE posterior sample of the working image, noised to t=999
    50 DDPM steps: ControlNet residuals + UNet noise, guided 5.5 over [uncond, cond]
    VAE decode (tiled above 246 latent px) ──> colour fix (adain) ──> resize to 4x the input

Faithful to the official ``test_seesr.py`` / ``pipeline_seesr.py``, including its tiled VAE for
large images (``tiled_vae.py``). Every random draw goes through ``noise(kind, shape)`` in the
official order (initial latent noise, VAE posterior noise, one per
step), so a caller can replay another implementation's stream via ``noise_fn``.

Twin: ``seesr_export.reference.SeeSRReference`` runs the same loop in torch; the two are held equal,
same noise, by ``tests/test_runtime_parity.py::test_runtime_matches_reference`` (latent tiling,
guidance, start points and colour fixes among its cases) and, for the tiled VAE,
``tests/test_tiled_vae.py::test_decoded_image_within_one_level_of_the_reference``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from . import options as option_table
from .backends import Backend, create_backend, run_on_device, to_device
from .errors import BundleError, ImageRejected, InputError
from .imaging import (
    COLOR_FIXES,
    dape_input,
    gaussian_tile_weights,
    select_tags,
    tile_origins,
    to_chw,
    to_uint8_rounded,
    working_image,
)
from .manifest import Manifest
from .profiling import ProfiledBackend, StageProfiler
from .scheduler import DDPMScheduler
from .tensors import Array, FloatArray
from .text import PromptEncoder
from .tiled_vae import TiledVaeLayout, run_tiled_vae

NoiseFn = Callable[[str, tuple[int, ...]], npt.ArrayLike]  # a caller's noise: (kind, shape) -> array
Noise = Callable[[str, tuple[int, ...]], FloatArray]  # the pipeline's: float32 of exactly that shape
# A per-image constant (embeddings, control image): an array, or the backend's device copy of it
# (``backends.to_device``), which the pipeline only passes on and slices.
Constant = Any
OPTIONS = option_table.NAMES  # described in options.py


@dataclass
class UpscaleResult:
    image: Image.Image
    tags: str
    prompt: str
    latents: list[FloatArray] = field(default_factory=list)  # [1, 4, h, w] float32 after every step


class SeeSRPipeline:
    def __init__(
        self,
        manifest: Manifest,
        backend: Backend,
        profiler: StageProfiler | None = None,
        tiled_vae_spill_dir: str | Path | None = None,
    ):
        """``profiler``: record every stage and network call (``seesr bench``); None costs nothing.
        ``tiled_vae_spill_dir``: keep the tiled VAE's waiting tile states in files there (resident
        memory then stays near one tile's worth for any image size; see ``tiled_vae.TileStates``)."""
        self.manifest, self.profiler = manifest, profiler
        self.tiled_vae_spill_dir = tiled_vae_spill_dir
        self.backend = ProfiledBackend(backend, profiler) if profiler is not None else backend
        pipeline, tagger = manifest.data["pipeline"], manifest.data["tagger"]
        self.defaults = option_table.defaults_from_manifest(pipeline)
        self.scheduler_config = {k: v for k, v in pipeline["scheduler"].items() if k != "type"}
        self.scaling_factor = np.float32(pipeline["vae_scaling_factor"])
        self.start_step = pipeline["start_step"]
        self.prompt_template = pipeline["prompt_template"]
        self.tags = tagger["tags"]
        self.thresholds = np.asarray(tagger["thresholds"], dtype=np.float32)
        self.tagger = tagger
        self.text = PromptEncoder(manifest, self.backend)
        check_feeds(manifest)

    @classmethod
    def from_bundle(
        cls,
        bundle: str | Path,
        backend: str = "onnxruntime",
        verify: str | bool = "auto",
        profiler: StageProfiler | None = None,
        tiled_vae_spill_dir: str | Path | None = None,
        **backend_options: Any,
    ) -> SeeSRPipeline:
        """``verify``: the sha256 check of the bundle's files, see ``Manifest.load`` ("auto": files new or
        changed since their last check; "always"/True; "never"/False for callers that verify otherwise)."""
        manifest = Manifest.load(bundle, verify=verify)
        return cls(manifest, create_backend(backend, manifest, **backend_options), profiler, tiled_vae_spill_dir)

    def _stage(self, name: str) -> AbstractContextManager[None]:
        return self.profiler.stage(name) if self.profiler is not None else nullcontext()

    # ------------------------------------------------------------ stages

    def tag(self, lr: Image.Image) -> tuple[str, FloatArray]:
        """DAPE: the tag string and the [1, 145, 512] image embeddings."""
        with self._stage("preprocess"):
            image = dape_input(lr, self.tagger["input_size"], self.tagger["mean"], self.tagger["std"])
        image_embeds, tag_logits = self.backend.run("dape", {"image": image})
        return select_tags(tag_logits[0], self.tags, self.thresholds), image_embeds

    def predict_noise(
        self,
        latents: FloatArray,
        t: int,
        text_embeds: Constant,
        image_embeds: Constant,
        control: Constant,
        conditioning_scale: float,
    ) -> FloatArray:
        """ControlNet residuals, then the UNet's noise prediction, for one (possibly tiled) window."""
        timestep = np.full((latents.shape[0],), t, dtype=np.float32)
        common = {
            "sample": latents,
            "timestep": timestep,
            "encoder_hidden_states": text_embeds,
            "image_embeds": image_embeds,
        }
        # The residuals only feed the UNet: a backend may keep them on its device.
        residuals = run_on_device(
            self.backend,
            "controlnet",
            {
                **common,
                "controlnet_cond": control,
                "conditioning_scale": np.array(conditioning_scale, dtype=np.float32),
            },
        )
        names = self.manifest.spec("controlnet").output_names
        eps: FloatArray = self.backend.run("unet", {**common, **dict(zip(names, residuals))})[0]
        return eps

    def predict_noise_tiled(
        self,
        latents: FloatArray,
        t: int,
        text_embeds: Constant,
        image_embeds: Constant,
        control: Constant,
        conditioning_scale: float,
        tile: int,
        overlap: int,
    ) -> FloatArray:
        """Overlapping latent tiles blended with the official (asymmetric) Gaussian weights."""
        _, _, h, w = latents.shape
        tile = min(tile, h, w)
        weights = gaussian_tile_weights(tile)
        total = np.zeros(latents.shape, dtype=np.float32)
        contributors = np.zeros(latents.shape, dtype=np.float32)
        for y, x in tile_origins(h, w, tile, overlap):
            window = np.s_[:, :, y : y + tile, x : x + tile]
            pixels = np.s_[:, :, 8 * y : 8 * (y + tile), 8 * x : 8 * (x + tile)]
            eps = self.predict_noise(latents[window], t, text_embeds, image_embeds, control[pixels], conditioning_scale)
            total[window] += eps * weights  # float64 product, accumulated in float32, as the official code
            contributors[window] += weights
        return total / contributors

    def run_vae(self, network: str, x: FloatArray, tile: int, tiled: bool = True) -> list[Array]:
        """A VAE half on the whole input, or, above the official threshold (the longer side over
        tile + 2 * pad), the official tiled VAE: padded tiles, GroupNorm statistics shared across
        tiles (``tiled_vae.py``). ``tiled=False`` always runs untiled (a deviation; memory grows
        with the image)."""
        layout = TiledVaeLayout.for_half(network.removeprefix("vae_"))
        # Each VAE half runs once per image: a backend that can may free its working memory after it.
        done: Callable[[str], None] = getattr(self.backend, "release_working_memory", lambda network: None)
        if not tiled or not layout.needs_tiling(x.shape[2], x.shape[3], tile):
            outputs = self.backend.run(network, {self.manifest.spec(network).input_names[0]: x})
            done(network)
            return outputs
        segments = self.manifest.tiled_vae(network)
        if segments is None:
            raise BundleError(
                f"{self.manifest.root}: this bundle has no tiled-VAE graphs for {network}, which a "
                f"{x.shape[3]}x{x.shape[2]} input needs; rebuild it with this version of "
                "`seesr-export build`, or pass tiled_vae=False (--no-tiled-vae) to run the VAE untiled"
            )
        return run_tiled_vae(self.backend.run, network, segments, x, tile, self.tiled_vae_spill_dir, done)

    def lr_latent(
        self,
        work: FloatArray,
        initial_noise: FloatArray,
        noise: Noise,
        scheduler: DDPMScheduler,
        vae_tile: int,
        tiled: bool = True,
    ) -> FloatArray:
        """Sample the VAE posterior of the working image, scale it, and noise it to t=999."""
        mean, logvar = self.run_vae("vae_encoder", work * np.float32(2.0) - np.float32(1.0), vae_tile, tiled)
        sample = mean + np.exp(np.float32(0.5) * logvar) * noise("posterior", mean.shape)
        return scheduler.add_noise(sample * self.scaling_factor, initial_noise, self.start_step)

    def decode(
        self, latents: FloatArray, tile: int = option_table.default("vae_decoder_tile_size"), tiled: bool = True
    ) -> Image.Image:
        """VAE decode to a uint8 image."""
        image = self.run_vae("vae_decoder", latents / self.scaling_factor, tile, tiled)[0]
        return Image.fromarray(to_uint8_rounded(image))

    # ------------------------------------------------------------ the whole pipeline

    def __call__(
        self,
        image: Image.Image | npt.ArrayLike,
        *,
        seed: int | None = None,
        noise_fn: NoiseFn | None = None,
        callback: Callable[[int, int], None] | None = None,
        **options: Any,
    ) -> UpscaleResult:
        """Upscale ``image`` (a PIL image or an HxWx3 uint8 array). ``options``: any of ``options.OPTIONS``
        (None or left out: the bundle's default); a bad value raises OptionError, an unusable image
        ImageRejected, before any network runs."""
        o = self.resolve_options({**options, "seed": seed})
        noise = _noise_source(noise_fn, o["seed"])
        with self._stage("preprocess"):
            lr = as_rgb(image, o["max_pixels"])
        tags, image_embeds = self.tag(lr)
        prompt = self.prompt_template.format(tags=tags, prompt=o["prompt"], added_prompt=o["added_prompt"])

        with self._stage("preprocess"):
            work = working_image(lr, o["process_size"], o["upscale"])
            control = to_chw(work)
        text_embeds = self.text.encode(prompt)
        guided = o["guidance"] > 1.0
        if guided:  # every batched tensor is [uncond, cond]
            text_embeds = np.concatenate([self.text.encode_negative(o["negative_prompt"]), text_embeds])
            image_embeds = np.concatenate([image_embeds, image_embeds])
            control = np.concatenate([control, control])
        # Constant for the whole sampling loop: a backend may copy them to its device once here.
        text_embeds, image_embeds, control = (to_device(self.backend, x) for x in (text_embeds, image_embeds, control))

        scheduler = DDPMScheduler(self.scheduler_config)
        scheduler.set_timesteps(o["steps"])
        shape = (1, 4, work.size[1] // 8, work.size[0] // 8)
        latents = noise("initial", shape) * np.float32(scheduler.init_noise_sigma)
        if o["start_point"] == "lr":
            latents = self.lr_latent(
                to_chw(work), latents, noise, scheduler, o["vae_encoder_tile_size"], o["tiled_vae"]
            )

        tiled = shape[2] * shape[3] > o["latent_tile_size"] ** 2
        history: list[FloatArray] = []
        for i, t in enumerate(scheduler.timesteps.tolist()):
            with self._stage("denoise_step"):
                model_input = np.concatenate([latents, latents]) if guided else latents
                if tiled:
                    eps = self.predict_noise_tiled(
                        model_input,
                        t,
                        text_embeds,
                        image_embeds,
                        control,
                        o["conditioning_scale"],
                        o["latent_tile_size"],
                        o["latent_tile_overlap"],
                    )
                else:
                    eps = self.predict_noise(
                        model_input, t, text_embeds, image_embeds, control, o["conditioning_scale"]
                    )
                with self._stage("scheduler_step"):
                    if guided:
                        eps_uncond, eps_text = eps[:1], eps[1:]
                        eps = eps_uncond + np.float32(o["guidance"]) * (eps_text - eps_uncond)
                    latents = scheduler.step(eps, t, latents, noise("step", shape))
            history.append(latents)
            if callback is not None:
                callback(i, t)

        decoded = self.decode(latents, o["vae_decoder_tile_size"], o["tiled_vae"])
        with self._stage("postprocess"):
            result = COLOR_FIXES[o["color_fix"]](decoded, work)
            result = result.resize((lr.size[0] * o["upscale"], lr.size[1] * o["upscale"]), Image.Resampling.BICUBIC)
        return UpscaleResult(image=result, tags=tags, prompt=prompt, latents=history)

    def resolve_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Every option of a call: ``options`` (None: not set) over the bundle's defaults, checked."""
        return option_table.resolve(options, self.defaults)


def as_rgb(image: object, max_pixels: int = option_table.default("max_pixels")) -> Image.Image:
    """A PIL image or an HxWx3 uint8 array, as an RGB PIL image; ImageRejected for anything else, an
    image with a side under ``options.MIN_SIDE`` or one of more than ``max_pixels`` pixels."""
    if isinstance(image, Image.Image):
        option_table.check_image_size(*image.size, max_pixels)
        return image.convert("RGB")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ImageRejected(f"expected a PIL image or an HxWx3 uint8 array, got {array.dtype} {array.shape}")
    option_table.check_image_size(array.shape[1], array.shape[0], max_pixels)
    return Image.fromarray(array)


def _noise_source(noise_fn: NoiseFn | None, seed: int) -> Noise:
    if noise_fn is None:
        rng = np.random.default_rng(seed)
        return lambda kind, shape: rng.standard_normal(shape, dtype=np.float32)

    def draw(kind: str, shape: tuple[int, ...]) -> FloatArray:
        value = np.asarray(noise_fn(kind, tuple(shape)), dtype=np.float32)
        if value.shape != tuple(shape):
            raise InputError(f"noise_fn returned shape {value.shape} for {kind!r}, expected {tuple(shape)}")
        return value

    return draw


# The inputs this pipeline (and PromptEncoder) feeds each network, by name. The UNet also takes the
# ControlNet's outputs, and each VAE half its one input, whatever the bundle names them.
DENOISER_FEEDS = ("sample", "timestep", "encoder_hidden_states", "image_embeds")
PIPELINE_FEEDS = {
    "dape": ("image",),
    "text_encoder": ("input_ids",),
    "controlnet": (*DENOISER_FEEDS, "controlnet_cond", "conditioning_scale"),
}


def check_feeds(manifest: Manifest) -> None:
    """Refuse a bundle whose networks take other inputs than this pipeline feeds (once per pipeline;
    networks the bundle lacks fail when first called, as before)."""
    networks = manifest.data["networks"]
    expected: dict[str, Sequence[str]] = dict(PIPELINE_FEEDS)
    if "controlnet" in networks:
        expected["unet"] = (*DENOISER_FEEDS, *manifest.spec("controlnet").output_names)
    for network in ("vae_encoder", "vae_decoder"):
        if network in networks:  # any one name: the pipeline feeds the VAE by position
            expected[network] = manifest.spec(network).input_names[:1]
    for network, names in expected.items():
        declared = manifest.spec(network).input_names if network in networks else list(names)
        if list(names) != declared:
            raise BundleError(
                f"{manifest.root}: the {network} graph takes inputs {declared}, but this runtime "
                f"feeds it {list(names)}; the bundle was built for another version of the runtime"
            )
