"""Tiny random models built in memory (no files, no tokenizers) and a fixed batch, for the fidelity tests.

Every builder seeds torch itself, so the same call gives the same weights in any process (the gloo
workers of tests/test_fidelity.py build their models with these too).
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import (BertConfig, BertModel, Blip2QFormerConfig, Blip2VisionConfig, Blip2VisionModel, OPTConfig,
                          OPTForCausalLM, T5Config, T5ForConditionalGeneration)

from app.models.composites import (LLMPretrain, PFormerPretrain, QFormerPretrain, Stage0Weights, Stage1Weights,
                                   Stage2Weights)
from app.models.llm import FrozenLLM
from app.models.pformer import PFormer
from app.models.qformer import QFormer
from app.models.vision import DEFAULT_MEAN, DEFAULT_STD, VisionEncoder

V_TEXT = 60            # BERT vocabulary (P-Former and Q-Former); the Q-Former adds [DEC] = V_TEXT
PAD, CLS, SEP, MASK = 0, 2, 3, 4
V_LLM = 70             # LLM vocabulary; OPT-style: pad 1, BOS/EOS 2; T5-style: pad 0, EOS 1
H, D_LLM, D_VISION, Q, IMAGE = 32, 24, 16, 4, 16
MAX_LEN = 10


def bert(seed: int = 0, dropout: float = 0.0) -> BertModel:
    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=V_TEXT, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=2 * H, max_position_embeddings=32, hidden_dropout_prob=dropout,
                                attention_probs_dropout_prob=dropout), add_pooling_layer=False)


def pformer(seed: int = 1) -> PFormer:
    return PFormer(bert(seed), num_query_tokens=Q, llm_dim=D_LLM, contrastive_dim=16)  # heads: seeded by bert()


def opt(seed: int = 2, dropout: float = 0.1) -> FrozenLLM:
    torch.manual_seed(seed)
    return FrozenLLM(OPTForCausalLM(OPTConfig(
        vocab_size=V_LLM, hidden_size=D_LLM, num_hidden_layers=2, ffn_dim=2 * D_LLM, num_attention_heads=4,
        word_embed_proj_dim=D_LLM, max_position_embeddings=64, dropout=dropout, attention_dropout=0.0,
        pad_token_id=1, bos_token_id=2, eos_token_id=2)))


def t5(seed: int = 3, dropout: float = 0.1) -> FrozenLLM:
    torch.manual_seed(seed)
    return FrozenLLM(T5ForConditionalGeneration(T5Config(
        vocab_size=V_LLM, d_model=D_LLM, d_kv=D_LLM // 4, d_ff=2 * D_LLM, num_layers=2, num_decoder_layers=2,
        num_heads=4, dropout_rate=dropout, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False)))


def qformer(seed: int = 4, ln_vision: bool = True) -> QFormer:
    torch.manual_seed(seed)
    config = Blip2QFormerConfig(vocab_size=V_TEXT + 1, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=2 * H, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0, pad_token_id=PAD, cross_attention_frequency=1,
                                encoder_hidden_size=D_VISION, use_qformer_text_input=True)
    return QFormer(config, Q, D_LLM, bos_token_id=V_TEXT, contrastive_dim=16, ln_vision=ln_vision)


def vision(seed: int = 5, final_layernorm: bool = False) -> VisionEncoder:
    torch.manual_seed(seed)
    tower = Blip2VisionModel(Blip2VisionConfig(hidden_size=D_VISION, intermediate_size=2 * D_VISION,
                                               num_hidden_layers=1, num_attention_heads=2, image_size=IMAGE,
                                               patch_size=8, initializer_range=0.02))
    with torch.no_grad():  # a trained-looking final LayerNorm, so "before" and "after" it differ
        tower.post_layernorm.weight.uniform_(0.5, 1.5)
        tower.post_layernorm.bias.uniform_(-0.5, 0.5)
    return VisionEncoder.from_tower(tower, DEFAULT_MEAN, DEFAULT_STD, final_layernorm=final_layernorm)


def _texts(rng: np.random.Generator, batch: int, vocab: tuple[int, int], start: list[int], end: list[int],
           pad: int, lengths: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    ids = np.full((batch, MAX_LEN), pad, dtype=np.int64)
    mask = np.zeros((batch, MAX_LEN), dtype=np.int64)
    for i, n in enumerate(lengths):
        row = start + list(rng.integers(vocab[0], vocab[1], size=n)) + end
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def batch(size: int = 6, seed: int = 0, full: bool = False, llm: str = "opt") -> dict[str, torch.Tensor]:
    """Token ids for every tokenizer, uint8 pixels and image ids (two captions per image). full=True: every
    row has the same length (no padding), so per-worker means add up to the global mean exactly."""
    rng = np.random.default_rng(seed)
    lengths = np.full(size, MAX_LEN - 2) if full else rng.integers(2, MAX_LEN - 1, size=size)
    ids, mask = _texts(rng, size, (5, V_TEXT), [CLS], [SEP], PAD, lengths)
    out = {"pformer_ids": ids, "pformer_mask": mask, "qformer_ids": ids.clone(), "qformer_mask": mask.clone(),
           "pixels": torch.from_numpy(rng.integers(0, 256, size=(size, IMAGE, IMAGE, 3), dtype=np.uint8)),
           "image_id": torch.arange(size) // 2}
    if llm == "opt":
        out["llm_ids"], out["llm_mask"] = _texts(rng, size, (3, V_LLM), [2], [5], 1, lengths)
    else:
        out["llm_ids"], out["llm_mask"] = _texts(rng, size, (2, V_LLM), [], [1], 0, lengths // 2 + 1)
        out["llm_target_ids"], out["llm_target_mask"] = _texts(rng, size, (2, V_LLM), [], [1], 0, lengths - lengths // 2)
    return out


def stage0(llm: str = "opt", llm_dropout: bool = True, **weights) -> PFormerPretrain:
    frozen = opt() if llm == "opt" else t5()
    defaults = dict(vocab_weight=1.0 if llm == "opt" else 0.0)
    return PFormerPretrain(pformer(), frozen, Stage0Weights(**{**defaults, **weights}), mask_token_id=MASK,
                     protected_ids=(PAD, CLS, SEP), llm_dropout=llm_dropout)


def stage1(ln_vision: bool = True, **weights) -> QFormerPretrain:
    return QFormerPretrain(vision(final_layernorm=not ln_vision), qformer(ln_vision=ln_vision), pformer(),
                           Stage1Weights(**weights))


def stage2(ln_vision: bool = True, llm_dropout: bool = True, llm: str = "opt", **weights) -> LLMPretrain:
    frozen = opt() if llm == "opt" else t5()
    return LLMPretrain(vision(final_layernorm=not ln_vision), qformer(ln_vision=ln_vision), frozen, pformer(),
                       Stage2Weights(**weights), llm_dropout=llm_dropout)


def grad_norms(module: torch.nn.Module) -> dict[str, float]:
    """Gradient norm of each trainable block: the module's direct children and its own parameters."""
    squares: dict[str, float] = {}
    for name, param in module.named_parameters():
        if param.grad is not None:
            block = name.split(".")[0]
            squares[block] = squares.get(block, 0.0) + float(param.grad.double().pow(2).sum())
    return {block: value ** 0.5 for block, value in sorted(squares.items())}
