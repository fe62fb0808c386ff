"""Stage 0 composite: P-Former (trainable) -> soft prompt -> frozen LLM's logits over the sentence.

It returns a `Stage0Output`; the losses (LM, sentence contrastive over the global batch, vocabulary
quantisation) are computed from it by `app.stages.PFormerStage` with `app.losses`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from app.data.masking import mask_tokens
from app.models.frozen import Composite
from app.models.llm import FrozenLLM, LMOutput
from app.models.pformer import PFormer


@dataclass(frozen=True)
class PFormerLossWeights:
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


class PFormerLM(Composite):
    stage = "pformer"
    trainable_names = ("pformer",)
    frozen_names = ("llm",)

    def __init__(self, pformer: PFormer, llm: FrozenLLM, weights: PFormerLossWeights,
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
