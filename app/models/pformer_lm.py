"""Stage 0 composite: P-Former (trainable) -> soft prompt -> frozen LLM reconstructs the sentence."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from app.data.masking import mask_tokens
from app.losses import contrastive_loss, vocab_loss
from app.models.frozen import Composite
from app.models.llm import FrozenLLM
from app.models.pformer import PFormer
from app.train import dist


@dataclass(frozen=True)
class PFormerLossWeights:
    lm_weight: float = 1.0
    contrastive_weight: float = 1.0
    vocab_weight: float = 1.0
    contrastive_views: int = 1
    label_smoothing: float = 0.1
    mask_prob: float = 0.25
    gather_with_grad: bool = False  # see app.train.dist.gather_features


class PFormerLM(Composite):
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

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        w = self.weights
        ids, mask = batch["pformer_ids"], batch["pformer_mask"]
        batch_size = ids.shape[0]

        # 1. P-Former: one forward, over two independently masked views when contrastive_views=2.
        views = [self._pformer_inputs(ids) for _ in range(w.contrastive_views)]
        out = self.pformer(torch.cat(views), mask.repeat(len(views), 1))
        prompts = out.prompts[:batch_size]  # (B, Q, D)

        # 2. Frozen LLM reconstructs the caption from the prompt.
        losses = {"lm_loss": self.llm.caption_loss(prompts, batch)}
        total = w.lm_weight * losses["lm_loss"]

        # 3. Sentence-level contrastive loss over the global batch.
        if w.contrastive_weight > 0:
            first, second = out.features[:batch_size], out.features[-batch_size:]  # (B, C) each
            offset = dist.rank() * batch_size
            loss = contrastive_loss(first, dist.gather_features(second, w.gather_with_grad), out.temp, offset,
                                    w.label_smoothing)
            if w.contrastive_views == 2:
                loss = 0.5 * (loss + contrastive_loss(second, dist.gather_features(first, w.gather_with_grad),
                                                      out.temp, offset, w.label_smoothing))
            losses["contrastive_loss"] = loss
            total = total + w.contrastive_weight * loss

        # 4. Keep prompts near the LLM's input-embedding manifold.
        if w.vocab_weight > 0:
            losses["vocab_loss"] = vocab_loss(prompts, self.llm.embedding_matrix)
            total = total + w.vocab_weight * losses["vocab_loss"]

        losses["loss"] = total
        return losses
