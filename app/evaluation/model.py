"""A trained BLIP-2 (with or without P-Former alignment) rebuilt from a checkpoint, for inference.

    stage-2 checkpoint ('llm')    -> captions / short answers: image -> Q-Former -> llm_proj -> frozen LLM
    stage-1 or stage-2 checkpoint -> retrieval: ITC features and ITM scores of the Q-Former

The frozen parts (image encoder, LLM) are loaded from the URIs the checkpoint's manifest records; the
trainable Q-Former from the checkpoint itself, strictly. Generation follows BLIP-2: the soft prompt
goes in front of the text prompt; decoder-only LLMs stop at a newline (captions were trained with
"\\n" after them), encoder-decoder LLMs at their EOS token.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from app import storage
from app.config import load_config
from app.models.llm import FrozenLLM, resolve_dtype
from app.models.qformer import QFormer
from app.models.vision import VisionEncoder
from app.train.checkpoint import CONFIG_FILE, CheckpointError, find_checkpoint, load_submodule

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class GenerationOptions:
    """Beam search settings; the defaults are BLIP-2's for COCO captioning (LAVIS caption_coco configs)."""

    num_beams: int = 5
    max_new_tokens: int = 30
    min_new_tokens: int = 8
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0

    def as_kwargs(self) -> dict[str, Any]:
        out = asdict(self)
        out["do_sample"] = False
        out["early_stopping"] = self.num_beams > 1
        if self.num_beams == 1:
            out.pop("length_penalty")  # beam-only setting; transformers warns when it is set for greedy search
            out.pop("early_stopping")
        return out


CAPTION_OPTIONS = GenerationOptions()
VQA_OPTIONS = GenerationOptions(num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class TrainedBLIP2(nn.Module):
    """Frozen image encoder + trained Q-Former (+ frozen LLM for a stage-2 checkpoint), in eval mode."""

    def __init__(self, vision: VisionEncoder, qformer: QFormer, llm: Optional[FrozenLLM], *, llm_tokenizer=None,
                 qformer_tokenizer=None, prompt: str = "", image_size: Optional[int] = None,
                 checkpoint: str = "", manifest: Optional[dict] = None, config=None):
        super().__init__()
        self.vision, self.qformer, self.llm = vision, qformer, llm
        self.llm_tokenizer, self.qformer_tokenizer = llm_tokenizer, qformer_tokenizer
        self.prompt = prompt
        self.image_size = image_size or vision.image_size
        self.checkpoint, self.manifest, self.config = checkpoint, manifest or {}, config
        self.eval()
        self.requires_grad_(False)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_checkpoint(cls, uri: str, s3: Optional[storage.S3Options] = None, *, need_llm: bool = True,
                        device: Optional[torch.device | str] = None) -> "TrainedBLIP2":
        from transformers import AutoTokenizer

        from app.train.checkpoint import MANIFEST_FILE, WEIGHTS_FILE, verify_checkpoint

        allowed = ("llm",) if need_llm else ("qformer", "llm")
        purpose = "generating text" if need_llm else "retrieval"
        uri, manifest = find_checkpoint(uri, allowed, s3, purpose=purpose)
        directory = Path(storage.local_model(uri, s3, only=(WEIGHTS_FILE, MANIFEST_FILE, CONFIG_FILE, "qformer")))
        verify_checkpoint(directory, only=(WEIGHTS_FILE, CONFIG_FILE, "qformer"))
        cfg = load_config(directory / CONFIG_FILE)
        device = torch.device(device) if device is not None else default_device()
        use_gpu = device.type == "cuda"
        frozen = manifest.get("frozen", {})
        vision_path = storage.local_model(frozen.get("vision") or cfg.model.vision, s3)
        qformer = QFormer.from_architecture(directory / "qformer")
        load_submodule(qformer, directory, "qformer")
        # A trained ln_vision in the Q-Former takes the tokens before the tower's final LayerNorm.
        vision = VisionEncoder.from_pretrained(vision_path, dtype=resolve_dtype(cfg.model.vision_dtype, use_gpu),
                                               final_layernorm=qformer.ln_vision is None)
        qformer_tokenizer = AutoTokenizer.from_pretrained(directory / "qformer")
        llm = llm_tokenizer = None
        if manifest["stage"] == "llm":
            llm_path = storage.local_model(frozen.get("llm") or cfg.model.llm, s3)
            llm = FrozenLLM.from_pretrained(llm_path, dtype=resolve_dtype(cfg.model.llm_dtype, use_gpu))
            llm_tokenizer = AutoTokenizer.from_pretrained(llm_path)
        model = cls(vision, qformer, llm, llm_tokenizer=llm_tokenizer, qformer_tokenizer=qformer_tokenizer,
                    prompt=manifest.get("prompt", cfg.model.prompt) or "", image_size=cfg.data.image_size,
                    checkpoint=uri, manifest=manifest, config=cfg)
        return model.to(device)

    @property
    def device(self) -> torch.device:
        return self.qformer.query_tokens.device

    @property
    def num_query_tokens(self) -> int:
        return self.qformer.num_query_tokens

    # ------------------------------------------------------------------ generation

    def soft_prompts(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels (B, S, S, 3) -> the LLM soft prompt (B, Q, D_llm)."""
        image_embeds = self.vision(pixels.to(self.device))
        return self.qformer.prompts(image_embeds)

    def stop_token_ids(self) -> list[int]:
        """Decoder-only: newline (BLIP-2's captions end with "\\n") and EOS; encoder-decoder: EOS."""
        tok = self.llm_tokenizer
        ids = [] if self.llm.is_encoder_decoder else tok("\n", add_special_tokens=False).input_ids[-1:]
        if tok.eos_token_id is not None and tok.eos_token_id not in ids:
            ids.append(tok.eos_token_id)
        return ids

    def unused_token_ids(self) -> list[int]:
        """Embedding rows past the tokenizer's vocabulary (padding rows such as OPT's 50265..50271): never
        generated, as no text maps to them."""
        return list(range(len(self.llm_tokenizer), self.llm.embedding_matrix.shape[0]))

    @torch.no_grad()
    def generate_ids(self, pixels: torch.Tensor, prompts: Sequence[str],
                     options: GenerationOptions = GenerationOptions()) -> torch.Tensor:
        """Generated token ids (B, T): only the new tokens for decoder-only LLMs; the decoder sequence
        (starting with the decoder start token) for encoder-decoder LLMs."""
        if self.llm is None:
            raise CheckpointError("this checkpoint has no LLM (stage 1): text generation needs a stage-2 checkpoint")
        if len(prompts) != pixels.shape[0]:
            raise ValueError(f"{pixels.shape[0]} images but {len(prompts)} prompts")
        soft = self.soft_prompts(pixels).to(self.llm.dtype)  # (B, Q, D)
        tok = self.llm_tokenizer
        enc = tok(list(prompts), padding=True, padding_side="right", return_tensors="pt").to(self.device)
        text = self.llm.embed(enc.input_ids)
        embeds = torch.cat([soft, text], dim=1)
        mask = torch.cat([enc.attention_mask.new_ones(soft.shape[:2]), enc.attention_mask], dim=1)
        if not self.llm.is_encoder_decoder:
            embeds, mask = left_align(embeds, mask)  # decoder-only generation continues from the last position
        kwargs = options.as_kwargs()
        unused = self.unused_token_ids()
        if unused:
            kwargs["suppress_tokens"] = unused
        return self.llm.model.generate(inputs_embeds=embeds, attention_mask=mask, eos_token_id=self.stop_token_ids(),
                                       pad_token_id=tok.pad_token_id, **kwargs)

    def decode(self, ids: torch.Tensor) -> list[str]:
        return [text.strip() for text in self.llm_tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def generate(self, pixels: torch.Tensor, prompts: Optional[Sequence[str]] = None,
                 options: GenerationOptions = GenerationOptions()) -> list[str]:
        """Captions (or answers) for uint8 pixels (B, S, S, 3); `prompts` defaults to the trained prompt."""
        prompts = list(prompts) if prompts is not None else [self.prompt] * pixels.shape[0]
        return self.decode(self.generate_ids(pixels, prompts, options))

    # ------------------------------------------------------------------ retrieval

    @torch.no_grad()
    def image_features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image tokens (B, N, D_vision), normalised ITC query features (B, Q, C))."""
        image_embeds = self.vision(pixels.to(self.device))
        return image_embeds, self.qformer.image_features(self.qformer.encode_image(image_embeds))

    def tokenize_text(self, texts: Sequence[str], max_length: int = 35) -> tuple[torch.Tensor, torch.Tensor]:
        """Q-Former tokens of `texts`, normalised as the training captions were (data.caption_style)."""
        if self.config is not None:
            from app.data.text import normalise_caption

            data = self.config.data
            texts = [normalise_caption(t, data.caption_style, data.max_words, data.max_chars) for t in texts]
        enc = self.qformer_tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                                     return_tensors="pt").to(self.device)
        return enc.input_ids, enc.attention_mask

    @torch.no_grad()
    def text_features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Normalised ITC text features (B, C) from the [CLS] output of the text-only pass."""
        return self.qformer.text_features(ids, mask)

    @torch.no_grad()
    def itm_scores(self, image_embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ITM "match" logit (B,) for image i with text i, averaged over the queries (as in training)."""
        return self.qformer.match_logits(ids, mask, image_embeds.to(self.device))[:, 1].float()


def left_align(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's padding (mask 0, at the end) to the front, keeping the order of the rest."""
    lengths = mask.sum(dim=1)
    width = mask.shape[1]
    if bool((lengths == width).all()):
        return embeds, mask
    out_e, out_m = torch.zeros_like(embeds), torch.zeros_like(mask)
    for row, n in enumerate(lengths.tolist()):
        keep = mask[row].bool()
        out_e[row, width - n:] = embeds[row, keep]
        out_m[row, width - n:] = 1
    return out_e, out_m
