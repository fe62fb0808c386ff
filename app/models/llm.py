"""The frozen LLM behind a soft prompt: decoder-only (OPT-style) or encoder-decoder (T5-style).

Loaded by Hugging Face id or local path through the Auto classes and frozen (no gradient). A training
composite may run it in train mode (its own dropout, `model.llm_dropout_in_training`, as the reference);
otherwise it stays in eval mode. It returns logits; losses live in `app.losses`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedModel

from app.losses import IGNORE_INDEX
from app.models.frozen import freeze

@dataclass
class LMOutput:
    """Logits (B, T, V) and labels (B, T) of a caption; `shift`: logits at t predict labels at t + 1
    (decoder-only) or are aligned with them (encoder-decoder, teacher forcing)."""

    logits: torch.Tensor
    labels: torch.Tensor
    shift: bool


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, use_gpu: bool) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if use_gpu else torch.float32
    return DTYPES[name]


class FrozenLLM(nn.Module):
    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = freeze(model)

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: torch.dtype = torch.float32) -> "FrozenLLM":
        config = AutoConfig.from_pretrained(name_or_path)
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        return cls(auto.from_pretrained(name_or_path, dtype=dtype))

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(self.model.config.is_encoder_decoder)

    @property
    def embedding_matrix(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight  # (V, D)

    @property
    def embed_dim(self) -> int:
        return self.embedding_matrix.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding_matrix.dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)  # (B, L, D)

    def decoder_logits(self, prompts: torch.Tensor, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor) -> torch.Tensor:
        """Decoder-only: logits over `[prompts; embed(input_ids)]`, shape (B, Q + L, V)."""
        inputs = torch.cat([prompts.to(self.dtype), self.embed(input_ids)], dim=1)  # (B, Q+L, D)
        mask = torch.cat([attention_mask.new_ones(prompts.shape[:2]), attention_mask], dim=1)
        return self.model(inputs_embeds=inputs, attention_mask=mask).logits

    def seq2seq_logits(self, prompts: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       labels: torch.Tensor) -> torch.Tensor:
        """Encoder-decoder: encoder reads `[prompts; embed(input_ids)]`, decoder is teacher-forced on
        `labels` (-100 = ignored). Returns (B, L_target, V) aligned with `labels` (no shift needed)."""
        inputs = torch.cat([prompts.to(self.dtype), self.embed(input_ids)], dim=1)  # (B, Q+L, D)
        mask = torch.cat([attention_mask.new_ones(prompts.shape[:2]), attention_mask], dim=1)
        decoder_input_ids = self.model.prepare_decoder_input_ids_from_labels(labels=labels)
        return self.model(inputs_embeds=inputs, attention_mask=mask, decoder_input_ids=decoder_input_ids).logits

    def caption_logits(self, prompts: torch.Tensor, batch: dict[str, torch.Tensor], ignore_prefix: int = 0) -> LMOutput:
        """Logits and labels of the caption tokens in `batch` behind the soft prompt (B, Q, D).

        Decoder-only: `[prompts; embed(llm_ids)]` predicts `llm_ids`; the first `ignore_prefix` text
        tokens (a text prompt, BOS included) are not scored. Encoder-decoder: the encoder reads
        `[prompts; embed(llm_ids)]` (the prefix) and the decoder predicts `llm_target_ids` (the suffix).
        """
        if self.is_encoder_decoder:
            labels = batch["llm_target_ids"].masked_fill(batch["llm_target_mask"] == 0, IGNORE_INDEX)
            return LMOutput(self.seq2seq_logits(prompts, batch["llm_ids"], batch["llm_mask"], labels), labels,
                            shift=False)
        text_labels = batch["llm_ids"].masked_fill(batch["llm_mask"] == 0, IGNORE_INDEX)
        if ignore_prefix:
            text_labels[:, :ignore_prefix] = IGNORE_INDEX
        labels = torch.cat([text_labels.new_full(prompts.shape[:2], IGNORE_INDEX), text_labels], dim=1)
        return LMOutput(self.decoder_logits(prompts, batch["llm_ids"], batch["llm_mask"]), labels, shift=True)


def llm_is_encoder_decoder(name_or_path: str) -> bool:
    """Whether the LLM at `name_or_path` is encoder-decoder (T5-style), from its config alone."""
    return bool(AutoConfig.from_pretrained(name_or_path).is_encoder_decoder)


def llm_embed_dim(name_or_path: str) -> int:
    """Width of the LLM's input embeddings, from its config alone (no weights)."""
    config = AutoConfig.from_pretrained(name_or_path)
    for attr in ("word_embed_proj_dim", "d_model", "hidden_size", "n_embd"):
        if getattr(config, attr, None):
            return int(getattr(config, attr))
    raise ValueError(f"model.llm: cannot tell the embedding width of {name_or_path}")
