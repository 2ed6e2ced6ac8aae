"""Prompt -> CLIP embeddings: the bundle's tokenizer.json and text_encoder graph."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

from .manifest import Manifest
from .tensors import Backend, FloatArray


class PromptEncoder:
    def __init__(self, manifest: Manifest, backend: Backend):
        text = manifest.data["text"]
        self.backend = backend
        self.tokenizer = Tokenizer.from_file(str(manifest.file(text["tokenizer"], "text tokenizer")))
        self.max_length = text["max_length"]
        self.default_negative = manifest.data["pipeline"]["negative_prompt"]
        # The default negative prompt's embedding is the same for every image: computed at build time.
        self.negative_embeds = np.load(
            manifest.file(text["negative_prompt_embeds"], "text negative_prompt_embeds")
        ).astype(np.float32)

    def token_ids(self, text: str) -> npt.NDArray[np.int64]:
        """int64 [1, 77]: BOS, tokens, EOS, truncated and padded with id 0 (built into tokenizer.json)."""
        ids = self.tokenizer.encode(text).ids
        if len(ids) != self.max_length:
            raise ValueError(f"tokenizer.json gave {len(ids)} ids, expected {self.max_length} (padding missing?)")
        return np.asarray([ids], dtype=np.int64)

    def encode(self, text: str) -> FloatArray:
        embeds: FloatArray = self.backend.run("text_encoder", {"input_ids": self.token_ids(text)})[0]
        return embeds

    def encode_negative(self, text: str) -> FloatArray:
        return self.negative_embeds if text == self.default_negative else self.encode(text)
