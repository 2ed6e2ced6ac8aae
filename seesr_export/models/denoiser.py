"""SeeSR's UNet and ControlNet: SD2 networks with a second, image cross-attention.

SeeSR follows every text ``Transformer2DModel`` of a cross-attention block with
an identical transformer (``image_attentions``) whose context is the 145 DAPE
image tokens (dim 512). We build the plain diffusers networks, graft those
transformers on, and drive the blocks with our own forward so that the state
dict keeps the official key names and the graph stays easy to export.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from torch import nn

from ..checkpoints import find_weights, load_state_dict, load_strict, require_file
from ..errors import CheckpointError

IMAGE_CONTEXT_DIM = 512  # width of DAPE's image_proj, fixed in SeeSR's blocks

# Config features of the diffusers classes that SeeSR's SD2 networks never use;
# refusing them beats silently computing something else.
_UNSUPPORTED = {
    "class_embed_type": None,
    "addition_embed_type": None,
    "num_class_embeds": None,
    "encoder_hid_dim": None,
    "time_cond_proj_dim": None,
    "dual_cross_attention": False,
    "center_input_sample": False,
    "time_embedding_type": "positional",
}


def read_config(folder: Path, what: str) -> dict:
    path = require_file(Path(folder) / "config.json", what)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{what}: cannot parse {path}: {exc}") from exc


def _diffusers_kwargs(cls: type, config: dict, source: str) -> dict:
    for key, allowed in _UNSUPPORTED.items():
        if config.get(key, allowed) != allowed:
            raise CheckpointError(f"{source}: config {key}={config[key]!r} is not supported (SeeSR uses {allowed!r})")
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in config.items() if k in params and not k.startswith("_")}


def _graft_image_attention(block: nn.Module) -> None:
    """Give a cross-attention block one image transformer per text transformer."""
    image_attentions = []
    for text_attention in block.attentions:
        cfg = dict(text_attention.config)
        params = inspect.signature(type(text_attention).__init__).parameters
        cfg = {k: v for k, v in cfg.items() if k in params}
        cfg["cross_attention_dim"] = IMAGE_CONTEXT_DIM
        image_attentions.append(type(text_attention)(**cfg))
    block.image_attentions = nn.ModuleList(image_attentions)


def _has_cross_attention(block: nn.Module) -> bool:
    return hasattr(block, "attentions")


def _transformers(block: nn.Module) -> Sequence[tuple[nn.Module, nn.Module | None]]:
    images = getattr(block, "image_attentions", [None] * len(block.attentions))
    return list(zip(block.attentions, images))


def _attend(pair, hidden, text_context, image_context):
    text_attention, image_attention = pair
    hidden = text_attention(hidden, encoder_hidden_states=text_context, return_dict=False)[0]
    if image_attention is not None:
        hidden = image_attention(hidden, encoder_hidden_states=image_context, return_dict=False)[0]
    return hidden


def run_down_block(block, hidden, temb, text_context, image_context):
    """One down block; returns the hidden state and the skip connections it emits."""
    skips = []
    pairs = _transformers(block) if _has_cross_attention(block) else [None] * len(block.resnets)
    for resnet, pair in zip(block.resnets, pairs):
        hidden = resnet(hidden, temb)
        if pair is not None:
            hidden = _attend(pair, hidden, text_context, image_context)
        skips.append(hidden)
    for downsampler in block.downsamplers or []:
        hidden = downsampler(hidden)
        skips.append(hidden)
    return hidden, skips


def run_mid_block(block, hidden, temb, text_context, image_context):
    # Official order: resnet -> text attention -> image attention -> resnet.
    hidden = block.resnets[0](hidden, temb)
    for pair, resnet in zip(_transformers(block), block.resnets[1:]):
        hidden = _attend(pair, hidden, text_context, image_context)
        hidden = resnet(hidden, temb)
    return hidden


def run_up_block(block, hidden, skips, temb, text_context, image_context, upsample_size):
    pairs = _transformers(block) if _has_cross_attention(block) else [None] * len(block.resnets)
    for resnet, pair in zip(block.resnets, pairs):
        hidden = torch.cat([hidden, skips.pop()], dim=1)
        hidden = resnet(hidden, temb)
        if pair is not None:
            hidden = _attend(pair, hidden, text_context, image_context)
    for upsampler in block.upsamplers or []:
        hidden = upsampler(hidden, upsample_size)
    return hidden


def _time_embedding(time_proj, time_embedding, timestep, sample):
    timestep = timestep.reshape(-1).expand(sample.shape[0])
    return time_embedding(time_proj(timestep).to(sample.dtype))


class SeeSRUNet(nn.Module):
    """SeeSR's ``UNet2DConditionModel`` (SD2 layout + image cross-attention)."""

    def __init__(self, config: dict, source: str = "unet"):
        super().__init__()
        self.config = dict(config)
        base = UNet2DConditionModel(**_diffusers_kwargs(UNet2DConditionModel, config, source))
        for name in (
            "conv_in",
            "time_proj",
            "time_embedding",
            "down_blocks",
            "mid_block",
            "up_blocks",
            "conv_norm_out",
            "conv_act",
            "conv_out",
        ):
            setattr(self, name, getattr(base, name))
        if config.get("use_image_cross_attention", False):
            for block in [*self.down_blocks, self.mid_block, *self.up_blocks]:
                if _has_cross_attention(block):
                    _graft_image_attention(block)

    @property
    def num_residuals(self) -> int:
        """How many ControlNet skip residuals the UNet takes (12 for SD2)."""
        return 1 + sum(len(b.resnets) + len(b.downsamplers or []) for b in self.down_blocks)

    def forward(
        self,
        sample,
        timestep,
        encoder_hidden_states,
        image_embeds,
        down_residuals: Sequence[torch.Tensor] | None = None,
        mid_residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        temb = _time_embedding(self.time_proj, self.time_embedding, timestep, sample)
        hidden = self.conv_in(sample)
        skips = [hidden]
        for block in self.down_blocks:
            hidden, block_skips = run_down_block(block, hidden, temb, encoder_hidden_states, image_embeds)
            skips.extend(block_skips)
        if down_residuals is not None:
            skips = [s + r for s, r in zip(skips, down_residuals, strict=True)]
        hidden = run_mid_block(self.mid_block, hidden, temb, encoder_hidden_states, image_embeds)
        if mid_residual is not None:
            hidden = hidden + mid_residual
        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            # Odd latent sizes: upsample to the skip's exact size, not simply x2.
            upsample_size = skips[-1].shape[2:] if i < len(self.up_blocks) - 1 else None
            hidden = run_up_block(block, hidden, block_skips, temb, encoder_hidden_states, image_embeds, upsample_size)
        hidden = self.conv_act(self.conv_norm_out(hidden))
        return self.conv_out(hidden)


class SeeSRControlNet(nn.Module):
    """SeeSR's ``ControlNetModel``: the UNet encoder, fed the LR image, emitting scaled residuals."""

    def __init__(self, config: dict, source: str = "controlnet"):
        super().__init__()
        self.config = dict(config)
        if config.get("global_pool_conditions", False):
            raise CheckpointError(f"{source}: global_pool_conditions=true is not supported (SeeSR uses false)")
        order = config.get("controlnet_conditioning_channel_order", "rgb")
        if order not in ("rgb", "bgr"):
            raise CheckpointError(f"{source}: unknown controlnet_conditioning_channel_order {order!r}")
        self.flip_condition = order == "bgr"
        base = ControlNetModel(**_diffusers_kwargs(ControlNetModel, config, source))
        for name in (
            "conv_in",
            "time_proj",
            "time_embedding",
            "controlnet_cond_embedding",
            "down_blocks",
            "controlnet_down_blocks",
            "mid_block",
            "controlnet_mid_block",
        ):
            setattr(self, name, getattr(base, name))
        if config.get("use_image_cross_attention", False):
            for block in [*self.down_blocks, self.mid_block]:
                if _has_cross_attention(block):
                    _graft_image_attention(block)

    def forward(
        self,
        sample,
        timestep,
        encoder_hidden_states,
        image_embeds,
        controlnet_cond,
        conditioning_scale: float | torch.Tensor = 1.0,
    ):
        """Returns ``(down_residuals, mid_residual)``, already multiplied by ``conditioning_scale``."""
        if self.flip_condition:
            controlnet_cond = torch.flip(controlnet_cond, dims=[1])
        temb = _time_embedding(self.time_proj, self.time_embedding, timestep, sample)
        hidden = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond)
        skips = [hidden]
        for block in self.down_blocks:
            hidden, block_skips = run_down_block(block, hidden, temb, encoder_hidden_states, image_embeds)
            skips.extend(block_skips)
        hidden = run_mid_block(self.mid_block, hidden, temb, encoder_hidden_states, image_embeds)
        down = [proj(s) * conditioning_scale for s, proj in zip(skips, self.controlnet_down_blocks, strict=True)]
        return down, self.controlnet_mid_block(hidden) * conditioning_scale


def _load(folder: Path, cls, what: str):
    folder = Path(folder)
    config = read_config(folder, what)
    weights = find_weights(folder, "diffusion_pytorch_model", what)
    model = cls(config, source=str(folder / "config.json"))
    load_strict(model, load_state_dict(weights, what), weights)
    return model.eval()


def load_seesr_unet(folder: Path) -> SeeSRUNet:
    return _load(folder, SeeSRUNet, "SeeSR UNet")


def load_seesr_controlnet(folder: Path) -> SeeSRControlNet:
    return _load(folder, SeeSRControlNet, "SeeSR ControlNet")
