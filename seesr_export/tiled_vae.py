"""SeeSR's tiled VAE on the torch side: the task list, its segments for export, and a torch executor.

The official pipeline wraps ``vae.encoder`` and ``vae.decoder`` in a tiler: the input is cut into
padded tiles, each tile runs the network layer by layer, and at every GroupNorm all tiles stop so
that one mean and one variance per group, averaged over the tiles with weights proportional to
their pixel counts, normalise every tile. Only each tile's core is kept; nothing is blended.

Here the encoder or decoder is flattened into a list of tasks (convolutions, SiLU, the attention
core, up/downsampling, storing and adding residuals, GroupNorms). Cut before every GroupNorm it
gives the **segments** the bundle exports: segment 0 maps an input tile to the first GroupNorm's
input; segment k applies GroupNorm k with given statistics and runs to the next GroupNorm. The
runtime (``seesr_runtime.tiled_vae``) runs those graphs tile by tile and combines the statistics in
numpy; ``tiled_forward`` below does the same in torch for the reference pipeline. The twins are held
equal by ``tests/test_tiled_vae.py`` (``test_tile_statistics_match_torch``,
``test_runtime_segments_match_the_torch_tiler``).

The pointwise ``quant_conv`` (encoder, with the posterior's logvar clamp) and ``post_quant_conv``
(decoder) run outside the official tiler; being 1x1 convolutions they give the same values per
tile, so they close the last encoder segment and open the first decoder segment.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from seesr_runtime.networks import NetworkSpec, TensorSpec
from seesr_runtime.tiled_vae import GROUP_NORM_EPS, TiledVaeLayout, split_tiles


@dataclass(frozen=True)
class Task:
    kind: str  # conv | silu | norm | attention | store_residual | add_residual
    module: nn.Module | None = None


def _resnet_tasks(block) -> list[Task]:
    if block.time_emb_proj is not None or block.upsample or block.downsample or block.output_scale_factor != 1:
        raise ValueError(
            "tiled VAE: only plain VAE resnet blocks (no time embedding, no resampling, output scale 1) are supported"
        )
    return [
        Task("store_residual", block.conv_shortcut),
        Task("norm", block.norm1),
        Task("silu"),
        Task("conv", block.conv1),
        Task("norm", block.norm2),
        Task("silu"),
        Task("conv", block.conv2),
        Task("add_residual"),
    ]


def _attention_tasks(attention) -> list[Task]:
    if not attention.residual_connection or attention.rescale_output_factor != 1 or attention.group_norm is None:
        raise ValueError("tiled VAE: the mid-block attention must be a residual, group-normed, unscaled Attention")
    return [
        Task("store_residual"),
        Task("norm", attention.group_norm),
        Task("attention", attention),
        Task("add_residual"),
    ]


def _mid_tasks(mid_block) -> list[Task]:
    tasks = _resnet_tasks(mid_block.resnets[0])
    for attention, resnet in zip(mid_block.attentions, mid_block.resnets[1:]):
        tasks += _attention_tasks(attention) + _resnet_tasks(resnet)
    return tasks


def vae_tasks(vae, half: str) -> list[Task]:
    """The task list of ``vae.encoder`` (``half="encoder"``) or ``vae.decoder``, with the 1x1
    quant convolutions folded in (see the module docstring)."""
    for conv in (vae.quant_conv, vae.post_quant_conv):
        if conv is not None and tuple(conv.kernel_size) != (1, 1):
            raise ValueError("tiled VAE: quant_conv/post_quant_conv must be 1x1 convolutions")
    net = getattr(vae, half)
    if half == "encoder":
        tasks = [Task("conv", net.conv_in)]
        for block in net.down_blocks:
            for resnet in block.resnets:
                tasks += _resnet_tasks(resnet)
            tasks += [Task("conv", d) for d in block.downsamplers or []]
        tasks += _mid_tasks(net.mid_block)
        end = [Task("conv", vae.quant_conv)] if vae.quant_conv is not None else []
    elif half == "decoder":
        tasks = [Task("conv", vae.post_quant_conv)] if vae.post_quant_conv is not None else []
        tasks += [Task("conv", net.conv_in)] + _mid_tasks(net.mid_block)
        for block in net.up_blocks:
            for resnet in block.resnets:
                tasks += _resnet_tasks(resnet)
            tasks += [Task("conv", u) for u in block.upsamplers or []]
        end = []
    else:
        raise ValueError(f"half must be 'encoder' or 'decoder', got {half!r}")
    return tasks + [Task("norm", net.conv_norm_out), Task("silu"), Task("conv", net.conv_out)] + end


def split_segments(tasks: list[Task]) -> list[list[Task]]:
    """Cut before every GroupNorm; a residual stored from a GroupNorm's input moves with it."""
    segments, current = [], []
    for i, task in enumerate(tasks):
        starts_norm = task.kind == "norm" or (task.kind == "store_residual" and tasks[i + 1].kind == "norm")
        if starts_norm and current and not (current[-1].kind == "store_residual" and task.kind == "norm"):
            segments.append(current)
            current = []
        current.append(task)
    return segments + [current]


def _residual_flow(segments: list[list[Task]]) -> list[tuple[bool, bool]]:
    """(takes a residual, hands one on) for each segment."""
    flow, pending = [], False
    for segment in segments:
        takes = pending
        for task in segment:
            if task.kind == "store_residual":
                pending = True
            elif task.kind == "add_residual":
                pending = False
        flow.append((takes, pending))
    if pending:
        raise ValueError("tiled VAE: a residual is stored and never added")
    return flow


# ---------------------------------------------------------------- the operations


def group_stats(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-group mean and (biased) variance: two [B, groups] tensors."""
    var, mean = torch.var_mean(x.float().reshape(x.shape[0], groups, -1), dim=2, unbiased=False)
    return mean.to(x.dtype), var.to(x.dtype)


def group_norm_with(x: torch.Tensor, norm: nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """GroupNorm ``norm`` with given [B, groups] statistics (eps 1e-6, as the official tiler)."""
    b, c = x.shape[:2]
    grouped = x.reshape(b, norm.num_groups, -1)
    normed = (grouped - mean[..., None]) / torch.sqrt(var[..., None] + GROUP_NORM_EPS)
    return normed.reshape(x.shape) * norm.weight.view(1, c, 1, 1) + norm.bias.view(1, c, 1, 1)


def attention_core(attention, x: torch.Tensor) -> torch.Tensor:
    """The mid-block self-attention over the tile's pixels, without its GroupNorm and residual."""
    b, c, h, w = x.shape
    tokens = x.reshape(b, c, h * w).transpose(1, 2)
    heads = attention.heads

    def split(t):
        return t.reshape(b, h * w, heads, -1).transpose(1, 2)

    q, k, v = split(attention.to_q(tokens)), split(attention.to_k(tokens)), split(attention.to_v(tokens))
    out = F.scaled_dot_product_attention(q, k, v, scale=attention.scale)
    out = attention.to_out[1](attention.to_out[0](out.transpose(1, 2).reshape(b, h * w, c)))
    return out.transpose(1, 2).reshape(b, c, h, w)


def run_segment(segment: list[Task], x: torch.Tensor, stats=None, residual=None):
    """Run one segment on one tile: ``(hidden, residual)`` after it."""
    for task in segment:
        if task.kind == "norm":
            x = group_norm_with(x, task.module, *stats)
        elif task.kind == "silu":
            x = F.silu(x)
        elif task.kind == "conv":
            x = task.module(x)
        elif task.kind == "attention":
            x = attention_core(task.module, x)
        elif task.kind == "store_residual":
            residual = x if task.module is None else task.module(x)
        elif task.kind == "add_residual":
            x, residual = x + residual, None
    return x, residual


# ---------------------------------------------------------------- torch executor (the reference)


def segment_groups(segments: list[list[Task]]) -> int:
    norms = [t.module.num_groups for s in segments for t in s if t.kind == "norm"]
    if len(set(norms)) != 1:
        raise ValueError(f"tiled VAE: every GroupNorm must have the same group count, got {sorted(set(norms))}")
    return norms[0]


def combined_group_stats(states: list[torch.Tensor], groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tile statistics averaged with weights proportional to the tiles' pixel counts (float32,
    in tile order, as the official tiler)."""
    per_tile = [group_stats(s, groups) for s in states]
    pixels = torch.tensor([s.shape[2] * s.shape[3] for s in states], dtype=torch.float32, device=states[0].device)
    weights = (pixels / pixels.max()) / (pixels / pixels.max()).sum()
    mean = sum(w * m.float() for w, (m, _) in zip(weights, per_tile))
    var = sum(w * v.float() for w, (_, v) in zip(weights, per_tile))
    return mean.to(states[0].dtype), var.to(states[0].dtype)


@torch.no_grad()
def tiled_forward(vae, half: str, x: torch.Tensor, tile: int) -> list[torch.Tensor]:
    """The official tiled encoder/decoder on ``x``: encoder -> [mean, logvar], decoder -> [image]."""
    layout = TiledVaeLayout.for_half(half)
    segments = split_segments(vae_tasks(vae, half))
    groups = segment_groups(segments)
    in_boxes, out_boxes = split_tiles(x.shape[2], x.shape[3], tile, layout)
    states = [x[:, :, y0:y1, x0:x1] for x0, x1, y0, y1 in in_boxes]
    residuals = [None] * len(states)
    for k, segment in enumerate(segments):
        stats = combined_group_stats(states, groups) if k > 0 else None
        for i, state in enumerate(states):
            states[i], residuals[i] = run_segment(segment, state, stats, residuals[i])
    height, width = max(b[3] for b in out_boxes), max(b[1] for b in out_boxes)
    out = torch.zeros((x.shape[0], states[0].shape[1], height, width), dtype=x.dtype, device=x.device)
    for state, (ix0, _, iy0, _), (ox0, ox1, oy0, oy1) in zip(states, in_boxes, out_boxes):
        top, left = oy0 - layout.scale(iy0), ox0 - layout.scale(ix0)
        out[:, :, oy0:oy1, ox0:ox1] = state[:, :, top : top + oy1 - oy0, left : left + ox1 - ox0]
    if half == "encoder":
        mean, logvar = torch.chunk(out, 2, dim=1)
        return [mean, torch.clamp(logvar, -30.0, 20.0)]
    return [out]


# ---------------------------------------------------------------- export


class SegmentGraph(nn.Module):
    """One segment as an exportable graph; the last encoder segment splits the posterior moments."""

    def __init__(self, segment: list[Task], normed: bool, takes_residual: bool, split_moments: bool):
        super().__init__()
        self.segment, self.normed, self.takes_residual = segment, normed, takes_residual
        self.split_moments = split_moments
        # Registered so the tracer and .eval() see every weight.
        self.modules_ = nn.ModuleList([t.module for t in segment if t.module is not None])

    def forward(self, hidden, *rest):
        rest = list(rest)
        stats = (rest.pop(0), rest.pop(0)) if self.normed else None
        residual = rest.pop(0) if self.takes_residual else None
        hidden, residual = run_segment(self.segment, hidden, stats, residual)
        if self.split_moments:
            mean, logvar = torch.chunk(hidden, 2, dim=1)
            return mean, torch.clamp(logvar, -30.0, 20.0)
        return (hidden, residual) if residual is not None else hidden


def segment_graphs(vae, half: str, size: int = 16, seed: int = 0):
    """Every segment of a VAE half, in order, as ``(name, spec, module, feeds)``: names such as
    ``vae_decoder#3``; ``feeds`` are realistic inputs at a ``size`` x ``size`` input tile, made by
    running the chain on a random tile with its own statistics (tracing and parity checks)."""
    network = f"vae_{half}"
    segments = split_segments(vae_tasks(vae, half))
    groups = segment_groups(segments)
    flow = _residual_flow(segments)
    channels = 4 if half == "decoder" else 3
    hidden = torch.from_numpy(np.random.default_rng(seed).standard_normal((1, channels, size, size)).astype(np.float32))
    residual, result = None, []
    for k, (segment, (takes, hands)) in enumerate(zip(segments, flow)):
        last = k == len(segments) - 1
        module = SegmentGraph(segment, k > 0, takes, last and half == "encoder").eval()
        feeds = {"hidden": hidden}
        if k > 0:
            feeds["group_mean"], feeds["group_var"] = group_stats(hidden, groups)
        if takes:
            feeds["residual"] = residual
        with torch.no_grad():
            outputs = module(*feeds.values())
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        names = ["mean", "logvar"] if last and half == "encoder" else ["hidden_out"]
        names += ["residual_out"] if hands else []
        spec = NetworkSpec(
            f"{network}#{k}",
            tuple(_tensor_spec(n, t, "h", "w") for n, t in feeds.items()),
            tuple(_tensor_spec(n, t, "out_h", "out_w") for n, t in zip(names, outputs)),
        )
        result.append((spec.name, spec, module, {n: t.numpy() for n, t in feeds.items()}))
        hidden, residual = outputs[0], outputs[1] if hands else None
    return result


def _tensor_spec(name: str, tensor: torch.Tensor, height: str, width: str) -> TensorSpec:
    shape = ("B", tensor.shape[1], height, width) if tensor.dim() == 4 else ("B", tensor.shape[1])
    return TensorSpec(name, "float32", shape)
