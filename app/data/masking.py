"""Random [MASK] replacement of P-Former inputs (stage 0, decoder-only LLMs)."""

from __future__ import annotations

from typing import Iterable, Optional

import torch


def mask_tokens(input_ids: torch.Tensor, mask_prob: float, mask_token_id: int,
                protected_ids: Iterable[int], generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Replace each token with `mask_token_id` with probability `mask_prob`, never a protected one
    (PAD, CLS and SEP: masking them would change the sentence length or the pooled position)."""
    probs = torch.full(input_ids.shape, mask_prob, device=input_ids.device)
    chosen = torch.bernoulli(probs, generator=generator).bool()
    for token_id in protected_ids:
        chosen &= input_ids != token_id
    return input_ids.masked_fill(chosen, mask_token_id)
