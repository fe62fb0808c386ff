"""BLIP-2 with P-Former alignment: the stage-1 and stage-2 composites.

Stage 1 (`QFormerPretrain`): frozen image encoder -> Q-Former (trainable) with ITC + ITM + ITG, plus
    align_loss = align_weight * MSE(llm_proj_q(queries), P-Former(caption))  (frozen P-Former, eval mode).
Stage 2 (`LLMPretrain`): frozen image encoder -> Q-Former -> llm_proj -> frozen LLM, LM loss (decoder-only)
    or prefix-LM (encoder-decoder), plus the same alignment loss on llm_proj's output.
align_weight 0 with no P-Former is plain BLIP-2 through the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from app.losses import (IGNORE_INDEX, align_loss, hard_negative_indices, itc_loss, itc_similarities, itm_labels,
                        lm_loss, same_image_mask)
from app.models.frozen import Composite, freeze
from app.models.llm import FrozenLLM
from app.models.pformer import PFormer
from app.models.qformer import QFormer, multimodal_causal_mask
from app.models.vision import VisionEncoder
from app.train import dist


@dataclass(frozen=True)
class Stage1Weights:
    itc: float = 1.0
    itm: float = 1.0
    itg: float = 1.0
    align: float = 10.0
    label_smoothing: float = 0.1  # ITC and ITG, as BLIP-2
    gather_with_grad: bool = False  # ITC columns: see app.train.dist.gather_features
    same_image_positives: bool = False  # captions of one image: ITC positives, never ITM negatives


@dataclass(frozen=True)
class Stage2Weights:
    lm: float = 1.0
    align: float = 100.0


def _add_align(losses: dict[str, torch.Tensor], prompts: torch.Tensor, target: Optional[torch.Tensor],
               weight: float) -> None:
    if target is not None and weight > 0:
        losses["align_mse"] = align_loss(prompts, target)
        losses["align_loss"] = weight * losses["align_mse"]


def stage1_losses(q: QFormer, image_embeds: torch.Tensor, *, text_ids: torch.Tensor, text_mask: torch.Tensor,
                  weights: Stage1Weights, align_target: Optional[torch.Tensor] = None,
                  image_ids: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """ITC, ITM (hard negatives from the global batch), ITG and the alignment loss; "loss" is their sum.

    ITC as the reference: sim_i2t = local image features x gathered text features, sim_t2i = local text
    features x gathered image features; the gathered side carries no gradient unless
    weights.gather_with_grad. image_ids (B,) with weights.same_image_positives: captions of the same
    image are positives in ITC and never ITM negatives."""
    batch, num_q = text_ids.shape[0], q.num_query_tokens
    offset = dist.rank() * batch
    losses: dict[str, torch.Tensor] = {}
    query_out = q.encode_image(image_embeds)  # (B, Q, H)
    same_image = None
    if weights.same_image_positives:
        if image_ids is None:
            raise ValueError("loss.itc_same_image_positives needs image ids in the batch (shards written with "
                             "image_id; see jobs.make_shards)")
        same_image = same_image_mask(image_ids, dist.gather(image_ids))  # (B, N)

    # 1. ITC: each image's best query against each caption, over every worker's batch.
    if weights.itc > 0 or weights.itm > 0:
        image_feats = F.normalize(q.vision_proj(query_out), dim=-1)  # (B, Q, C)
        text_feat = F.normalize(q.text_proj(q.encode_text(text_ids, text_mask)[:, 0]), dim=-1)  # (B, C)
        sim_i2t, sim_t2i = itc_similarities(image_feats, text_feat,
                                            dist.gather_features(image_feats, weights.gather_with_grad),
                                            dist.gather_features(text_feat, weights.gather_with_grad))  # (B, N) each
        temp = q.temp.clamp(0.001, 0.5)
        if weights.itc > 0:
            losses["itc_loss"] = itc_loss(sim_i2t, sim_t2i, temp, offset, weights.label_smoothing, same_image)

    # 2. ITM: positives, each image with a hard negative caption, each caption with a hard negative image.
    if weights.itm > 0:
        neg_image = hard_negative_indices(sim_t2i.detach() / temp.detach(), offset,
                                          excluded=same_image)  # (B,) into the global batch
        neg_text = hard_negative_indices(sim_i2t.detach() / temp.detach(), offset, excluded=same_image)
        all_images = dist.gather(image_embeds)  # frozen features: no gradient needed
        pad = q.config.pad_token_id or 0
        all_ids, all_mask = dist.gather_padded(text_ids, pad), dist.gather_padded(text_mask, 0)
        ids, mask = all_ids[offset:offset + batch], all_mask[offset:offset + batch]  # this worker's, same width
        itm_ids = torch.cat([ids, ids, all_ids[neg_text]])
        itm_mask = torch.cat([mask, mask, all_mask[neg_text]])
        itm_images = torch.cat([image_embeds, all_images[neg_image], image_embeds])
        joint_mask = torch.cat([itm_mask.new_ones(3 * batch, num_q), itm_mask], dim=1)
        out = q.encode_joint(itm_ids, joint_mask, itm_images)[:, :num_q]  # (3B, Q, H)
        logits = q.itm_head(out).mean(dim=1)  # (3B, 2)
        losses["itm_loss"] = F.cross_entropy(logits.float(), itm_labels(batch, logits.device))

    # 3. ITG: the caption from [DEC], attending to every query and causally to itself.
    if weights.itg > 0:
        dec_ids = text_ids.clone()
        dec_ids[:, 0] = q.bos_token_id
        labels = dec_ids.masked_fill(text_mask == 0, IGNORE_INDEX)
        hidden = q.encode_joint(dec_ids, multimodal_causal_mask(num_q, text_mask), image_embeds)[:, num_q:]
        losses["itg_loss"] = lm_loss(q.lm_logits(hidden), labels, shift=True,
                                     label_smoothing=weights.label_smoothing)

    # 4. P-Former alignment.
    if align_target is not None:
        _add_align(losses, q.llm_proj(query_out), align_target, weights.align)
    total = sum(getattr(weights, name.removesuffix("_loss")) * losses[name]
                for name in ("itc_loss", "itm_loss", "itg_loss") if name in losses)
    losses["loss"] = total + losses.get("align_loss", 0.0)
    return losses


def _cached(batch: dict[str, torch.Tensor], name: str) -> Optional[torch.Tensor]:
    """A cached tensor of the batch (`app.data.features`): `name`, or `name_bf16` (int16 bits of bfloat16)."""
    if name in batch:
        return batch[name]
    if f"{name}_bf16" in batch:
        return batch[f"{name}_bf16"].view(torch.bfloat16)
    return None


@torch.no_grad()
def frozen_image_embeds(vision: VisionEncoder, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The frozen image encoder's tokens: from the feature cache when the batch carries them, else computed."""
    cached = _cached(batch, "image_embeds")
    if cached is not None:
        return cached.to(vision.dtype)
    return vision(batch["pixels"])


@torch.no_grad()
def pformer_prompts(pformer: Optional[PFormer], batch: dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
    """The frozen P-Former's prompts for the batch captions (no masking, no dropout, no gradient): from the
    cache (its sentence vectors through the frozen heads, or its prompts) when the batch carries them."""
    if pformer is None:
        return None
    dtype = pformer.llm_proj.weight.dtype
    sentence = _cached(batch, "pformer_sentence")
    if sentence is not None:
        return pformer.prompts_from_sentence(sentence.to(dtype))
    prompts = _cached(batch, "pformer_prompts")
    if prompts is not None:
        return prompts.to(dtype)
    return pformer(batch["pformer_ids"], batch["pformer_mask"]).prompts


class QFormerPretrain(Composite):
    """Stage 1."""

    trainable_names = ("qformer",)
    frozen_names = ("vision", "pformer")

    def __init__(self, vision: VisionEncoder, qformer: QFormer, pformer: Optional[PFormer], weights: Stage1Weights):
        super().__init__()
        self.vision = freeze(vision)
        self.qformer = qformer
        self.pformer = freeze(pformer) if pformer is not None else None
        self.weights = weights
        # Heads whose loss is off get no gradient: frozen, so DDP's reducer and the optimiser skip them.
        if pformer is None or weights.align == 0:
            qformer.llm_proj.requires_grad_(False)
        if weights.itc == 0:
            for part in (qformer.vision_proj, qformer.text_proj, qformer.temp):
                part.requires_grad_(False)
        if weights.itm == 0:
            qformer.itm_head.requires_grad_(False)
        if weights.itg == 0:
            qformer.lm_transform.requires_grad_(False)
            qformer.lm_bias.requires_grad_(False)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image_embeds = frozen_image_embeds(self.vision, batch)
        target = pformer_prompts(self.pformer, batch) if self.weights.align > 0 else None
        return self.qformer(image_embeds, objective="stage1", text_ids=batch["qformer_ids"],
                            text_mask=batch["qformer_mask"], weights=self.weights, align_target=target,
                            image_ids=batch.get("image_id"))


class LLMPretrain(Composite):
    """Stage 2."""

    trainable_names = ("qformer",)
    frozen_names = ("vision", "pformer", "llm")

    def __init__(self, vision: VisionEncoder, qformer: QFormer, llm: FrozenLLM, pformer: Optional[PFormer],
                 weights: Stage2Weights, prompt_length: int = 0, llm_dropout: bool = True):
        super().__init__()
        # model.llm_dropout_in_training: the frozen LLM's own dropout in training forwards (the reference's);
        # the vision tower and the P-Former stay in eval mode always.
        self.frozen_in_train_mode = ("llm",) if llm_dropout else ()
        self.vision = freeze(vision)
        self.qformer = qformer
        self.llm = llm
        self.pformer = freeze(pformer) if pformer is not None else None
        self.weights = weights
        self.prompt_length = prompt_length
        qformer.freeze_text_side()

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image_embeds = frozen_image_embeds(self.vision, batch)
        prompts = self.qformer(image_embeds)  # (B, Q, D_llm)
        losses = {"lm_loss": self.llm.caption_loss(prompts, batch, ignore_prefix=self.prompt_length)}
        target = pformer_prompts(self.pformer, batch) if self.weights.align > 0 else None
        _add_align(losses, prompts, target, self.weights.align)
        losses["loss"] = self.weights.lm * losses["lm_loss"] + losses.get("align_loss", 0.0)
        return losses
