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

import logging
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from . import options as option_table
from .backends import Backend, create_backend, run_on_device, to_device
from .errors import BundleError, ImageRejected, InputError, OptionError
from .imaging import (
    COLOR_FIXES,
    dape_input,
    gaussian_tile_weights,
    needs_latent_tiles,
    select_tags,
    tile_origins,
    to_chw,
    to_uint8_rounded,
    working_image,
)
from .manifest import Manifest
from .memory_plan import ENGINE_MEMORY, STAGE_NETWORKS, MemoryPlan, Workload, engine_key, graph_sizes, plan_memory
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

log = logging.getLogger(__name__)


@dataclass
class UpscaleResult:
    image: Image.Image
    tags: str
    prompt: str
    latents: list[FloatArray] = field(default_factory=list)  # [1, 4, h, w] float32 after every step
    memory_plan: MemoryPlan | None = None  # what was resident when, and the tiling (under a memory budget)


class SeeSRPipeline:
    def __init__(
        self,
        manifest: Manifest,
        backend: Backend,
        profiler: StageProfiler | None = None,
        tiled_vae_spill_dir: str | Path | None = None,
        memory_budget: int | str | None = None,
    ):
        """``profiler``: record every stage and network call (``seesr bench``); None costs nothing.
        ``tiled_vae_spill_dir``: keep the tiled VAE's waiting tile states in files there (resident
        memory then stays near one tile's worth for any image size; see ``tiled_vae.TileStates``).
        ``memory_budget``: bytes, or text as "4GB" (the ``memory_budget`` option): each upscale is planned to
        stay under it (``memory_plan``); None: every network stays loaded once used."""
        self.manifest, self.profiler = manifest, profiler
        self.tiled_vae_spill_dir = tiled_vae_spill_dir
        self.memory_budget = None if memory_budget is None else option_table.check("memory_budget", memory_budget)
        if self.memory_budget is not None:
            _check_budget_backend(backend)
        self._network_bytes: tuple[dict[str, int], dict[str, int], dict[str, int]] | None = None
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
        memory_budget: int | str | None = None,
        **backend_options: Any,
    ) -> SeeSRPipeline:
        """``verify``: the sha256 check of the bundle's files, see ``Manifest.load`` ("auto": files new or
        changed since their last check; "always"/True; "never"/False for callers that verify otherwise).
        ``memory_budget``: see ``__init__``; under one, the openvino backend maps its weights from files
        (``map_weights``)."""
        if memory_budget is not None:  # a bad value fails before the bundle loads
            memory_budget = option_table.check("memory_budget", memory_budget)
            if backend == "openvino":
                backend_options.setdefault("map_weights", True)
        manifest = Manifest.load(bundle, verify=verify)
        return cls(
            manifest,
            create_backend(backend, manifest, **backend_options),
            profiler,
            tiled_vae_spill_dir,
            memory_budget,
        )

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

    def run_vae(
        self, network: str, x: FloatArray, tile: int, tiled: bool = True, plan: MemoryPlan | None = None
    ) -> list[Array]:
        """A VAE half on the whole input, or, above the official threshold (the longer side over
        tile + 2 * pad), the official tiled VAE: padded tiles, GroupNorm statistics shared across
        tiles (``tiled_vae.py``). ``tiled=False`` always runs untiled (a deviation; memory grows
        with the image). ``plan``: a staged memory plan frees each segment when every tile has passed
        it, and may spill the waiting tiles to files."""
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
        spill_dir = self.tiled_vae_spill_dir
        if plan is not None and network in plan.spill and spill_dir is None:
            spill_dir = tempfile.gettempdir()
        backend: Any = self.backend  # a staged plan's backend can release (``_check_budget_backend``)
        staged = plan is not None and plan.staged
        segment_done = backend.release if staged else done
        # staged, one tile shape at a time holds working memory (the plan counts the largest only)
        shape_done = done if staged else None
        return run_tiled_vae(self.backend.run, network, segments, x, tile, spill_dir, segment_done, shape_done)

    def lr_latent(
        self,
        work: FloatArray,
        initial_noise: FloatArray,
        noise: Noise,
        scheduler: DDPMScheduler,
        vae_tile: int,
        tiled: bool = True,
        plan: MemoryPlan | None = None,
    ) -> FloatArray:
        """Sample the VAE posterior of the working image, scale it, and noise it to t=999."""
        mean, logvar = self.run_vae("vae_encoder", work * np.float32(2.0) - np.float32(1.0), vae_tile, tiled, plan)
        sample = mean + np.exp(np.float32(0.5) * logvar) * noise("posterior", mean.shape)
        return scheduler.add_noise(sample * self.scaling_factor, initial_noise, self.start_step)

    def decode(
        self,
        latents: FloatArray,
        tile: int = option_table.default("vae_decoder_tile_size"),
        tiled: bool = True,
        plan: MemoryPlan | None = None,
    ) -> Image.Image:
        """VAE decode to a uint8 image."""
        image = self.run_vae("vae_decoder", latents / self.scaling_factor, tile, tiled, plan)[0]
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
        plan = self.memory_plan(lr.size, o)  # an impossible budget fails here, before any network runs
        if plan is not None and plan.budget is not None:
            o.update(latent_tile_size=plan.latent_tile_size, vae_encoder_tile_size=plan.vae_encoder_tile_size)
            o.update(vae_decoder_tile_size=plan.vae_decoder_tile_size)
        staged = plan if plan is not None and plan.staged else None
        if plan is not None and hasattr(self.backend, "compress_linear"):
            self.backend.compress_linear(plan.int8_linear)
        with self._loaded("tag", staged):
            tags, image_embeds = self.tag(lr)
        prompt = self.prompt_template.format(tags=tags, prompt=o["prompt"], added_prompt=o["added_prompt"])

        with self._stage("preprocess"):
            work = working_image(lr, o["process_size"], o["upscale"])
            control = to_chw(work)
        guided = o["guidance"] > 1.0
        with self._loaded("prompt", staged):
            text_embeds = self.text.encode(prompt)
            if guided:  # every batched tensor is [uncond, cond]
                text_embeds = np.concatenate([self.text.encode_negative(o["negative_prompt"]), text_embeds])
        if guided:
            image_embeds = np.concatenate([image_embeds, image_embeds])
            control = np.concatenate([control, control])
        # Constant for the whole sampling loop: a backend may copy them to its device once here.
        text_embeds, image_embeds, control = (to_device(self.backend, x) for x in (text_embeds, image_embeds, control))

        scheduler = DDPMScheduler(self.scheduler_config)
        scheduler.set_timesteps(o["steps"])
        shape = (1, 4, work.size[1] // 8, work.size[0] // 8)
        latents = noise("initial", shape) * np.float32(scheduler.init_noise_sigma)
        if o["start_point"] == "lr":
            with self._loaded("encode", staged):
                latents = self.lr_latent(
                    to_chw(work), latents, noise, scheduler, o["vae_encoder_tile_size"], o["tiled_vae"], staged
                )

        history: list[FloatArray] = []
        with self._loaded("denoise", staged):
            self._denoise(latents, o, history, scheduler, noise, shape, text_embeds, image_embeds, control, callback)
        latents = history[-1] if history else latents

        with self._loaded("decode", staged):
            decoded = self.decode(latents, o["vae_decoder_tile_size"], o["tiled_vae"], staged)
        with self._stage("postprocess"):
            result = COLOR_FIXES[o["color_fix"]](decoded, work)
            result = result.resize((lr.size[0] * o["upscale"], lr.size[1] * o["upscale"]), Image.Resampling.BICUBIC)
        return UpscaleResult(image=result, tags=tags, prompt=prompt, latents=history, memory_plan=plan)

    def _denoise(
        self,
        latents: FloatArray,
        o: dict[str, Any],
        history: list[FloatArray],
        scheduler: DDPMScheduler,
        noise: Noise,
        shape: tuple[int, int, int, int],
        text_embeds: Constant,
        image_embeds: Constant,
        control: Constant,
        callback: Callable[[int, int], None] | None,
    ) -> None:
        """The sampling loop: appends the latent after every step to ``history``."""
        guided = o["guidance"] > 1.0
        tiled = needs_latent_tiles(shape[2], shape[3], o["latent_tile_size"])
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
            log.debug(f"step {i + 1}/{len(scheduler.timesteps)} done")
            if callback is not None:
                callback(i, t)

    # ------------------------------------------------------------ memory

    def memory_plan(self, lr_size: tuple[int, int], options: dict[str, Any]) -> MemoryPlan | None:
        """The memory plan of an upscale of an LR image of ``lr_size`` with the resolved ``options``: under
        the budget (OptionError naming the smallest that would do where none fits), or, without one, the
        plan that keeps everything resident (for ``-v``; None where this backend's memory is not modelled)."""
        if self.memory_budget is None and not log.isEnabledFor(logging.DEBUG):
            return None  # nothing to plan, nothing to print
        key = engine_key(self.backend.name, _arithmetic(self.backend))
        if key not in ENGINE_MEMORY:
            return None
        weights, embedded, segments = self._graph_bytes()
        workload = Workload.of(*lr_size, options)
        engine = f"{self.backend.name} {getattr(self.backend, 'requested_precision', _arithmetic(self.backend))}"
        prepared = getattr(self.backend, "prepared", lambda: ())()
        plan = plan_memory(
            workload, weights, ENGINE_MEMORY[key], engine, self.memory_budget, segments, embedded, prepared
        )
        for line in plan.lines():
            log.debug(line)
        for change in plan.changed:
            log.info(
                f"note: to stay under the memory budget: {change} (the image differs slightly from an unbudgeted one)"
            )
        return plan

    def _graph_bytes(self) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
        """The graph bytes of each network as this backend runs it, the part embedded in the graph file, and
        the bytes of each VAE half's largest segment."""
        if self._network_bytes is None:
            backend: Any = self.backend
            networks = list(self.manifest.data["networks"])
            sizes = graph_sizes(self.manifest, {n: backend.graph_precision(n) for n in networks})
            segments = {}
            for half in ("vae_encoder", "vae_decoder"):
                tiled = self.manifest.tiled_vae(half)
                if tiled is not None:
                    count = len(tiled["segments"])
                    parts = graph_sizes(self.manifest, {f"{half}#{k}": "fp32" for k in range(count)})
                    segments[half] = max(part.total for part in parts.values())
            weights = {n: size.total for n, size in sizes.items()}
            self._network_bytes = weights, {n: size.embedded for n, size in sizes.items()}, segments
        return self._network_bytes

    @contextmanager
    def _loaded(self, stage: str, plan: MemoryPlan | None) -> Iterator[None]:
        """One stage of an upscale. Staged (``plan``), only its networks are loaded during it (networks other
        calls left loaded are freed first) and they are freed when it ends, error or not."""
        networks = STAGE_NETWORKS[stage]
        log.debug(f"memory: stage {stage} starts ({'+'.join(networks)})")
        if plan is not None:
            backend: Any = self.backend
            for leftover in sorted({name.partition("#")[0] for name in backend.resident()} - set(networks)):
                backend.release(leftover)
        try:
            yield
        finally:
            if plan is not None:
                for network in networks:
                    backend.release(network)
            log.debug(f"memory: stage {stage} ends" + (f" (freed {'+'.join(networks)})" if plan is not None else ""))

    def resolve_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Every option of a call: ``options`` (None: not set) over the bundle's defaults, checked."""
        return option_table.resolve(options, self.defaults)


def _arithmetic(backend: Any) -> str:
    """The precision a CPU backend computes in: OpenVINO's inference precision, onnxruntime's graphs."""
    return str(getattr(backend, "inference_precision", None) or getattr(backend, "precision", "fp32"))


def _check_budget_backend(backend: Any) -> None:
    """OptionError unless ``backend`` can free networks between stages and its memory is modelled: the
    openvino backend, onnxruntime on the CPU."""
    if not hasattr(backend, "release") or getattr(backend, "device", "cpu") not in ("cpu", "CPU"):
        raise OptionError(
            f"memory_budget plans host memory for the CPU backends (openvino on the CPU, onnxruntime with the "
            f"CPU provider); this pipeline runs {backend.name} on {getattr(backend, 'device', 'a GPU')}",
            "memory_budget",
        )
    if engine_key(backend.name, _arithmetic(backend)) not in ENGINE_MEMORY:
        modelled = sorted(" ".join(key) for key in ENGINE_MEMORY)
        raise OptionError(
            f"memory_budget: the memory of {backend.name} at {_arithmetic(backend)} is not measured (measured: "
            f"{modelled})",
            "memory_budget",
        )


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
