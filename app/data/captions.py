"""Captions of image-text samples: which tokenizers they go through (`CaptionSpec`) and the tokenizing.

Stage 1 tokenizes for the Q-Former's text side, stage 2 for the frozen LLM (decoder-only: prompt +
caption + "\n"; encoder-decoder: a random split into prefix and target, as BLIP-2's T5 variant), and
both for the frozen P-Former when the alignment loss is on. `trim_padding` cuts a device batch's token
columns to its longest row.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from app import storage
from app.data.text import load_tokenizer, normalise_caption, split_words, tokenize


@dataclass(frozen=True)
class CaptionSpec:
    """Which tokenizers the captions go through (URIs or paths, resolved on each worker)."""

    qformer: Optional[str] = None  # stage 1: the Q-Former's text side
    pformer: Optional[str] = None  # the frozen P-Former (alignment targets)
    llm: Optional[str] = None      # stage 2: the frozen LLM
    llm_is_encoder_decoder: bool = False
    prompt: str = ""
    max_txt_len: int = 32
    max_chars: int = 1000
    caption_style: str = "blip"  # data.caption_style (app.data.text.normalise_caption)
    max_words: int = 50

    def normalise(self, text: str) -> str:
        return normalise_caption(text, self.caption_style, self.max_words, self.max_chars)


@functools.lru_cache(maxsize=8)
def _tokenizer(uri: str, s3: Optional[storage.S3Options]):
    return load_tokenizer(storage.local_model(uri, s3))


@functools.lru_cache(maxsize=8)
def prompt_length(llm_tokenizer: str, prompt: str, s3: Optional[storage.S3Options] = None) -> int:
    """Tokens the decoder-only prompt occupies at the start of every LLM sequence (BOS included);
    BLIP-2 excludes them from the loss."""
    return len(_tokenizer(llm_tokenizer, s3)(prompt).input_ids)


def tokenize_captions(texts: list[str], spec: CaptionSpec, rng: np.random.Generator,
                      s3: Optional[storage.S3Options] = None) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    if spec.qformer:
        out.update(tokenize(_tokenizer(spec.qformer, s3), texts, spec.max_txt_len, "qformer"))
    if spec.pformer:
        tok = _tokenizer(spec.pformer, s3)
        if spec.qformer and tok.get_vocab() == _tokenizer(spec.qformer, s3).get_vocab():
            out["pformer_ids"], out["pformer_mask"] = out["qformer_ids"], out["qformer_mask"]
        else:
            out.update(tokenize(tok, texts, spec.max_txt_len, "pformer"))
    if spec.llm:
        tok = _tokenizer(spec.llm, s3)
        if spec.llm_is_encoder_decoder:
            prefixes, suffixes = zip(*(split_words(t, rng) for t in texts))
            inputs = [f"{spec.prompt} {p}".strip() if spec.prompt else p for p in prefixes]
            width = spec.max_txt_len + (prompt_length(spec.llm, spec.prompt, s3) if spec.prompt else 0)
            out.update(tokenize(tok, inputs, width, "llm"))
            out.update(tokenize(tok, list(suffixes), spec.max_txt_len, "llm_target"))
        else:
            width = spec.max_txt_len + prompt_length(spec.llm, spec.prompt, s3)
            out.update(tokenize(tok, [spec.prompt + t + "\n" for t in texts], width, "llm"))
    return out


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cut every `<name>_ids`/`<name>_mask` pair to its longest row (data is right-padded to a fixed width)."""
    out = dict(batch)
    for key in batch:
        if key.endswith("_mask"):
            name = key[: -len("_mask")]
            width = max(1, int(batch[key].sum(dim=1).max()))
            out[key] = batch[key][:, :width]
            if f"{name}_ids" in batch:
                out[f"{name}_ids"] = batch[f"{name}_ids"][:, :width]
    return out
