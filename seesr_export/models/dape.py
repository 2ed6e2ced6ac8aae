"""DAPE: SeeSR's degradation-aware prompt extractor (RAM tagger + LoRA).

DAPE is the Recognize Anything Model (RAM, Swin-L 384) with LoRA adapters
fine-tuned by SeeSR. From one ImageNet-normalised 384x384 image it gives

* ``image_embeds`` [B, 145, 512]: ``image_proj`` of the Swin output
  ``[mean over tokens; 144 tokens]``, the soft prompt of the UNet and
  ControlNet image cross-attention;
* ``tag_logits`` [B, num_classes]: the tagging head (a 2-layer BERT with
  cross-attention only) queried by ``relu(wordvec_proj(label_embed))``.

State-dict key names are the official ones, so ``ram_swin_large_14m.pth``
loads unchanged; the LoRA tensors of ``DAPE.pth`` are merged into the base
weights exactly as loralib 0.1.2 does when the official code calls
``model.eval()``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import load_state_dict, load_strict, require_file
from ..errors import CheckpointError

# --- Facts fixed by the official code (ram_lora.py, configs/, loralib) ---------------

IMAGE_SIZE = 384  # configs/swin/config_swinL_384.json image_res
SWIN_WINDOW = 12  # same config; other windows would be interpolated officially
SWIN_LAYER_NORM_EPS = 1e-5  # nn.LayerNorm default in swin_transformer_lora.py
BERT_LAYER_NORM_EPS = 1e-12  # q2l_config.json layer_norm_eps
# q2l_config.json fixes 4 heads for hidden 768 (head dim 192, not the BERT 64).
# Heads cannot be read from weight shapes, so the count is fixed for every size.
TAG_HEAD_HEADS = 4

LORA_RANK = 8  # r=8 in swin_transformer_lora.py and bert_lora.py
LORA_ALPHA = 1  # loralib default
LORA_SCALE = LORA_ALPHA / LORA_RANK
# Swin attn.qkv is loralib.MergedLinear(enable_lora=[True, False, True]): q and v.
SWIN_QKV_LORA_SLOTS = (True, False, True)

# Parts of the official RAM checkpoint that inference never runs: the
# captioning BERTs (image-tag interaction encoder and caption decoder). The
# tagging head's weights are *tied* to tag_encoder's first layers in the
# official model, but they are also saved under ``tagging_head.``, which is the
# copy the official load ends up with (loaded last). LoRA keys under these
# prefixes are validated and consumed like the others; only the tied ones can
# change inference (see _tied_weight_key).
IGNORED_PREFIXES = ("tag_encoder.", "text_decoder.")
# Buffers the official loader deletes and recomputes from the geometry.
RECOMPUTED_BUFFER_SUFFIXES = (".relative_position_index", ".attn_mask")

# Official module order: model.eval() merges LoRA in this order, which matters
# where two LoRA layers share a tied weight (see merge_lora).
_MERGE_ORDER = ("visual_encoder.", "tag_encoder.", "text_decoder.", "tagging_head.")
_SWIN_QKV_SITE = re.compile(r"visual_encoder\.layers\.\d+\.blocks\.\d+\.attn\.qkv")
_BERT_QK_SITE = re.compile(
    r"(tag_encoder|text_decoder\.bert|tagging_head)\.encoder\.layer\.\d+"
    r"\.(attention|crossattention)\.self\.(query|key)"
)


# --- Architecture inferred from checkpoint shapes --------------------------------------


@dataclass(frozen=True)
class DAPEConfig:
    """Dimensions of a RAM/DAPE model; ``from_state_dict`` reads them off the weights."""

    patch_size: int
    embed_dim: int
    depths: tuple[int, ...]
    swin_heads: tuple[int, ...]
    window_size: int
    mlp_ratio: float
    image_embed_dim: int  # image_proj output, 512 officially
    num_classes: int
    label_dim: int  # label_embed columns (q2l encoder_width, 512)
    tag_hidden: int
    tag_intermediate: int
    tag_layers: int
    tag_heads: int = TAG_HEAD_HEADS
    image_size: int = IMAGE_SIZE

    @property
    def swin_out_dim(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    @property
    def num_image_tokens(self) -> int:
        """Swin tokens after the last stage, plus the mean token in front."""
        side = self.image_size // self.patch_size // 2 ** (len(self.depths) - 1)
        return side * side + 1

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, torch.Tensor], source: Path | str, image_size: int = IMAGE_SIZE
    ) -> DAPEConfig:
        shape = _shape_reader(state_dict, source)
        embed_dim, _, patch, _ = shape("visual_encoder.patch_embed.proj.weight")
        stages = _numbered_children(state_dict, "visual_encoder.layers", source)
        depths = [_numbered_children(state_dict, f"visual_encoder.layers.{i}.blocks", source) for i in range(stages)]
        if not depths or not all(depths):
            raise CheckpointError(f"{source}: no Swin blocks (visual_encoder.layers.*.blocks.*)")
        tables = [shape(f"visual_encoder.layers.{i}.blocks.0.attn.relative_position_bias_table") for i in range(stages)]
        _check_windows([rows for rows, _ in tables], image_size // patch, source)
        head0 = "tagging_head.encoder.layer.0."
        config = cls(
            patch_size=patch,
            embed_dim=embed_dim,
            depths=tuple(depths),
            swin_heads=tuple(heads for _, heads in tables),
            window_size=SWIN_WINDOW,
            mlp_ratio=shape("visual_encoder.layers.0.blocks.0.mlp.fc1.weight")[0] / embed_dim,
            image_embed_dim=shape("image_proj.weight")[0],
            num_classes=shape("label_embed")[0],
            label_dim=shape("label_embed")[1],
            tag_hidden=shape(head0 + "crossattention.self.query.weight")[0],
            tag_intermediate=shape(head0 + "intermediate.dense.weight")[0],
            tag_layers=_numbered_children(state_dict, "tagging_head.encoder.layer", source),
            image_size=image_size,
        )
        config.check(source)
        return config

    def check(self, source: Path | str) -> None:
        """Raise if the geometry cannot run (SeeSR's own would fail or differ)."""
        problems = []
        side = self.image_size // self.patch_size
        if side * self.patch_size != self.image_size:
            problems.append(f"image size {self.image_size} is not a multiple of patch {self.patch_size}")
        for stage, heads in enumerate(self.swin_heads):
            dim = self.embed_dim * 2**stage
            if dim % heads:
                problems.append(f"Swin stage {stage}: width {dim} not divisible by {heads} heads")
            if side > self.window_size and side % self.window_size:
                problems.append(f"Swin stage {stage}: resolution {side} not a multiple of window {self.window_size}")
            if stage < len(self.depths) - 1 and side % 2:
                problems.append(f"Swin stage {stage}: odd resolution {side} cannot be patch-merged")
            side //= 2
        if self.tag_hidden % self.tag_heads:
            problems.append(f"tag head width {self.tag_hidden} not divisible by {self.tag_heads} heads")
        if problems:
            raise CheckpointError(f"{source}: unsupported DAPE geometry:\n  " + "\n  ".join(problems))


def _shape_reader(state_dict: Mapping[str, torch.Tensor], source: Path | str):
    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise CheckpointError(f"{source}: missing key {key!r} (needed to infer the architecture)")
        return tuple(state_dict[key].shape)

    return shape


def _numbered_children(state_dict: Mapping[str, torch.Tensor], prefix: str, source: Path | str) -> int:
    """How many children ``<prefix>.<i>.`` the keys have; indices must run 0..n-1."""
    regex = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    found = sorted({int(m.group(1)) for m in map(regex.match, state_dict) if m})
    if found != list(range(len(found))):
        raise CheckpointError(f"{source}: {prefix}.* has non-contiguous indices {found}")
    return len(found)


def _check_windows(table_rows: Sequence[int], resolution: int, source: Path | str) -> None:
    """Each stage's bias table must be ((2w-1)^2) for SeeSR's window, w = min(12, stage size).

    The official loader would interpolate tables of another window; we refuse them.
    """
    for stage, rows in enumerate(table_rows):
        window = min(SWIN_WINDOW, resolution // 2**stage)
        if rows != (2 * window - 1) ** 2:
            raise CheckpointError(
                f"{source}: visual_encoder.layers.{stage} relative_position_bias_table has {rows} rows, "
                f"expected {(2 * window - 1) ** 2} for window {window}; SeeSR would interpolate other "
                f"windows to {SWIN_WINDOW}, which this loader does not support"
            )


# --- Swin visual encoder ------------------------------------------------------------------


def relative_position_index(window: int) -> torch.Tensor:
    """[w*w, w*w] index into the (2w-1)^2 bias table, as the official buffer."""
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()])  # 2, w*w
    delta = coords[:, :, None] - coords[:, None, :] + (window - 1)  # 2, w*w, w*w; >= 0
    return delta[0] * (2 * window - 1) + delta[1]


def shifted_window_mask(resolution: int, window: int, shift: int) -> torch.Tensor:
    """[num_windows, w*w, w*w] additive mask (0 / -100) for shifted windows, as official.

    After the cyclic shift, tokens from up to 3x3 different image regions share
    a window; attention between different regions is suppressed with -100.
    """
    region = torch.zeros(resolution, resolution)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for rows in bounds:
        for cols in bounds:
            region[rows, cols] = label
            label += 1
    windows = window_partition(region[None, :, :, None], window).squeeze(-1)  # nW, w*w
    differs = windows[:, None, :] != windows[:, :, None]
    return torch.zeros(differs.shape).masked_fill(differs, -100.0)


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """[B, H, W, C] -> [B*num_windows, window*window, C], row-major windows."""
    _, height, width, channels = x.shape
    x = x.reshape(-1, height // window, window, width // window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, channels)


def window_reverse(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """Inverse of window_partition: [B*num_windows, window*window, C] -> [B, H, W, C]."""
    channels = windows.shape[-1]
    x = windows.reshape(-1, height // window, width // window, window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim, eps=SWIN_LAYER_NORM_EPS)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(image).flatten(2).transpose(1, 2))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a relative position bias."""

    def __init__(self, dim: int, window: int, heads: int):
        super().__init__()
        self.window = window
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        # Recomputed, never loaded: the official loader drops it from checkpoints.
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def relative_position_bias(self) -> torch.Tensor:
        tokens = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return bias.reshape(tokens, tokens, self.heads).permute(2, 0, 1)  # heads, N, N

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        tokens, dim = x.shape[1], x.shape[2]
        qkv = self.qkv(x).reshape(-1, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)  # official order: scale q first
        attn = attn + self.relative_position_bias().unsqueeze(0)
        if mask is not None:
            windows = mask.shape[0]
            attn = attn.reshape(-1, windows, self.heads, tokens, tokens) + mask[None, :, None]
            attn = attn.reshape(-1, self.heads, tokens, tokens)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(-1, tokens, dim)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, resolution: int, heads: int, window: int, shifted: bool, mlp_ratio: float):
        super().__init__()
        # Official rule: a stage no larger than the window is one unshifted window.
        if resolution <= window:
            window, shifted = resolution, False
        self.resolution = resolution
        self.window = window
        self.shift = window // 2 if shifted else 0
        self.norm1 = nn.LayerNorm(dim, eps=SWIN_LAYER_NORM_EPS)
        self.attn = WindowAttention(dim, window, heads)
        self.norm2 = nn.LayerNorm(dim, eps=SWIN_LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        mask = shifted_window_mask(resolution, window, self.shift) if self.shift else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side, dim = self.resolution, x.shape[-1]
        shortcut = x
        x = self.norm1(x).reshape(-1, side, side, dim)
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        windows = self.attn(window_partition(x, self.window), self.attn_mask)
        x = window_reverse(windows, self.window, side, side)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        x = shortcut + x.reshape(-1, side * side, dim)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, dim: int, resolution: int):
        super().__init__()
        self.resolution = resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim, eps=SWIN_LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side, dim = self.resolution, x.shape[-1]
        x = x.reshape(-1, side, side, dim)
        # Official channel order of the 2x2 neighbourhood: (0,0), (1,0), (0,1), (1,1).
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.reshape(-1, (side // 2) ** 2, 4 * dim)))


class SwinStage(nn.Module):
    def __init__(self, dim: int, resolution: int, depth: int, heads: int, window: int, mlp_ratio: float, merge: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, resolution, heads, window, shifted=i % 2 == 1, mlp_ratio=mlp_ratio) for i in range(depth)
        )
        self.downsample = PatchMerging(dim, resolution) if merge else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class SwinEncoder(nn.Module):
    """RAM's Swin: returns ``[mean over tokens; tokens]`` of the last stage, [B, 1+L, C]."""

    def __init__(self, config: DAPEConfig):
        super().__init__()
        self.patch_embed = PatchEmbed(config.patch_size, config.embed_dim)
        resolution = config.image_size // config.patch_size
        last = len(config.depths) - 1
        self.layers = nn.ModuleList(
            SwinStage(
                dim=config.embed_dim * 2**i,
                resolution=resolution // 2**i,
                depth=depth,
                heads=config.swin_heads[i],
                window=config.window_size,
                mlp_ratio=config.mlp_ratio,
                merge=i < last,
            )
            for i, depth in enumerate(config.depths)
        )
        self.norm = nn.LayerNorm(config.swin_out_dim, eps=SWIN_LAYER_NORM_EPS)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(image)
        for stage in self.layers:
            x = stage(x)
        x = self.norm(x)
        # AdaptiveAvgPool1d(1) as the official code, rather than mean(), for identical rounding.
        pooled = F.adaptive_avg_pool1d(x.transpose(1, 2), 1).transpose(1, 2)
        return torch.cat([pooled, x], dim=1)


# --- Tagging head: BERT layers with cross-attention only -------------------------------


class AttentionProjections(nn.Module):
    def __init__(self, hidden: int, context_dim: int):
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(context_dim, hidden)
        self.value = nn.Linear(context_dim, hidden)


class AddNorm(nn.Module):
    """BERT's ``LayerNorm(dense(x) + residual)``."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.dense = nn.Linear(in_dim, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=BERT_LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class CrossAttention(nn.Module):
    def __init__(self, hidden: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = hidden // heads
        self.self = AttentionProjections(hidden, context_dim)  # official name "self"
        self.output = AddNorm(hidden, hidden)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)  # B, heads, N, d

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = self.split_heads(self.self.query(x))
        k = self.split_heads(self.self.key(context))
        v = self.split_heads(self.self.value(context))
        # The official all-ones image mask adds -0.0 here: a no-op, so it is left out.
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)  # official order: divide after
        attended = (scores.softmax(dim=-1) @ v).transpose(1, 2).flatten(-2)
        return self.output(attended, x)


class Intermediate(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class TagHeadLayer(nn.Module):
    """Official BertLayer in ``mode='tagging'``: cross-attention, then feed-forward."""

    def __init__(self, config: DAPEConfig):
        super().__init__()
        self.crossattention = CrossAttention(config.tag_hidden, config.image_embed_dim, config.tag_heads)
        self.intermediate = Intermediate(config.tag_hidden, config.tag_intermediate)
        self.output = AddNorm(config.tag_intermediate, config.tag_hidden)

    def forward(self, x: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        x = self.crossattention(x, image_embeds)
        return self.output(self.intermediate(x), x)


class TagHeadLayers(nn.Module):
    def __init__(self, config: DAPEConfig):
        super().__init__()
        self.layer = nn.ModuleList(TagHeadLayer(config) for _ in range(config.tag_layers))


class TaggingHead(nn.Module):
    """``tagging_head`` with embeddings and self-attention deleted (official del_selfattention)."""

    def __init__(self, config: DAPEConfig):
        super().__init__()
        self.encoder = TagHeadLayers(config)

    def forward(self, queries: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        x = queries
        for layer in self.encoder.layer:
            x = layer(x, image_embeds)
        return x


# --- DAPE ------------------------------------------------------------------------------


class DAPE(nn.Module):
    """Inference part of SeeSR's RAM/DAPE, official state-dict names."""

    def __init__(self, config: DAPEConfig):
        super().__init__()
        self.config = config
        # Registration order mirrors the official model (label_embed is its own parameter).
        self.label_embed = nn.Parameter(torch.zeros(config.num_classes, config.label_dim))
        self.visual_encoder = SwinEncoder(config)
        self.tagging_head = TaggingHead(config)
        # Official: nn.Identity when the tag head is as wide as the label embeddings.
        if config.tag_hidden != config.label_dim:
            self.wordvec_proj = nn.Linear(config.label_dim, config.tag_hidden)
        else:
            self.wordvec_proj = nn.Identity()
        self.fc = nn.Linear(config.tag_hidden, 1)
        self.image_proj = nn.Linear(config.swin_out_dim, config.image_embed_dim)

    def image_embeds(self, image: torch.Tensor) -> torch.Tensor:
        """Official ``generate_image_embeds``: [B, 3, 384, 384] -> [B, 145, 512]."""
        return self.image_proj(self.visual_encoder(image))

    def label_queries(self) -> torch.Tensor:
        """Tag-head queries [num_classes, hidden]; input-independent, so precomputable."""
        return F.relu(self.wordvec_proj(self.label_embed))

    def tag_logits(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Official ``generate_tag`` up to the logits: one logit per class, [B, num_classes]."""
        queries = self.label_queries().unsqueeze(0).expand(image_embeds.shape[0], -1, -1)
        return self.fc(self.tagging_head(queries, image_embeds)).squeeze(-1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image_embeds = self.image_embeds(image)
        return image_embeds, self.tag_logits(image_embeds)


# --- LoRA --------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LoraSite:
    """One LoRA layer of DAPE.pth: ``<name>.lora_A`` / ``<name>.lora_B`` on ``<name>.weight``."""

    name: str
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    slots: tuple[bool, ...] | None  # MergedLinear enable_lora; None for a plain LoRA linear

    @property
    def weight_key(self) -> str:
        return self.name + ".weight"


def is_lora_layer(name: str) -> bool:
    return bool(_SWIN_QKV_SITE.fullmatch(name) or _BERT_QK_SITE.fullmatch(name))


def lora_slots(name: str) -> tuple[bool, ...] | None:
    """loralib MergedLinear's enable_lora for the Swin qkv; None for a plain LoRA linear."""
    return SWIN_QKV_LORA_SLOTS if _SWIN_QKV_SITE.fullmatch(name) else None


def lora_shapes(weight_shape: Sequence[int], slots: tuple[bool, ...] | None):
    out_dim, in_dim = weight_shape
    if slots is None:
        return (LORA_RANK, in_dim), (out_dim, LORA_RANK)
    enabled = sum(slots)
    return (LORA_RANK * enabled, in_dim), (out_dim // len(slots) * enabled, LORA_RANK)


def read_lora_sites(
    lora_sd: Mapping[str, torch.Tensor], base_sd: Mapping[str, torch.Tensor], source: Path | str
) -> list[LoraSite]:
    """Validate every tensor of a DAPE LoRA file; return the sites in official merge order.

    Every key must be the A or B of a known official LoRA layer whose base
    weight is in ``base_sd``, with loralib's shapes for r=8. All problems are
    reported in one CheckpointError naming ``source``.
    """
    problems: list[str] = []
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in lora_sd.items():
        name, dot, part = key.rpartition(".")
        if not dot or part not in ("lora_A", "lora_B"):
            problems.append(f"key {key!r} is not a LoRA tensor (expected '<layer>.lora_A' / '<layer>.lora_B')")
        elif not is_lora_layer(name):
            problems.append(f"unknown LoRA key {key!r}: {name!r} is not a LoRA layer of the official DAPE")
        elif name + ".weight" not in base_sd:
            problems.append(f"LoRA key {key!r} has no base weight {name + '.weight'!r} in the RAM checkpoint")
        else:
            pairs.setdefault(name, {})[part] = tensor
    sites = []
    for name, parts in pairs.items():
        slots = lora_slots(name)
        expected = dict(zip(("lora_A", "lora_B"), lora_shapes(base_sd[name + ".weight"].shape, slots)))
        for part in ("lora_A", "lora_B"):
            if part not in parts:
                problems.append(f"LoRA key {name + '.' + part!r} is missing (its partner is present)")
            elif tuple(parts[part].shape) != expected[part]:
                problems.append(
                    f"LoRA key {name + '.' + part!r} has shape {tuple(parts[part].shape)}, expected {expected[part]}"
                )
        if len(parts) == 2:
            sites.append(LoraSite(name, parts["lora_A"], parts["lora_B"], slots))
    if problems:
        raise CheckpointError(f"{source}: LoRA file does not match the RAM checkpoint:\n  " + "\n  ".join(problems))
    return sorted(sites, key=_merge_rank)


def _merge_rank(site: LoraSite) -> int:
    return next(i for i, prefix in enumerate(_MERGE_ORDER) if site.name.startswith(prefix))


def lora_delta(site: LoraSite) -> torch.Tensor:
    """The weight update loralib adds on ``eval()``: scale * B @ A (zero rows for disabled slots)."""
    if site.slots is None:
        return (site.lora_B @ site.lora_A) * LORA_SCALE
    # loralib MergedLinear.merge_AB: a grouped 1x1 conv computes B_g @ A_g per enabled slot.
    delta = F.conv1d(site.lora_A.unsqueeze(0), site.lora_B.unsqueeze(-1), groups=sum(site.slots)).squeeze(0)
    return _scatter_slots(delta, site.slots, dim=0) * LORA_SCALE


def _scatter_slots(x: torch.Tensor, slots: Sequence[bool], dim: int) -> torch.Tensor:
    """Place the enabled slots' chunks of ``x`` along ``dim``, zeros for disabled ones (loralib zero_pad)."""
    chunks = iter(x.chunk(sum(slots), dim=dim))
    zeros = torch.zeros_like(x.narrow(dim, 0, x.shape[dim] // sum(slots)))
    return torch.cat([next(chunks) if on else zeros for on in slots], dim=dim)


def _tied_weight_key(site: LoraSite, base_sd: Mapping[str, torch.Tensor]) -> str | None:
    """The tagging-head weight that the official model *ties* to this tag_encoder layer.

    RAM ties tagging_head layer i to tag_encoder layer i (tie_encoder_decoder_weights),
    sharing the weight tensors but not the LoRA tensors; on ``eval()`` both LoRA
    layers merge into the one shared weight, tag_encoder's first.
    """
    if not site.name.startswith("tag_encoder.") or ".crossattention." not in site.name:
        return None
    tied = "tagging_head." + site.weight_key.removeprefix("tag_encoder.")
    return tied if tied in base_sd else None


def merge_sites(base_sd: Mapping[str, torch.Tensor], sites: Sequence[LoraSite]) -> dict[str, torch.Tensor]:
    merged = dict(base_sd)
    for site in sites:
        delta = lora_delta(site).to(merged[site.weight_key].dtype)
        for key in filter(None, (site.weight_key, _tied_weight_key(site, base_sd))):
            merged[key] = merged[key] + delta
    return merged


def merge_lora(
    base_sd: Mapping[str, torch.Tensor], lora_sd: Mapping[str, torch.Tensor], source: Path | str
) -> dict[str, torch.Tensor]:
    """Base weights with every LoRA delta of ``lora_sd`` merged, as the official ``model.eval()``.

    Includes the tied-weight quirk: the tag_encoder LoRA of the first tagging-head
    layers also lands in ``tagging_head.*`` (zero in the released DAPE).
    ``source`` (the LoRA file) is named in errors.
    """
    return merge_sites(base_sd, read_lora_sites(lora_sd, base_sd, source))


class LoRALinear(nn.Linear):
    """A linear layer that applies its LoRA at forward time (loralib, unmerged).

    ``y = x W^T + b + scale * (x A^T) B^T``; with ``slots`` (loralib MergedLinear)
    each enabled slot has its own rank-r pair and disabled slots get zeros.
    """

    def __init__(self, in_features: int, out_features: int, slots: tuple[bool, ...] | None = None):
        super().__init__(in_features, out_features)
        self.slots = slots
        a_shape, b_shape = lora_shapes((out_features, in_features), slots)
        self.lora_A = nn.Parameter(torch.zeros(a_shape))
        self.lora_B = nn.Parameter(torch.zeros(b_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low_rank = F.linear(x, self.lora_A)
        if self.slots is None:
            delta = F.linear(low_rank, self.lora_B)
        else:
            groups = zip(low_rank.chunk(sum(self.slots), dim=-1), self.lora_B.chunk(sum(self.slots), dim=0))
            delta = torch.cat([F.linear(a, b) for a, b in groups], dim=-1)
            delta = _scatter_slots(delta, self.slots, dim=-1)
        return F.linear(x, self.weight, self.bias) + delta * LORA_SCALE


def attach_unmerged_lora(model: DAPE, sites: Sequence[LoraSite], dtype: torch.dtype = torch.float32) -> None:
    """Swap each of ``model``'s LoRA sites for a LoRALinear (weights loaded later)."""
    for site in sites:
        if site.name.startswith(IGNORED_PREFIXES):
            continue
        parent_name, _, child_name = site.name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child_name)
        setattr(parent, child_name, LoRALinear(old.in_features, old.out_features, site.slots).to(dtype))


# --- Loading -------------------------------------------------------------------------------


def _unwrap_model(checkpoint: Mapping, source: Path | str) -> dict[str, torch.Tensor]:
    """The official file is ``{'model': state_dict}``; a flat state dict is accepted too."""
    state_dict = checkpoint.get("model", checkpoint) if isinstance(checkpoint, Mapping) else checkpoint
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{source}: expected {{'model': state_dict}} or a flat state dict of tensors")
    return dict(state_dict)


def _drop_recomputed_buffers(
    model: DAPE, state_dict: Mapping[str, torch.Tensor], source: Path | str
) -> dict[str, torch.Tensor]:
    """Drop the buffers the official loader deletes, checking they fit the recomputed ones.

    A shape mismatch would mean the checkpoint was built for another input size.
    """
    buffers = dict(model.named_buffers())
    kept, problems = {}, []
    for key, tensor in state_dict.items():
        if not key.endswith(RECOMPUTED_BUFFER_SUFFIXES) or key.startswith(IGNORED_PREFIXES):
            kept[key] = tensor
        elif key not in buffers:
            problems.append(f"buffer {key!r} does not exist for a {model.config.image_size}px input")
        elif tuple(buffers[key].shape) != tuple(tensor.shape):
            problems.append(f"buffer {key!r} has shape {tuple(tensor.shape)}, expected {tuple(buffers[key].shape)}")
    if problems:
        raise CheckpointError(f"{source}: checkpoint geometry does not match the model:\n  " + "\n  ".join(problems))
    return kept


def load_dape(
    ram_path: Path | str,
    dape_path: Path | str,
    device: str | torch.device = "cpu",
    merge: bool = True,
    dtype: torch.dtype = torch.float32,
) -> DAPE:
    """Build DAPE from the official ``ram_swin_large_14m.pth`` and ``DAPE.pth``.

    ``merge=True`` folds LoRA into the weights (the official inference model);
    ``merge=False`` keeps LoRA as separate tensors applied at forward time
    (for checking the merge). Tensors are cast to ``dtype`` before merging.
    Every checkpoint key is used, except ``IGNORED_PREFIXES`` and the
    recomputed buffers; every LoRA key must be consumed.
    """
    ram_sd = _cast(_unwrap_model(load_state_dict(Path(ram_path), "RAM checkpoint"), ram_path), dtype)
    lora_sd = _cast(load_state_dict(Path(dape_path), "DAPE LoRA"), dtype)
    # Built in ``dtype`` before loading: loading copies into the parameters' dtype.
    model = DAPE(DAPEConfig.from_state_dict(ram_sd, ram_path)).to(dtype)
    ram_sd = _drop_recomputed_buffers(model, ram_sd, ram_path)
    sites = read_lora_sites(lora_sd, ram_sd, dape_path)
    if merge:
        weights = merge_sites(ram_sd, sites)
    else:
        # Only the tied tag_encoder LoRA is folded: it is a change of base weight.
        weights = merge_sites(ram_sd, [s for s in sites if _tied_weight_key(s, ram_sd)])
        attach_unmerged_lora(model, sites, dtype)
        for site in sites:
            if not site.name.startswith(IGNORED_PREFIXES):
                weights[site.name + ".lora_A"] = site.lora_A
                weights[site.name + ".lora_B"] = site.lora_B
    load_strict(model, weights, ram_path, ignore_prefixes=IGNORED_PREFIXES)
    return model.to(device).eval()


def _cast(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}


# --- Tags ------------------------------------------------------------------------------------


def load_tag_list(
    tag_list_path: Path | str, threshold_path: Path | str, num_classes: int
) -> tuple[list[str], np.ndarray]:
    """The tag vocabulary (one tag a line) and per-class thresholds (one float a line).

    Read as the official code does (``splitlines``; ``float(line.strip())``);
    both must have exactly ``num_classes`` entries. Thresholds are float32, the
    dtype the official comparison uses.
    """
    tag_path = require_file(Path(tag_list_path), "tag list")
    tags = tag_path.read_text(encoding="utf-8").splitlines()
    _check_count(tag_path, "tags", len(tags), num_classes)
    threshold_file = require_file(Path(threshold_path), "tag thresholds")
    lines = threshold_file.read_text(encoding="utf-8").splitlines()
    _check_count(threshold_file, "thresholds", len(lines), num_classes)
    thresholds = np.empty(num_classes, dtype=np.float32)
    for number, line in enumerate(lines, start=1):
        try:
            thresholds[number - 1] = float(line.strip())
        except ValueError:
            raise CheckpointError(f"{threshold_file}: line {number} is not a number: {line!r}") from None
    return tags, thresholds


def _check_count(path: Path, what: str, found: int, expected: int) -> None:
    if found != expected:
        raise CheckpointError(f"{path}: found {found} {what}, expected {expected} (one per class)")


def select_tags(tag_logits: torch.Tensor | np.ndarray, tag_list: Sequence[str], thresholds: np.ndarray) -> str:
    """Official ``generate_tag`` after the logits: tags with sigmoid(logit) > threshold.

    Strictly greater, in float32 as the official code; joined with ", " in
    class order (SeeSR's RAM deletes no tags: ``delete_tag_index`` is empty).
    """
    logits = torch.as_tensor(tag_logits, dtype=torch.float32).cpu()
    thresholds = np.asarray(thresholds, dtype=np.float32)
    if logits.shape != (len(tag_list),) or thresholds.shape != (len(tag_list),):
        raise ValueError(
            f"select_tags: logits {tuple(logits.shape)} and thresholds {thresholds.shape} "
            f"must both be ({len(tag_list)},)"
        )
    fired = torch.sigmoid(logits) > torch.from_numpy(thresholds)
    return ", ".join(tag_list[i] for i in fired.nonzero().flatten().tolist())
