"""The Q-Former: transformers' `Blip2QFormerModel` with learned queries, BERT-style text embeddings,
the stage-1 heads (ITC, ITM, ITG) and `llm_proj` (stage 1's `llm_proj_q`, stage 2's `llm_proj`).

    queries (1, Q, H) --self-attn + cross-attn to image tokens (every `cross_attention_frequency` layers)
                       + query FFN--> (B, Q, H) --llm_proj--> (B, Q, D_llm) soft prompt

Text runs through the same self-attention layers with its own FFN. Three ways to call it:
  text alone (query_length=0)                            -> ITC text features ([CLS])
  queries + text, bidirectional mask                     -> ITM
  queries + text, multimodal causal mask ([DEC] first)   -> ITG (LM head tied to the word embeddings)
`forward` runs the passes a step asks for (`Passes`) in one call, so DDP sees them all, and returns a
`QFormerOutput` (features, similarities, ITM and ITG logits, prompts); the losses are computed from it.

`from_bert` initialises every shared weight from a BERT checkpoint (bert-base-uncased in the paper):
self-attention, both FFNs (query and text copies), embeddings and the MLM head transform; the
cross-attention layers, queries and heads start fresh, as in BLIP-2. Embedding rows BERT does not have
([DEC]) start as BERT initialises its rows: normal with std `initializer_range` (0.02).

`ln_vision=True`: BLIP-2's `ln_vision`, a LayerNorm over the image tokens (identity at the start), is part
of the Q-Former and trained with it in stages 1 and 2; the frozen encoder then hands over the tokens
before the tower's own final LayerNorm (`app.models.vision`). Export writes it as the tower's
`post_layernorm`. Q-Formers saved before it existed (`ln_vision` absent) use the tower's frozen LayerNorm.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel
from transformers.utils import logging as transformers_logging
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

from app.losses import IGNORE_INDEX, hard_negative_indices, itc_similarities, same_image_mask
from app.train import dist

logger = logging.getLogger(__name__)

HEADS_FILE = "qformer_heads.json"
DEC_TOKEN = "[DEC]"


@dataclass(frozen=True)
class Passes:
    """Which passes a Q-Former call runs besides the queries (stage 1: those whose loss weight is > 0)."""

    prompts: bool = True  # llm_proj of the queries (stage 2, and stage 1's alignment loss)
    itc: bool = False
    itm: bool = False
    itg: bool = False
    gather_with_grad: bool = False      # ITC: see app.train.dist.gather_features
    same_image_positives: bool = False  # captions of one image: ITC positives, never ITM negatives


@dataclass
class QFormerOutput:
    """One Q-Former call's tensors (None where the pass did not run); losses are computed from them
    (`app.losses`), retrieval reads the features. N = the global batch (every worker's samples)."""

    query_output: torch.Tensor                   # (B, Q, H)
    prompts: Optional[torch.Tensor] = None       # (B, Q, D_llm)
    image_feats: Optional[torch.Tensor] = None   # (B, Q, C) normalised, one per query
    text_feat: Optional[torch.Tensor] = None     # (B, C) normalised [CLS]
    sim_i2t: Optional[torch.Tensor] = None       # (B, N) best query of each local image x every caption
    sim_t2i: Optional[torch.Tensor] = None       # (B, N) each local caption x best query of every image
    temp: Optional[torch.Tensor] = None          # ITC temperature, clamped to [0.001, 0.5]
    offset: int = 0                              # column of local row 0 in the global batch
    same_image: Optional[torch.Tensor] = None    # (B, N) bool, with same_image_positives
    itm_logits: Optional[torch.Tensor] = None    # (3B, 2): positives, (image, negative text), (negative image, text)
    itg_logits: Optional[torch.Tensor] = None    # (B, L, V)
    itg_labels: Optional[torch.Tensor] = None    # (B, L), IGNORE_INDEX at padding


class QFormer(nn.Module):
    def __init__(self, config: Blip2QFormerConfig, num_query_tokens: int, llm_dim: int, bos_token_id: int,
                 contrastive_dim: int = 256, temp_init: float = 0.07, num_frames: int = 0,
                 frame_pooling: str = "concat", ln_vision: bool = False):
        super().__init__()
        if not config.use_qformer_text_input:
            raise ValueError("the Q-Former needs use_qformer_text_input=True (text FFN for ITC/ITM/ITG)")
        hidden = config.hidden_size
        self.config = config
        self.num_query_tokens = num_query_tokens
        self.llm_dim = llm_dim
        self.bos_token_id = bos_token_id
        self.query_tokens = nn.Parameter(torch.randn(1, num_query_tokens, hidden) * config.initializer_range)
        self.embeddings = Blip2TextEmbeddings(config)
        for table in (self.embeddings.word_embeddings, self.embeddings.position_embeddings):
            nn.init.normal_(table.weight, std=config.initializer_range)  # BERT's init, not nn.Embedding's N(0, 1)
        self.bert = Blip2QFormerModel(config)
        self.vision_proj = nn.Linear(hidden, contrastive_dim)
        self.text_proj = nn.Linear(hidden, contrastive_dim)
        self.itm_head = nn.Linear(hidden, 2)
        self.lm_transform = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(),
                                          nn.LayerNorm(hidden, eps=config.layer_norm_eps))
        self.lm_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.llm_proj = nn.Linear(hidden, llm_dim)
        self.temp = nn.Parameter(torch.tensor(float(temp_init)))
        # Video: a learned position per frame, added to that frame's tokens before the cross-attention memory is
        # built. Zero at the start, so a video Q-Former starts as the image one and learns frame order.
        if frame_pooling not in ("concat", "mean"):
            raise ValueError(f"frame_pooling must be 'concat' or 'mean', not {frame_pooling!r}")
        self.num_frames, self.frame_pooling = num_frames, frame_pooling
        if num_frames:
            self.frame_position = nn.Parameter(torch.zeros(num_frames, 1, config.encoder_hidden_size))
        # BLIP-2's ln_vision (torch's default init: weight 1, bias 0; eps 1e-5 as LAVIS's LayerNorm).
        self.ln_vision = nn.LayerNorm(config.encoder_hidden_size) if ln_vision else None

    # ------------------------------------------------------------------ construction and saving

    @classmethod
    def from_bert(cls, name_or_path: str, *, num_query_tokens: int, encoder_hidden_size: int, llm_dim: int,
                  cross_attention_frequency: int = 2, contrastive_dim: int = 256, temp_init: float = 0.07,
                  dropout: Optional[float] = None, num_frames: int = 0, frame_pooling: str = "concat",
                  ln_vision: bool = False):
        """A Q-Former initialised from a BERT checkpoint; returns (qformer, tokenizer with [DEC])."""
        from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

        bert_config = BertConfig.from_pretrained(name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
        config = Blip2QFormerConfig(
            vocab_size=len(tokenizer), hidden_size=bert_config.hidden_size,
            num_hidden_layers=bert_config.num_hidden_layers, num_attention_heads=bert_config.num_attention_heads,
            intermediate_size=bert_config.intermediate_size, hidden_act=bert_config.hidden_act,
            hidden_dropout_prob=bert_config.hidden_dropout_prob if dropout is None else dropout,
            attention_probs_dropout_prob=bert_config.attention_probs_dropout_prob if dropout is None else dropout,
            max_position_embeddings=bert_config.max_position_embeddings,
            initializer_range=bert_config.initializer_range, layer_norm_eps=bert_config.layer_norm_eps,
            pad_token_id=bert_config.pad_token_id or 0, cross_attention_frequency=cross_attention_frequency,
            encoder_hidden_size=encoder_hidden_size, use_qformer_text_input=True)
        model = cls(config, num_query_tokens, llm_dim, tokenizer.bos_token_id, contrastive_dim, temp_init,
                    num_frames, frame_pooling, ln_vision)
        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()  # a BERT saved without its MLM head is fine: the head starts fresh
        try:
            mlm = BertForMaskedLM.from_pretrained(name_or_path)
        finally:
            transformers_logging.set_verbosity(verbosity)
        fresh = model.load_bert(mlm)
        logger.info("Q-Former from %s; initialised fresh: %s", name_or_path,
                    sorted({name.split(".")[0] if "crossattention" not in name else "crossattention" for name in fresh}))
        return model, tokenizer

    @torch.no_grad()
    def load_bert(self, mlm) -> list[str]:
        """Copy a `BertForMaskedLM`'s weights into the shared parts; returns the names left fresh."""
        src = mlm.state_dict()
        vocab = src["bert.embeddings.word_embeddings.weight"].shape[0]
        mapped: dict[str, torch.Tensor] = {}
        for key, value in src.items():
            if key.startswith("bert.embeddings."):
                name = key.removeprefix("bert.embeddings.")
                if name.startswith(("word_embeddings", "position_embeddings")):
                    mapped[f"embeddings.{name}"] = value
                elif name.startswith("LayerNorm."):
                    mapped[f"bert.layernorm.{name.removeprefix('LayerNorm.')}"] = value
            elif key.startswith("bert.encoder.layer."):
                rest = key.removeprefix("bert.encoder.")
                rest = rest.replace(".attention.self.", ".attention.attention.")
                mapped[f"bert.encoder.{rest}"] = value
                # BERT's FFN initialises both the text FFN and the query FFN (as in BLIP-2).
                for text_ffn, query_ffn in ((".intermediate.", ".intermediate_query."), (".output.", ".output_query.")):
                    if text_ffn in rest and ".attention." not in rest:
                        mapped[f"bert.encoder.{rest.replace(text_ffn, query_ffn)}"] = value
            elif key.startswith("cls.predictions.transform."):
                name = key.removeprefix("cls.predictions.transform.")
                index = 0 if name.startswith("dense.") else 2
                mapped[f"lm_transform.{index}.{name.split('.', 1)[1]}"] = value
            elif key == "cls.predictions.bias":
                mapped["lm_bias"] = value
        own = self.state_dict()
        for name, value in mapped.items():
            if name not in own:
                raise KeyError(f"BERT weight {name} has no place in the Q-Former")
            if name in ("embeddings.word_embeddings.weight", "lm_bias"):
                own[name][:vocab] = value  # the Q-Former's vocabulary adds [DEC] at the end
            else:
                own[name].copy_(value)
        return sorted(set(own) - set(mapped))

    @property
    def heads_config(self) -> dict:
        return {"num_query_tokens": self.num_query_tokens, "llm_dim": self.llm_dim,
                "bos_token_id": self.bos_token_id, "contrastive_dim": self.text_proj.out_features,
                "num_frames": self.num_frames, "frame_pooling": self.frame_pooling,
                "ln_vision": self.ln_vision is not None}

    def save_architecture(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(directory)
        (directory / HEADS_FILE).write_text(json.dumps(self.heads_config))

    @classmethod
    def from_architecture(cls, directory: str | Path, dropout: Optional[float] = None) -> "QFormer":
        directory = Path(directory)
        heads = json.loads((directory / HEADS_FILE).read_text())
        if "ln_vision" not in heads:
            logger.warning("%s: a Q-Former saved before the trainable ln_vision existed: it reads the vision tower's "
                           "own frozen final LayerNorm (model.train_ln_vision=false)", directory)
        config = Blip2QFormerConfig.from_pretrained(directory)
        if dropout is not None:
            config.hidden_dropout_prob = config.attention_probs_dropout_prob = dropout
        return cls(config, **heads)

    def freeze_text_side(self) -> None:
        """Stage 2 uses only the query path: the text FFN, embeddings and stage-1 heads get no gradient."""
        # (ln_vision, when present, stays trainable: BLIP-2 trains it in stage 2 too.)
        for module in (self.embeddings, self.vision_proj, self.text_proj, self.itm_head, self.lm_transform):
            module.requires_grad_(False)
        self.lm_bias.requires_grad_(False)
        self.temp.requires_grad_(False)
        for layer in self.bert.encoder.layer:
            layer.intermediate.requires_grad_(False)
            layer.output.requires_grad_(False)

    # ------------------------------------------------------------------ the three passes

    def memory(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """The cross-attention memory (B, M, D_vision). Image tokens (B, N, D) pass as they are in an image
        Q-Former; frame tokens (B, T, N, D) get the temporal position embedding and are concatenated
        (M = T*N) or averaged over frames (M = N). An image is a one-frame clip: (B, N, D) in a video
        Q-Former is frame 0 of 1; (B, 1, N, D) in an image Q-Former is the image. The trainable ln_vision,
        when present, normalises every token first (in float32, as LAVIS's LayerNorm)."""
        if self.ln_vision is not None:
            image_embeds = self.ln_vision(image_embeds.float()).to(image_embeds.dtype)
        if image_embeds.dim() == 3:
            if not self.num_frames:
                return image_embeds
            image_embeds = image_embeds.unsqueeze(1)
        if image_embeds.dim() != 4:
            raise ValueError(f"image tokens must be (B, N, D) or (B, T, N, D), got shape {tuple(image_embeds.shape)}")
        frames = image_embeds.shape[1]
        if not self.num_frames:
            if frames != 1:
                raise ValueError(f"this Q-Former was built for images (no temporal embedding) but got {frames} "
                                 f"frames per sample; train it with model.num_frames set")
            return image_embeds[:, 0]
        if frames > self.num_frames:
            raise ValueError(f"{frames} frames per sample, but this Q-Former's temporal embedding has "
                             f"{self.num_frames} positions (model.num_frames at training)")
        x = image_embeds + self.frame_position[:frames].to(image_embeds.dtype)
        return x.flatten(1, 2) if self.frame_pooling == "concat" else x.mean(dim=1)

    def encode_image(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Query outputs (B, Q, H) for image tokens (B, N, D_vision) or frame tokens (B, T, N, D_vision)."""
        image_embeds = self.memory(image_embeds)
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        return self.bert(query_embeds=queries, query_length=self.num_query_tokens,
                         encoder_hidden_states=image_embeds).last_hidden_state

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Text-only outputs (B, L, H) (no queries, no image): the ITC text side."""
        return self.bert(query_embeds=self.embeddings(input_ids=ids), query_length=0,
                         attention_mask=mask).last_hidden_state

    def encode_joint(self, ids: torch.Tensor, mask: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """Queries + text with cross-attention to the image; `mask` is 2-D (B, Q+L) or 4-D (B, 1, Q+L, Q+L)."""
        image_embeds = self.memory(image_embeds)
        queries = self.query_tokens.expand(ids.shape[0], -1, -1)
        embeds = self.embeddings(input_ids=ids, query_embeds=queries)
        return self.bert(query_embeds=embeds, query_length=self.num_query_tokens, attention_mask=mask,
                         encoder_hidden_states=image_embeds).last_hidden_state

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(self.lm_transform(hidden), self.embeddings.word_embeddings.weight, self.lm_bias)

    def prompts(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """The soft prompt (B, Q, D_llm)."""
        return self.llm_proj(self.encode_image(image_embeds))

    # ------------------------------------------------------------------ the heads (training and retrieval)

    def image_features(self, query_out: torch.Tensor) -> torch.Tensor:
        """Normalised ITC features of each query (B, Q, C)."""
        return F.normalize(self.vision_proj(query_out), dim=-1)

    def text_features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Normalised ITC features (B, C) of the text-only pass's [CLS]."""
        return F.normalize(self.text_proj(self.encode_text(ids, mask)[:, 0]), dim=-1)

    def match_logits(self, ids: torch.Tensor, mask: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """ITM logits (B, 2) of text i with image i: the head on the query outputs of the joint pass, averaged
        over the queries."""
        num_q = self.num_query_tokens
        joint_mask = torch.cat([mask.new_ones(ids.shape[0], num_q), mask], dim=1)
        return self.itm_head(self.encode_joint(ids, joint_mask, image_embeds)[:, :num_q]).mean(dim=1)

    def forward(self, image_embeds: torch.Tensor, text_ids: Optional[torch.Tensor] = None,
                text_mask: Optional[torch.Tensor] = None, passes: Passes = Passes(),
                image_ids: Optional[torch.Tensor] = None) -> QFormerOutput:
        """Every pass a step needs, in one call so that DDP sees them all: the queries and their soft
        prompt, and with text the stage-1 passes named in `passes` (see `QFormerOutput`).

        ITC as the reference: sim_i2t = local image features x gathered text features, sim_t2i = local
        text features x gathered image features; the gathered side carries no gradient unless
        passes.gather_with_grad. ITM pairs every image with a hard negative caption and every caption
        with a hard negative image, drawn from the global batch by similarity. ITG predicts the caption
        from [DEC], attending to every query and causally to itself."""
        query_out = self.encode_image(image_embeds)  # (B, Q, H)
        out = QFormerOutput(query_output=query_out)
        if passes.prompts:
            out.prompts = self.llm_proj(query_out)  # (B, Q, D_llm)
        if text_ids is None or not (passes.itc or passes.itm or passes.itg):
            return out
        batch, num_q = text_ids.shape[0], self.num_query_tokens
        offset = dist.rank() * batch
        out.offset = offset
        if passes.same_image_positives:
            if image_ids is None:
                raise ValueError("loss.itc_same_image_positives needs image ids in the batch (shards written with "
                                 "image_id; see jobs.make_shards)")
            out.same_image = same_image_mask(image_ids, dist.gather(image_ids))  # (B, N)

        # 1. ITC: each image's best query against each caption, over every worker's batch.
        if passes.itc or passes.itm:
            out.image_feats = self.image_features(query_out)  # (B, Q, C)
            out.text_feat = self.text_features(text_ids, text_mask)  # (B, C)
            out.sim_i2t, out.sim_t2i = itc_similarities(
                out.image_feats, out.text_feat, dist.gather_features(out.image_feats, passes.gather_with_grad),
                dist.gather_features(out.text_feat, passes.gather_with_grad))  # (B, N) each
            out.temp = self.temp.clamp(0.001, 0.5)

        # 2. ITM: positives, each image with a hard negative caption, each caption with a hard negative image.
        if passes.itm:
            temp = out.temp.detach()
            neg_image = hard_negative_indices(out.sim_t2i.detach() / temp, offset, excluded=out.same_image)  # (B,)
            neg_text = hard_negative_indices(out.sim_i2t.detach() / temp, offset, excluded=out.same_image)
            all_images = dist.gather(image_embeds)  # frozen features: no gradient needed
            pad = self.config.pad_token_id or 0
            all_ids, all_mask = dist.gather_padded(text_ids, pad), dist.gather_padded(text_mask, 0)
            ids, mask = all_ids[offset:offset + batch], all_mask[offset:offset + batch]  # this worker's, same width
            itm_ids = torch.cat([ids, ids, all_ids[neg_text]])
            itm_mask = torch.cat([mask, mask, all_mask[neg_text]])
            itm_images = torch.cat([image_embeds, all_images[neg_image], image_embeds])
            out.itm_logits = self.match_logits(itm_ids, itm_mask, itm_images)  # (3B, 2)

        # 3. ITG: the caption from [DEC], attending to every query and causally to itself.
        if passes.itg:
            dec_ids = text_ids.clone()
            dec_ids[:, 0] = self.bos_token_id
            out.itg_labels = dec_ids.masked_fill(text_mask == 0, IGNORE_INDEX)  # (B, L)
            hidden = self.encode_joint(dec_ids, multimodal_causal_mask(num_q, text_mask), image_embeds)[:, num_q:]
            out.itg_logits = self.lm_logits(hidden)  # (B, L, V)
        return out


def multimodal_causal_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 1, Q+L, Q+L), True = may attend. Queries see all queries and no text; text sees
    every query and the non-padding text up to itself (ITG)."""
    batch, length = text_mask.shape
    total = num_queries + length
    allowed = torch.zeros(total, total, dtype=torch.bool, device=text_mask.device)
    allowed[:, :num_queries] = True
    allowed[num_queries:, num_queries:] = torch.ones(length, length, dtype=torch.bool,
                                                     device=text_mask.device).tril()
    keys = torch.cat([text_mask.new_ones(batch, num_queries), text_mask], dim=1).bool()  # (B, Q+L)
    return (allowed[None] & keys[:, None, :])[:, None]
