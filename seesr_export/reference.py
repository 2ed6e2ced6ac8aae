"""The torch reference pipeline: SeeSR's official inference, fp32 on CPU.

This is the oracle every exported graph and the torch-free runtime are
compared against, so it follows ``test_seesr.py`` and
``pipelines/pipeline_seesr.py`` step by step,
with one addition: every random draw goes through ``noise_fn`` so a test can
inject the same noise into the runtime.

Large images go through the official tiled VAE (GroupNorm statistics shared
across padded tiles, ``tiled_vae.py``) above 1088 px on the encoder side and
246 latent px on the decoder side, as the official pipeline does.

Twins in the runtime (numpy): ``SeeSRReference`` ↔ ``seesr_runtime.pipeline.SeeSRPipeline``, the colour
fixes ↔ ``seesr_runtime.imaging``, ``ddpm_step`` (diffusers) ↔ ``seesr_runtime.scheduler``; the tests
that hold each pair equal are named in the runtime modules' docstrings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image

from seesr_runtime import options as option_table
from seesr_runtime.imaging import gaussian_tile_weights, tile_origins, working_image
from seesr_runtime.tiled_vae import TiledVaeLayout

from .layout import SeeSRPaths
from .models.dape import load_dape, load_tag_list, select_tags
from .models.denoiser import load_seesr_controlnet, load_seesr_unet
from .models.sd2 import load_scheduler_config, load_text_encoder, load_tokenizer, load_vae
from .tiled_vae import tiled_forward

NoiseFn = Callable[[str, tuple], "np.ndarray | torch.Tensor"]

DEFAULT_ADDED_PROMPT = option_table.default("added_prompt")
DEFAULT_NEGATIVE_PROMPT = option_table.default("negative_prompt")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DAPE_SIZE = 384
START_STEP = 999  # the LR latent is noised to t=999 whatever the first sampled timestep is


# ---------------------------------------------------------------- geometry
# Geometry and tile layout are plain PIL/numpy, shared with the runtime (and checked
# against the official pipeline end to end); the networks and colour fix here are torch.


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> float [1, 3, H, W] in [0, 1] (torchvision's ToTensor)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array.transpose(2, 0, 1).copy())[None]


def dape_input(lr: Image.Image) -> torch.Tensor:
    """DAPE's input: the original LR as a tensor, bilinear-resized to 384 without antialias
    (torchvision 0.15 did not antialias tensors), ImageNet-normalised."""
    x = F.interpolate(to_tensor(lr), size=(DAPE_SIZE, DAPE_SIZE), mode="bilinear", align_corners=False, antialias=False)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


# ---------------------------------------------------------------- colour fix


def _to_uint8_truncating(x: torch.Tensor) -> Image.Image:
    # torchvision's ToPILImage: x*255 then byte(), i.e. truncation, not rounding.
    array = (x.clamp(0.0, 1.0)[0] * 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def adain_color_fix(target: Image.Image, source: Image.Image) -> Image.Image:
    t, s = to_tensor(target), to_tensor(source)

    def stats(x):
        flat = x.reshape(1, 3, -1)
        return flat.mean(dim=2).view(1, 3, 1, 1), (flat.var(dim=2) + 1e-5).sqrt().view(1, 3, 1, 1)

    t_mean, t_std = stats(t)
    s_mean, s_std = stats(s)
    return _to_uint8_truncating((t - t_mean) / t_std * s_std + s_mean)


def _wavelet_blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=x.dtype) / 16
    kernel = kernel[None, None].repeat(3, 1, 1, 1)
    x = F.pad(x, (radius,) * 4, mode="replicate")
    return F.conv2d(x, kernel, groups=3, dilation=radius)


def _wavelet_split(x: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    high = torch.zeros_like(x)
    for i in range(levels):
        low = _wavelet_blur(x, 2**i)
        high += x - low
        x = low
    return high, x


def wavelet_color_fix(target: Image.Image, source: Image.Image) -> Image.Image:
    target_high, _ = _wavelet_split(to_tensor(target))
    _, source_low = _wavelet_split(to_tensor(source))
    return _to_uint8_truncating(target_high + source_low)


# ---------------------------------------------------------------- sampler


def ddpm_step(scheduler, eps: torch.Tensor, t: int, sample: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One DDPM step (epsilon prediction, fixed_small variance) with the variance noise given."""
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    a_t = scheduler.alphas_cumprod[t]
    a_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.one
    beta_t = 1 - a_t / a_prev
    x0 = (sample - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    if scheduler.config.clip_sample:
        r = scheduler.config.clip_sample_range
        x0 = x0.clamp(-r, r)
    mean = (a_prev**0.5 * beta_t / (1 - a_t)) * x0 + ((a_t / a_prev) ** 0.5 * (1 - a_prev) / (1 - a_t)) * sample
    if t <= 0:
        return mean
    variance = torch.clamp((1 - a_prev) / (1 - a_t) * beta_t, min=1e-20)
    return mean + variance**0.5 * noise


@torch.no_grad()
def encode_prompt(tokenizer, text_encoder, text: str) -> torch.Tensor:
    """CLIP last hidden state of ``text``: 77 tokens, truncated, padded with id 0, no attention mask."""
    ids = tokenizer(
        text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


@dataclass
class ReferenceResult:
    image: Image.Image
    tags: str
    prompt: str
    latents: list = field(default_factory=list)  # latents after every step, [1, 4, h, w]


class SeeSRReference:
    """All SeeSR networks in torch, driven exactly as the official pipeline drives them.

    fp32 on the CPU by default (the oracle); ``.to("cuda", torch.float16)`` gives the
    official fp16 GPU configuration for benchmarks. ``profiler`` (a
    ``seesr_runtime.profiling.StageProfiler``) records the same stages as the runtime;
    on CUDA they are timed with events.
    """

    defaults: dict | None = None  # option defaults over the table's (SeeSR-turbo's: seesr_export.turbo)

    def __init__(
        self, dape, tag_list, tag_thresholds, tokenizer, text_encoder, vae, unet, controlnet, scheduler_config: dict
    ):
        self.dape, self.tag_list, self.tag_thresholds = dape, tag_list, tag_thresholds
        self.tokenizer, self.text_encoder, self.vae = tokenizer, text_encoder, vae
        self.unet, self.controlnet = unet, controlnet
        self.scheduler = DDPMScheduler.from_config(scheduler_config)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.profiler, self._pending = None, []

    def to(self, device, dtype: torch.dtype = torch.float32) -> SeeSRReference:
        self.device, self.dtype = torch.device(device), dtype
        for model in (self.dape, self.text_encoder, self.vae, self.unet, self.controlnet):
            model.to(self.device, dtype)
        return self

    def _put(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, self.dtype)

    @contextmanager
    def _stage(self, name: str):
        if self.profiler is None:
            yield
        elif self.device.type != "cuda":
            with self.profiler.stage(name):
                yield
        else:  # events, resolved once per image, so timing adds no synchronisation between stages
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._pending.append((name, start, end))

    def _resolve_stages(self) -> None:
        if self._pending:
            torch.cuda.synchronize(self.device)
            for name, start, end in self._pending:
                self.profiler.add(name, start.elapsed_time(end) / 1e3)
            self._pending = []

    @classmethod
    def from_paths(cls, paths: SeeSRPaths, unet=None, scheduler_config: dict | None = None) -> SeeSRReference:
        """The checkout's models; ``unet`` and ``scheduler_config`` replace its own (turbo composes both)."""
        paths.check()
        dape = load_dape(paths.ram, paths.dape)
        tags, thresholds = load_tag_list(paths.tag_list, paths.tag_thresholds, dape.config.num_classes)
        return cls(
            dape,
            tags,
            thresholds,
            load_tokenizer(paths.sd2),
            load_text_encoder(paths.sd2),
            load_vae(paths.sd2),
            unet if unet is not None else load_seesr_unet(paths.unet),
            load_seesr_controlnet(paths.controlnet),
            scheduler_config if scheduler_config is not None else load_scheduler_config(paths.sd2),
        )

    # -- stages

    @torch.no_grad()
    def tag(self, lr: Image.Image) -> tuple[str, torch.Tensor]:
        """DAPE: the tag string (hard prompt) and the 145x512 image embeddings (soft prompt)."""
        with self._stage("preprocess"):
            image = self._put(dape_input(lr))
        with self._stage("dape"):
            image_embeds, tag_logits = self.dape(image)
        return select_tags(tag_logits[0].float().cpu(), self.tag_list, self.tag_thresholds), image_embeds

    def encode_text(self, text: str) -> torch.Tensor:
        with self._stage("text_encoder"):
            return encode_prompt(self.tokenizer, self.text_encoder, text)

    @torch.no_grad()
    def predict_noise(self, latents, t, text_embeds, image_embeds, control_image, conditioning_scale):
        timestep = torch.tensor([t], dtype=torch.int64, device=self.device)
        with self._stage("controlnet"):
            down, mid = self.controlnet(latents, timestep, text_embeds, image_embeds, control_image, conditioning_scale)
        with self._stage("unet"):
            return self.unet(latents, timestep, text_embeds, image_embeds, down, mid)

    def predict_noise_tiled(
        self, latents, t, text_embeds, image_embeds, control_image, conditioning_scale, tile: int, overlap: int
    ):
        _, _, h, w = latents.shape
        tile = min(tile, h, w)
        weights = torch.from_numpy(gaussian_tile_weights(tile)).to(self.device)  # float64, as the official code
        total = torch.zeros_like(latents)
        contributors = torch.zeros_like(latents)
        for y, x in tile_origins(h, w, tile, overlap):
            window = (slice(None), slice(None), slice(y, y + tile), slice(x, x + tile))
            pixels = (slice(None), slice(None), slice(8 * y, 8 * (y + tile)), slice(8 * x, 8 * (x + tile)))
            pred = self.predict_noise(
                latents[window], t, text_embeds, image_embeds, control_image[pixels], conditioning_scale
            )
            total[window] += pred * weights
            contributors[window] += weights
        return total / contributors

    # -- the whole pipeline

    @torch.no_grad()
    def __call__(
        self,
        lr: Image.Image,
        *,
        noise_fn: NoiseFn | None = None,
        seed: int | None = None,
        callback: Callable[[int, int], None] | None = None,
        **options,
    ) -> ReferenceResult:
        """``options``: those of ``seesr_runtime.options`` (left out: the official defaults), checked as the
        runtime checks them (OptionError; an image too small or too large: ImageRejected)."""
        o = option_table.resolve({**options, "seed": seed}, self.defaults)
        option_table.check_image_size(*lr.size, o["max_pixels"])
        return self._run(lr, noise_fn, callback, **{k: o[k] for k in o if k != "max_pixels"})

    def _run(
        self,
        lr,
        noise_fn,
        callback,
        *,
        prompt,
        added_prompt,
        negative_prompt,
        steps,
        guidance,
        conditioning_scale,
        process_size,
        upscale,
        latent_tile_size,
        latent_tile_overlap,
        color_fix,
        start_point,
        vae_encoder_tile_size,
        vae_decoder_tile_size,
        tiled_vae,
        seed,
    ) -> ReferenceResult:
        cpu_noise = _noise_source(noise_fn, seed)
        noise = lambda kind, shape: self._put(cpu_noise(kind, shape))  # noqa: E731 (drawn on the CPU: same stream)
        with self._stage("preprocess"):
            lr = lr.convert("RGB")
        tags, image_embeds = self.tag(lr)
        full_prompt = f"{tags}, {prompt}," + added_prompt

        with self._stage("preprocess"):
            work = working_image(lr, process_size, upscale)
            control = self._put(to_tensor(work))
        text_embeds = self.encode_text(full_prompt)
        cfg = guidance > 1.0
        if cfg:  # every batched tensor is [uncond, cond]
            text_embeds = torch.cat([self.encode_text(negative_prompt), text_embeds])
            image_embeds = torch.cat([image_embeds, image_embeds])
            control = torch.cat([control, control])

        self.scheduler.set_timesteps(steps)
        latent_shape = (1, 4, work.size[1] // 8, work.size[0] // 8)
        latents = noise("initial", latent_shape) * self.scheduler.init_noise_sigma
        if start_point == "lr":
            latents = self._lr_latent(
                self._put(to_tensor(work)), latents, noise, vae_encoder_tile_size if tiled_vae else None
            )

        _, _, h, w = latents.shape
        tiled = h * w > latent_tile_size * latent_tile_size
        history = []
        for i, t in enumerate(self.scheduler.timesteps.tolist()):
            with self._stage("denoise_step"):
                model_input = torch.cat([latents, latents]) if cfg else latents
                if tiled:
                    eps = self.predict_noise_tiled(
                        model_input,
                        t,
                        text_embeds,
                        image_embeds,
                        control,
                        conditioning_scale,
                        latent_tile_size,
                        latent_tile_overlap,
                    )
                else:
                    eps = self.predict_noise(model_input, t, text_embeds, image_embeds, control, conditioning_scale)
                with self._stage("scheduler_step"):
                    if cfg:
                        eps_uncond, eps_text = eps.chunk(2)
                        eps = eps_uncond + guidance * (eps_text - eps_uncond)
                    latents = ddpm_step(self.scheduler, eps, t, latents, noise("step", latent_shape))
            history.append(latents.clone())
            if callback is not None:
                callback(i, t)

        image = self._decode(latents, vae_decoder_tile_size if tiled_vae else None)
        with self._stage("postprocess"):
            if color_fix == "adain":
                image = adain_color_fix(image, work)
            elif color_fix == "wavelet":
                image = wavelet_color_fix(image, work)
            image = image.resize((lr.size[0] * upscale, lr.size[1] * upscale), Image.BICUBIC)
        if self.profiler is not None:
            self._resolve_stages()
        return ReferenceResult(image=image, tags=tags, prompt=full_prompt, latents=history)

    def _vae(self, half: str, x: torch.Tensor, tile: int | None) -> list[torch.Tensor]:
        """A VAE half as the official pipeline runs it: quant convolution included, tiled above the
        threshold (``tile`` None: never). Encoder -> [mean, clamped logvar], decoder -> [image]."""
        if tile is not None and TiledVaeLayout.for_half(half).needs_tiling(x.shape[2], x.shape[3], tile):
            return tiled_forward(self.vae, half, x, tile)
        if half == "decoder":
            return [self.vae.decode(x).sample]
        moments = self.vae.encode(x).latent_dist
        return [moments.mean, torch.clamp(moments.logvar, -30.0, 20.0)]

    def _lr_latent(self, work: torch.Tensor, initial_noise: torch.Tensor, noise, tile: int | None) -> torch.Tensor:
        """LR embedding: sample the VAE posterior of the image, then noise it to t=999."""
        with self._stage("vae_encoder"):
            mean, logvar = self._vae("encoder", work * 2 - 1, tile)
        sample = mean + torch.exp(0.5 * logvar) * noise("posterior", tuple(mean.shape))
        timestep = torch.tensor([START_STEP], dtype=torch.int64, device=self.device)
        return self.scheduler.add_noise(sample * self.scaling_factor, initial_noise, timestep)

    def _decode(self, latents: torch.Tensor, tile: int | None) -> Image.Image:
        with self._stage("vae_decoder"):
            (image,) = self._vae("decoder", latents / self.scaling_factor, tile)
        with self._stage("postprocess"):
            image = (image.float().cpu() / 2 + 0.5).clamp(0, 1)
            array = (image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        return Image.fromarray(array)


def _noise_source(noise_fn: NoiseFn | None, seed: int):
    """Wrap ``noise_fn`` (or a seeded torch generator) as ``noise(kind, shape) -> float32 tensor``."""
    if noise_fn is None:
        generator = torch.Generator().manual_seed(seed)
        return lambda kind, shape: torch.randn(shape, generator=generator)

    def draw(kind: str, shape: Sequence[int]) -> torch.Tensor:
        value = noise_fn(kind, tuple(shape))
        value = torch.as_tensor(np.asarray(value), dtype=torch.float32)
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"noise_fn returned shape {tuple(value.shape)} for {kind!r}, expected {tuple(shape)}")
        return value

    return draw
