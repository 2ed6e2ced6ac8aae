"""The bundle's text files (tokenizer.json, the negative prompt's embedding) and its manifest: assembled
in one place, written once."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from transformers import CLIPTokenizerFast

from seesr_runtime.filemodes import write_atomically
from seesr_runtime.manifest import FORMAT, MANIFEST, SCHEMA_VERSION, Manifest, sha256_file, validate
from seesr_runtime.networks import ModelDims
from seesr_runtime.options import bundle_defaults, describe

from .cache_keys import EXPORT_CODE_VERSION, cache_key
from .errors import CheckpointError
from .export import copy_files
from .models.dape import load_tag_list
from .models.sd2 import load_scheduler_config, load_tokenizer
from .reference import (
    DAPE_SIZE,
    DEFAULT_ADDED_PROMPT,
    DEFAULT_NEGATIVE_PROMPT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    START_STEP,
    encode_prompt,
)

TEXT_FILES = ("tokenizer.json", "negative_prompt_embeds.npy")


# Added-token flags every runtime reads (Python's tokenizers, the native tokenizer): "normalized" either way.
# The others change how a token is cut from its neighbours, and no released CLIP tokenizer sets them.
UNSUPPORTED_ADDED_TOKEN_FLAGS = ("lstrip", "rstrip", "single_word")


def write_tokenizer_json(sd2_folder: Path, path: Path, max_length: int = 77, pad_id: int = 0) -> None:
    """SD2's CLIP tokenizer as one ``tokenizer.json`` the ``tokenizers`` library loads alone,
    with truncation to 77 and padding with id 0 (SD2's pad token "!") built in."""
    slow_or_fast = load_tokenizer(sd2_folder)
    backend = getattr(slow_or_fast, "backend_tokenizer", None)
    if backend is None:  # transformers 4 with the slow tokenizer
        backend = CLIPTokenizerFast.from_pretrained(str(Path(sd2_folder) / "tokenizer")).backend_tokenizer
    tokenizer = Tokenizer.from_str(backend.to_str())
    refuse_unsupported_added_tokens(json.loads(backend.to_str()), Path(sd2_folder) / "tokenizer")
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(length=max_length, pad_id=pad_id, pad_token=tokenizer.id_to_token(pad_id))
    tokenizer.save(str(path))


def refuse_unsupported_added_tokens(tokenizer: dict, folder: Path) -> None:
    """At build time, not on a user's machine: an added token cut in a way no runtime implements is refused,
    naming the files that declare it and the field."""
    for token in tokenizer.get("added_tokens", []):
        for flag in UNSUPPORTED_ADDED_TOKEN_FLAGS:
            if token.get(flag):
                raise CheckpointError(
                    f"{folder / 'tokenizer_config.json'} / special_tokens_map.json: added token "
                    f"{token.get('content')!r} sets {flag}: true; the runtimes read CLIP's added tokens with "
                    f"{', '.join(UNSUPPORTED_ADDED_TOKEN_FLAGS)} false only"
                )


def write_text_files(paths, work: Path, models, sources, previous, progress) -> tuple[ModelDims, dict]:
    """tokenizer.json and the negative prompt's embedding (reused when their inputs are unchanged);
    returns the model dimensions and the manifest's ``text`` cache key."""
    key = cache_key(
        "text",
        EXPORT_CODE_VERSION,
        sources["text_encoder"],
        sources["tokenizer"],
        DEFAULT_NEGATIVE_PROMPT,
        sources["ram"],
        sources["dape"],
        sources["unet"],
        sources["controlnet"],
    )
    if (
        previous is not None
        and previous.data["text"].get("cache_key") == key
        and all(previous.file(n).is_file() for n in TEXT_FILES)
    ):
        copy_files([previous.file(n) for n in TEXT_FILES], work)
        return ModelDims.from_json(previous.data["dims"]), {"cache_key": key}
    progress.stage("tokenizer.json and the negative prompt embedding")
    write_tokenizer_json(paths.sd2, work / "tokenizer.json")
    embeds = encode_prompt(models.tokenizer, models.text_encoder, DEFAULT_NEGATIVE_PROMPT)
    np.save(work / "negative_prompt_embeds.npy", embeds.numpy())
    return models.dims(), {"cache_key": key}


def assemble_manifest(name, dims, networks, paths, sources, versions, text, work: Path) -> dict:
    """The whole manifest of a bundle in ``work`` whose graphs and text files are written."""
    tags, thresholds = load_tag_list(paths.tag_list, paths.tag_thresholds, dims.num_tags)
    vae_config = json.loads((paths.sd2 / "vae" / "config.json").read_text())
    return {
        "schema_version": SCHEMA_VERSION,
        "format": FORMAT,
        "name": name,
        "dims": dims.to_json(),
        "networks": networks,
        "pipeline": {
            "scheduler": {"type": "DDPMScheduler", **load_scheduler_config(paths.sd2)},
            "vae_scaling_factor": float(vae_config.get("scaling_factor", 0.18215)),
            "start_step": START_STEP,
            "prompt_template": "{tags}, {prompt},{added_prompt}",
            "added_prompt": DEFAULT_ADDED_PROMPT,
            "negative_prompt": DEFAULT_NEGATIVE_PROMPT,
            "defaults": bundle_defaults(),
            "options": describe(),  # every option's type, default, range and help, for runtimes in other languages
        },
        "tagger": {
            "input_size": DAPE_SIZE,
            "resize": "bilinear, half-pixel centres, no antialias",
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "tags": tags,
            "thresholds": [float(t) for t in thresholds],
            "rule": "sigmoid(tag_logits) > threshold, joined with ', ' in class order",
        },
        "text": {
            "tokenizer": "tokenizer.json",
            "max_length": dims.text_tokens,
            "pad_id": 0,
            "negative_prompt_embeds": "negative_prompt_embeds.npy",
            **text,
        },
        "provenance": {
            "sources": sources,
            "versions": versions,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "checkout": {f: str(getattr(paths, f)) for f in paths.__dataclass_fields__},
        },
        "files": {n: sha256_file(work / n) for n in TEXT_FILES},
    }


def as_loaded(root: Path, manifest: dict) -> Manifest:
    """``manifest`` as ``Manifest.load`` would read it once written: for the build's later stages (int8
    calibration, engines), which run the bundle before its manifest is written."""
    data = json.loads(json.dumps(manifest))
    validate(data, f"{root / MANIFEST} (being built)")
    manifest = Manifest(Path(root), data)
    manifest.check_paths()
    return manifest


def write_manifest(folder: Path, manifest: dict) -> None:
    """Write ``folder``'s manifest.json whole: a temporary file beside it, then a rename."""
    text = json.dumps(manifest, indent=1) + "\n"
    write_atomically(Path(folder) / MANIFEST, lambda tmp: Path(tmp).write_text(text))
