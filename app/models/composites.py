"""The composites each stage trains: trainable and frozen parts in one module whose forward returns a typed
output; the losses are computed from it by the stages (`app.stages`, math in `app.losses`).

Stage 0 (`PFormerPretrain`): P-Former (trainable) -> soft prompt -> frozen LLM's logits over the sentence,
    and the sentence features of the contrastive loss.
Stage 1 (`QFormerPretrain`): frozen image encoder -> Q-Former (trainable) with its ITC, ITM and ITG passes,
    and the frozen P-Former's prompts for the caption (the alignment target of llm_proj_q(queries)).
Stage 2 (`LLMPretrain`): frozen image encoder -> Q-Former -> llm_proj -> frozen LLM's logits over the caption
    (decoder-only) or its suffix (encoder-decoder), and the same alignment target.
align_weight 0 with no P-Former is plain BLIP-2 through the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from app.data.masking import mask_tokens
from app.models.frozen import freeze
from app.models.llm import FrozenLLM, LMOutput
from app.models.pformer import PFormer
from app.models.qformer import Passes, QFormer, QFormerOutput
from app.models.vision import VisionEncoder


class Composite(nn.Module):
    """A model made of trainable and frozen submodules.

    `trainable_names` are the submodules the optimiser updates (and DDP wraps);
    `frozen_names` get no gradient and stay in eval mode even after `.train()`, except those in
    `frozen_in_train_mode`, which follow the composite's mode (the frozen LLM's dropout is active in
    training in the reference, which freezes its parameters but never calls `eval()` on it).
    """

    trainable_names: tuple[str, ...] = ()
    frozen_names: tuple[str, ...] = ()
    frozen_in_train_mode: tuple[str, ...] = ()

    def train(self, mode: bool = True) -> "Composite":
        super().train(mode)
        for name in self.frozen_names:
            module = getattr(self, name, None)  # optional frozen parts (e.g. no P-Former) are None
            if module is not None:
                module.train(mode and name in self.frozen_in_train_mode)
        return self

    def trainable_parameters(self):
        for name in self.trainable_names:
            for param in getattr(self, name).parameters():
                if param.requires_grad:
                    yield param


# ---------------------------------------------------------------------------------------------
# stage 0


@dataclass(frozen=True)
class Stage0Weights:
    lm_weight: float = 1.0
    contrastive_weight: float = 1.0
    vocab_weight: float = 1.0
    contrastive_views: int = 1
    label_smoothing: float = 0.1
    mask_prob: float = 0.25
    gather_with_grad: bool = False  # see app.train.dist.gather_features


@dataclass
class Stage0Output:
    prompts: torch.Tensor      # (B, Q, D_llm)
    first_view: torch.Tensor   # (B, C) normalised sentence features
    second_view: torch.Tensor  # (B, C): the same tensor with one view, the second masked view with two
    temp: torch.Tensor
    lm: LMOutput


class PFormerPretrain(Composite):
    stage = "pformer"
    trainable_names = ("pformer",)
    frozen_names = ("llm",)

    def __init__(self, pformer: PFormer, llm: FrozenLLM, weights: Stage0Weights,
                 mask_token_id: int, protected_ids: tuple[int, ...], llm_dropout: bool = True):
        super().__init__()
        # model.llm_dropout_in_training: the frozen LLM's own dropout in training forwards (the reference's).
        self.frozen_in_train_mode = ("llm",) if llm_dropout else ()
        self.pformer = pformer
        self.llm = llm
        self.weights = weights
        self.mask_token_id = mask_token_id
        self.protected_ids = protected_ids
        # Heads whose loss is switched off get no gradient; freezing them keeps DDP's reducer consistent
        # (every trainable parameter must receive a gradient each step) and the optimiser from decaying them.
        if weights.contrastive_weight == 0:
            pformer.text_proj.requires_grad_(False)
            pformer.temp.requires_grad_(False)

    def _pformer_inputs(self, ids: torch.Tensor) -> torch.Tensor:
        # The reference masks only for decoder-only LLMs, where the full caption is the target.
        if self.training and not self.llm.is_encoder_decoder and self.weights.mask_prob > 0:
            return mask_tokens(ids, self.weights.mask_prob, self.mask_token_id, self.protected_ids)
        return ids

    def forward(self, batch: dict[str, torch.Tensor]) -> Stage0Output:
        ids, mask = batch["pformer_ids"], batch["pformer_mask"]
        batch_size = ids.shape[0]
        # 1. P-Former: one forward, over two independently masked views when contrastive_views=2.
        views = [self._pformer_inputs(ids) for _ in range(self.weights.contrastive_views)]
        out = self.pformer(torch.cat(views), mask.repeat(len(views), 1))
        prompts = out.prompts[:batch_size]  # (B, Q, D)
        # 2. Frozen LLM reconstructs the caption from the prompt.
        lm = self.llm.caption_logits(prompts, batch)
        return Stage0Output(prompts=prompts, first_view=out.features[:batch_size],
                            second_view=out.features[-batch_size:], temp=out.temp, lm=lm)


# ---------------------------------------------------------------------------------------------
# stages 1 and 2


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


@dataclass
class Stage1Output:
    qformer: QFormerOutput
    align_target: Optional[torch.Tensor]  # (B, Q, D_llm) the frozen P-Former's prompts; None without alignment


@dataclass
class Stage2Output:
    prompts: torch.Tensor                 # (B, Q, D_llm) llm_proj of the queries
    lm: LMOutput
    align_target: Optional[torch.Tensor]


@torch.no_grad()
def frozen_image_embeds(vision: VisionEncoder, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The frozen image encoder's tokens: from the feature cache when the batch carries them, else computed."""
    cached = batch.get("image_embeds")
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
    sentence = batch.get("pformer_sentence")
    if sentence is not None:
        return pformer.prompts_from_sentence(sentence.to(dtype))
    prompts = batch.get("pformer_prompts")
    if prompts is not None:
        return prompts.to(dtype)
    return pformer(batch["pformer_ids"], batch["pformer_mask"]).prompts


class QFormerPretrain(Composite):
    """Stage 1."""

    stage = "qformer"
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

    @property
    def passes(self) -> Passes:
        w = self.weights
        return Passes(prompts=self.pformer is not None and w.align > 0, itc=w.itc > 0, itm=w.itm > 0, itg=w.itg > 0,
                      gather_with_grad=w.gather_with_grad, same_image_positives=w.same_image_positives)

    def forward(self, batch: dict[str, torch.Tensor]) -> Stage1Output:
        image_embeds = frozen_image_embeds(self.vision, batch)
        target = pformer_prompts(self.pformer, batch) if self.weights.align > 0 else None
        out = self.qformer(image_embeds, batch["qformer_ids"], batch["qformer_mask"], passes=self.passes,
                           image_ids=batch.get("image_id"))
        return Stage1Output(qformer=out, align_target=target)


class LLMPretrain(Composite):
    """Stage 2."""

    stage = "llm"
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

    def forward(self, batch: dict[str, torch.Tensor]) -> Stage2Output:
        image_embeds = frozen_image_embeds(self.vision, batch)
        prompts = self.qformer(image_embeds).prompts  # (B, Q, D_llm)
        lm = self.llm.caption_logits(prompts, batch, ignore_prefix=self.prompt_length)
        target = pformer_prompts(self.pformer, batch) if self.weights.align > 0 else None
        return Stage2Output(prompts=prompts, lm=lm, align_target=target)
