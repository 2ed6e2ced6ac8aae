"""Random-weight stand-ins for SeeSR's RAM / DAPE checkpoints and tag files.

The files have the exact key layout of the official ``ram_swin_large_14m.pth``
(``{'model': state_dict}``, including the parts inference ignores and the
recomputed buffers) and ``DAPE.pth`` (LoRA tensors only, as
``loralib.lora_state_dict`` of the official model). ``size="tiny"`` keeps every
tensor small for tests; ``size="sd2"`` has the real Swin-L / BERT-base shapes
(about 2.5 GB: not for unit tests).

Everything is a deterministic function of ``seed``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoints import load_state_dict
from ..models.dape import (
    IMAGE_SIZE,
    is_lora_layer,
    load_dape,
    lora_shapes,
    lora_slots,
    relative_position_index,
    shifted_window_mask,
)

NUM_CLASSES = 4585  # RAM's tag vocabulary (ram_tag_list.txt)
IMAGE_EMBED_DIM = 512  # image_proj output = UNet image cross-attention context
LABEL_DIM = 512  # label_embed columns (q2l encoder_width)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class RamSize:
    embed_dim: int
    depths: tuple[int, ...]
    swin_heads: tuple[int, ...]  # encoded in the bias-table shapes
    tag_hidden: int  # tagging head, and the captioning BERTs (tied to it officially)
    tag_intermediate: int
    tag_encoder_layers: int  # captioning BERTs: only key names matter
    text_decoder_layers: int
    vocab: int
    max_positions: int
    window: int = 12
    patch: int = 4
    tag_layers: int = 2


SIZES = {
    # Head dims: Swin 32 everywhere; tag head 64/4 = 16.
    "tiny": RamSize(32, (2, 2, 2, 2), (1, 2, 4, 8), 64, 128, 3, 2, vocab=64, max_positions=16),
    # configs/swin/config_swinL_384.json + configs/med_config.json + q2l_config.json.
    "sd2": RamSize(192, (2, 2, 18, 2), (6, 12, 24, 48), 768, 3072, 12, 12, vocab=30524, max_positions=512),
}

# Tag logit = fc(h) with h layer-normed: these put a few percent of the
# 4585 tiny-fixture tags above thresholds in 0.6..0.9 (checked by the tests).
_FC_WEIGHT_GAIN = 3.0
_FC_BIAS = -2.0
# LoRA B scale: makes the merged delta about a third of the base weights.
_LORA_B_STD = 1.5


# --- Layout: key -> (shape, how to fill it), in the official state_dict order --------


@dataclass(frozen=True, eq=False)
class Entry:
    """One state-dict key: its shape and how the fixture fills it."""

    shape: tuple[int, ...]
    # "weight", "bias", "norm_weight", "norm_bias", "embedding", "table", "label",
    # "fc_weight", "fc_bias" (random, see _random); "const" (value); "tied" (tied_to's tensor)
    fill: str
    value: torch.Tensor | None = None
    tied_to: str | None = None


def _tied(shape: tuple[int, ...], key: str) -> Entry:
    return Entry(shape, "tied", tied_to=key)


def _linear(layout: dict, prefix: str, out_dim: int, in_dim: int, bias: bool = True) -> None:
    layout[prefix + ".weight"] = Entry((out_dim, in_dim), "weight")
    if bias:
        layout[prefix + ".bias"] = Entry((out_dim,), "bias")


def _norm(layout: dict, prefix: str, dim: int) -> None:
    layout[prefix + ".weight"] = Entry((dim,), "norm_weight")
    layout[prefix + ".bias"] = Entry((dim,), "norm_bias")


def _swin_layout(layout: dict, size: RamSize) -> None:
    p = "visual_encoder."
    layout[p + "patch_embed.proj.weight"] = Entry((size.embed_dim, 3, size.patch, size.patch), "weight")
    layout[p + "patch_embed.proj.bias"] = Entry((size.embed_dim,), "bias")
    _norm(layout, p + "patch_embed.norm", size.embed_dim)
    resolution = IMAGE_SIZE // size.patch
    for stage, (depth, heads) in enumerate(zip(size.depths, size.swin_heads)):
        dim = size.embed_dim * 2**stage
        window = min(size.window, resolution)
        for block in range(depth):
            b = f"{p}layers.{stage}.blocks.{block}."
            shift = window // 2 if block % 2 and resolution > size.window else 0
            if shift:  # the block's own buffer comes before its children
                mask = shifted_window_mask(resolution, window, shift)
                layout[b + "attn_mask"] = Entry(tuple(mask.shape), "const", mask)
            _norm(layout, b + "norm1", dim)
            layout[b + "attn.relative_position_bias_table"] = Entry(((2 * window - 1) ** 2, heads), "table")
            index = relative_position_index(window)
            layout[b + "attn.relative_position_index"] = Entry(tuple(index.shape), "const", index)
            _linear(layout, b + "attn.qkv", 3 * dim, dim)
            _linear(layout, b + "attn.proj", dim, dim)
            _norm(layout, b + "norm2", dim)
            _linear(layout, b + "mlp.fc1", 4 * dim, dim)
            _linear(layout, b + "mlp.fc2", dim, 4 * dim)
        if stage < len(size.depths) - 1:
            _linear(layout, f"{p}layers.{stage}.downsample.reduction", 2 * dim, 4 * dim, bias=False)
            _norm(layout, f"{p}layers.{stage}.downsample.norm", 4 * dim)
            resolution //= 2
    _norm(layout, p + "norm", size.embed_dim * 2 ** (len(size.depths) - 1))


def _bert_attention(layout: dict, prefix: str, hidden: int, context_dim: int) -> None:
    _linear(layout, prefix + ".self.query", hidden, hidden)
    _linear(layout, prefix + ".self.key", hidden, context_dim)
    _linear(layout, prefix + ".self.value", hidden, context_dim)
    _linear(layout, prefix + ".output.dense", hidden, hidden)
    _norm(layout, prefix + ".output.LayerNorm", hidden)


def _bert_layer(layout: dict, prefix: str, size: RamSize, context_dim: int, self_attention: bool) -> None:
    if self_attention:
        _bert_attention(layout, prefix + ".attention", size.tag_hidden, size.tag_hidden)
    _bert_attention(layout, prefix + ".crossattention", size.tag_hidden, context_dim)
    _linear(layout, prefix + ".intermediate.dense", size.tag_intermediate, size.tag_hidden)
    _linear(layout, prefix + ".output.dense", size.tag_hidden, size.tag_intermediate)
    _norm(layout, prefix + ".output.LayerNorm", size.tag_hidden)


def _bert_embeddings(layout: dict, prefix: str, size: RamSize) -> None:
    positions = torch.arange(size.max_positions).unsqueeze(0)
    layout[prefix + ".position_ids"] = Entry(tuple(positions.shape), "const", positions)
    layout[prefix + ".word_embeddings.weight"] = Entry((size.vocab, size.tag_hidden), "embedding")
    layout[prefix + ".position_embeddings.weight"] = Entry((size.max_positions, size.tag_hidden), "embedding")
    _norm(layout, prefix + ".LayerNorm", size.tag_hidden)


def _tag_encoder_layout(layout: dict, size: RamSize) -> None:
    """Captioning encoder (BertModel, cross-attention width 512), first layers tied to tagging_head."""
    _bert_embeddings(layout, "tag_encoder.embeddings", size)
    for i in range(size.tag_encoder_layers):
        prefix = f"tag_encoder.encoder.layer.{i}"
        layer: dict = {}
        _bert_layer(layer, prefix, size, IMAGE_EMBED_DIM, self_attention=True)
        for key, entry in layer.items():
            tied = i < size.tag_layers and ".attention." not in key
            tied_key = "tagging_head." + key.removeprefix("tag_encoder.")
            layout[key] = _tied(entry.shape, tied_key) if tied else entry


def _text_decoder_layout(layout: dict, size: RamSize) -> None:
    """Captioning decoder (BertLMHeadModel, cross-attention width 768 = its own hidden)."""
    _bert_embeddings(layout, "text_decoder.bert.embeddings", size)
    for i in range(size.text_decoder_layers):
        _bert_layer(layout, f"text_decoder.bert.encoder.layer.{i}", size, size.tag_hidden, self_attention=True)
    p = "text_decoder.cls.predictions."
    layout[p + "bias"] = Entry((size.vocab,), "bias")
    _linear(layout, p + "transform.dense", size.tag_hidden, size.tag_hidden)
    _norm(layout, p + "transform.LayerNorm", size.tag_hidden)
    # Output embeddings tied to the input ones; decoder.bias *is* predictions.bias.
    word_embeddings = "text_decoder.bert.embeddings.word_embeddings.weight"
    layout[p + "decoder.weight"] = _tied((size.vocab, size.tag_hidden), word_embeddings)
    layout[p + "decoder.bias"] = _tied((size.vocab,), p + "bias")


def ram_layout(size: str) -> dict[str, Entry]:
    """Every key of the official RAM state dict for ``size``, in official order."""
    dims = SIZES[size]
    layout: dict[str, Entry] = {"label_embed": Entry((NUM_CLASSES, LABEL_DIM), "label")}
    _swin_layout(layout, dims)
    _tag_encoder_layout(layout, dims)
    _text_decoder_layout(layout, dims)
    for i in range(dims.tag_layers):
        _bert_layer(layout, f"tagging_head.encoder.layer.{i}", dims, IMAGE_EMBED_DIM, self_attention=False)
    _linear(layout, "wordvec_proj", dims.tag_hidden, LABEL_DIM)
    layout["fc.weight"] = Entry((1, dims.tag_hidden), "fc_weight")
    layout["fc.bias"] = Entry((1,), "fc_bias")
    _linear(layout, "image_proj", IMAGE_EMBED_DIM, dims.embed_dim * 2 ** (len(dims.depths) - 1))
    return layout


# --- Filling ----------------------------------------------------------------------------------


_NOISE_SCALE = {"bias": 0.02, "norm_bias": 0.02, "embedding": 0.02, "table": 0.5, "label": 1.0}


def _random(entry: Entry, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(entry.shape, generator=generator)
    if entry.fill == "weight":  # 1/sqrt(fan_in) keeps activations O(1) through each layer
        return noise / math.prod(entry.shape[1:]) ** 0.5
    if entry.fill == "norm_weight":
        return 1.0 + 0.1 * noise
    if entry.fill == "fc_weight":
        return noise * _FC_WEIGHT_GAIN / entry.shape[1] ** 0.5
    if entry.fill == "fc_bias":
        return torch.full(entry.shape, _FC_BIAS)
    return noise * _NOISE_SCALE[entry.fill]


def fill_layout(layout: dict[str, Entry], seed: int) -> dict[str, torch.Tensor]:
    """Tensors for a layout; tied keys share one tensor, as in the official save."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for key, entry in layout.items():
        if entry.fill == "const":
            tensors[key] = entry.value.clone()
        elif entry.fill != "tied":
            tensors[key] = _random(entry, generator)
    # Tied keys may point forward (tag_encoder -> tagging_head): resolve them last.
    return {key: tensors[entry.tied_to or key] for key, entry in layout.items()}


def write_ram_checkpoint(path: Path | str, size: str = "tiny", seed: int = 0) -> Path:
    """``{'model': state_dict}`` with the official ``ram_swin_large_14m.pth`` layout."""
    path = Path(path)
    torch.save({"model": fill_layout(ram_layout(size), seed)}, path)
    return path


# --- DAPE LoRA -----------------------------------------------------------------------------------


def lora_layout(base_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """``lora_A`` / ``lora_B`` shapes of every official LoRA layer present in ``base_shapes``."""
    layout = {}
    for key, shape in base_shapes.items():
        name = key.removesuffix(".weight")
        if key.endswith(".weight") and is_lora_layer(name):
            a_shape, b_shape = lora_shapes(shape, lora_slots(name))
            layout[name + ".lora_A"] = a_shape
            layout[name + ".lora_B"] = b_shape
    return layout


def _trained(name: str) -> bool:
    """DAPE trains the Swin and the tagging head; the captioning BERTs get no gradient,
    so their LoRA B stays at loralib's zero init (as in the released DAPE.pth)."""
    return name.startswith(("visual_encoder.", "tagging_head."))


def _base_shapes(ram: str | Path) -> dict[str, tuple[int, ...]]:
    if isinstance(ram, str) and ram in SIZES:
        return {key: entry.shape for key, entry in ram_layout(ram).items()}
    checkpoint = load_state_dict(Path(ram), "RAM checkpoint")
    return {key: tuple(t.shape) for key, t in checkpoint.get("model", checkpoint).items()}


def write_dape_lora(path: Path | str, ram: str | Path = "tiny", seed: int = 0) -> Path:
    """A LoRA-only ``DAPE.pth`` for a RAM checkpoint (a path) or fixture size.

    A is loralib's init distribution (uniform, bound 1/sqrt(in)); B is non-zero
    for the trained parts so merging is exercised, zero for the captioning BERTs.
    """
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in lora_layout(_base_shapes(ram)).items():
        if key.endswith("lora_A"):
            tensors[key] = (torch.rand(shape, generator=generator) * 2 - 1) / shape[1] ** 0.5
        elif _trained(key):
            tensors[key] = torch.randn(shape, generator=generator) * _LORA_B_STD
        else:
            tensors[key] = torch.zeros(shape)
    path = Path(path)
    torch.save(tensors, path)
    return path


# --- Tag files and images ---------------------------------------------------------------------


def synthetic_tags(count: int, seed: int) -> list[str]:
    """Distinct pronounceable words; every seventh tag has two words, like 'living room'."""
    rng = np.random.default_rng(seed)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words = ["".join(parts) for parts in itertools.product(syllables, repeat=2)]
    words = [str(w) for w in rng.permutation(words)]
    tags = []
    for i in range(count):
        tags.append(f"{words[i]} {words[-1 - i]}" if i % 7 == 6 else words[i])
    return tags


def write_tag_files(
    tag_list_path: Path | str,
    threshold_path: Path | str,
    seed: int = 0,
    count: int = NUM_CLASSES,
    final_newline: bool = True,
) -> tuple[Path, Path]:
    """``ram_tag_list.txt`` and ``ram_tag_list_threshold.txt`` stand-ins (thresholds 0.6..0.9); the tag list
    ends with a newline only when ``final_newline``."""
    thresholds = np.random.default_rng(seed + 1).uniform(0.6, 0.9, size=count)
    tag_list_path, threshold_path = Path(tag_list_path), Path(threshold_path)
    tags = "\n".join(synthetic_tags(count, seed))
    tag_list_path.write_text(tags + ("\n" if final_newline else ""), encoding="utf-8")
    threshold_path.write_text("".join(f"{t:.4f}\n" for t in thresholds), encoding="utf-8")
    return tag_list_path, threshold_path


def sample_image(seed: int = 0, batch: int = 1) -> torch.Tensor:
    """A smooth random colour image, ImageNet-normalised: [batch, 3, 384, 384] float32."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 6, 6, generator=generator)
    image = torch.nn.functional.interpolate(coarse, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (image - mean) / std


def calibrate_tag_bias(
    ram_path: Path | str, dape_path: Path | str, threshold_path: Path | str, target_tags: int = 20
) -> float:
    """Shift ``fc.bias`` so that exactly ``target_tags`` tags fire on ``sample_image()``.

    Random weights give tag logits a large, seed-dependent common offset; without
    this either none or thousands of the 4585 tags fire. Real RAM fires tens, and
    prompts of that length are what the rest of the pipeline should be tested on.
    Returns the shift applied.
    """
    with torch.no_grad():
        _, logits = load_dape(ram_path, dape_path)(sample_image(seed=0))
    thresholds = torch.tensor([float(v) for v in Path(threshold_path).read_text().split()])
    # A tag fires when logit + shift > logit(threshold): sort those margins.
    margins, _ = torch.sort(torch.logit(thresholds.double()) - logits[0].double())
    shift = float((margins[target_tags - 1] + margins[target_tags]) / 2)
    checkpoint = torch.load(ram_path, map_location="cpu", weights_only=True)
    checkpoint["model"]["fc.bias"] = checkpoint["model"]["fc.bias"] + shift
    torch.save(checkpoint, ram_path)
    return shift
