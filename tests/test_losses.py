"""Loss functions and input transforms against values computed by hand on small tensors."""

import math

import numpy as np
import pytest
import torch

from app.data.masking import mask_tokens
from app.data.text import clean_text, split_words
from app.losses import IGNORE_INDEX, contrastive_loss, lm_loss, nearest_rows, vocab_loss


def test_lm_loss_shifted_for_decoder_only():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, 5.0]]])  # (1, 3, V=2)
    labels = torch.tensor([[IGNORE_INDEX, 0, 1]])
    # position 0 predicts label 0 with p=1/2; position 1 predicts label 1 with p=1/4; last logits unused
    assert lm_loss(logits, labels, shift=True).item() == pytest.approx((math.log(2) + math.log(4)) / 2)
    labels = torch.tensor([[IGNORE_INDEX, 0, IGNORE_INDEX]])
    assert lm_loss(logits, labels, shift=True).item() == pytest.approx(math.log(2))


def test_lm_loss_aligned_for_encoder_decoder():
    logits = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[0, IGNORE_INDEX]])
    assert lm_loss(logits, labels, shift=False).item() == pytest.approx(-math.log(0.75))


def _smoothed_ce(row: list[float], target: int, eps: float) -> float:
    log_z = math.log(sum(math.exp(v) for v in row))
    logp = [v - log_z for v in row]
    k = len(row)
    return -sum(((1 - eps) * (i == target) + eps / k) * lp for i, lp in enumerate(logp))


def test_contrastive_loss_by_hand():
    f = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    temp = torch.tensor(0.5)
    sims = [[1 / 0.5, 0.6 / 0.5], [0.6 / 0.5, 1 / 0.5]]
    expected = (_smoothed_ce(sims[0], 0, 0.1) + _smoothed_ce(sims[1], 1, 0.1)) / 2
    assert contrastive_loss(f, f, temp, 0, 0.1).item() == pytest.approx(expected, rel=1e-6)


def test_contrastive_loss_offset_selects_own_row_in_gathered_batch():
    local = torch.tensor([[0.0, 1.0]])
    gathered = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # this worker's row is the second
    right = contrastive_loss(local, gathered, torch.tensor(0.1), offset=1, label_smoothing=0.0)
    wrong = contrastive_loss(local, gathered, torch.tensor(0.1), offset=0, label_smoothing=0.0)
    assert right.item() == pytest.approx(math.log1p(math.exp(-10)), abs=1e-6)
    assert wrong.item() > 9.0


def test_vocab_loss_pulls_to_nearest_row_with_detached_target():
    table = torch.tensor([[0.0, 0.0], [10.0, 10.0], [-5.0, 4.0]], requires_grad=True)
    prompts = torch.tensor([[[1.0, 1.0]], [[9.0, 8.0]]], requires_grad=True)  # (B=2, Q=1, D=2)
    assert nearest_rows(prompts, table).tolist() == [[0], [1]]
    loss = vocab_loss(prompts, table)
    assert loss.item() == pytest.approx((1 + 1 + 1 + 4) / 4)
    loss.backward()
    assert table.grad is None and prompts.grad is not None
    assert vocab_loss(table[None, :2].detach(), table.detach()).item() == 0.0


def test_masking_never_touches_pad_cls_sep_and_hits_the_rate():
    pad, cls, sep, mask = 0, 2, 3, 4
    ids = torch.randint(5, 100, (400, 30))
    ids[:, 0] = cls
    ids[:, 20] = sep
    ids[:, 21:] = pad
    out = mask_tokens(ids, 0.25, mask, (pad, cls, sep), generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[:, 0], ids[:, 0]) and torch.equal(out[:, 20:], ids[:, 20:])
    rate = (out[:, 1:20] == mask).float().mean().item()
    assert 0.23 < rate < 0.27
    assert torch.equal(mask_tokens(ids, 0.0, mask, (pad,)), ids)


def test_prefix_split_is_safe_and_in_range():
    rng = np.random.default_rng(0)
    assert split_words("dog", rng) == ("dog", "")
    assert split_words("two words", rng) == ("two", "words")
    seen = set()
    for _ in range(300):
        prefix, suffix = split_words("one two three four five six seven eight nine ten", rng)
        seen.add(len(prefix.split()))
        assert len(prefix.split()) + len(suffix.split()) == 10
    assert seen == {1, 2, 3, 4, 5}


def test_clean_text():
    assert clean_text("  a\tdog \n runs  ", 100) == "a dog runs"
    assert clean_text("a dog runs fast", 8) == "a dog"
    assert clean_text("   ", 10) == ""
