"""Loss functions and input transforms against values computed by hand on small tensors."""

import math

import numpy as np
import pytest
import torch

from app.data.masking import mask_tokens
from app.data.text import clean_text, split_words
from app.losses import (IGNORE_INDEX, align_loss, contrastive_loss, hard_negative_indices, itc_loss, itc_similarities,
                        itm_labels, lm_loss, nearest_rows, vocab_loss)
from app.models.qformer import multimodal_causal_mask


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


# ---------------------------------------------------------------------------------------------
# stage-1/2 terms


def test_itc_similarity_takes_the_best_query():
    image = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [-1.0, 0.0]]])  # (B=2, Q=2, C=2)
    text = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # (B, C)
    sim_i2t, sim_t2i = itc_similarities(image, text, image, text)
    # image 0: queries (1,0),(0,1) -> best 1 with both texts; image 1: (0.6,0.8),(-1,0) -> 0.8 with text 0, 0.6 with text 1
    assert torch.allclose(sim_i2t, torch.tensor([[1.0, 1.0], [0.8, 0.6]]))
    assert torch.allclose(sim_t2i, sim_i2t.t())


def test_itc_loss_by_hand_and_near_its_minimum_for_matching_features():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.0, 0.3, 0.8]])
    temp = torch.tensor(0.5)
    expected = sum(_smoothed_ce([v / 0.5 for v in row], i, 0.1) for i, row in enumerate(sim.tolist())) / 3
    expected_t = sum(_smoothed_ce([v / 0.5 for v in row], i, 0.1) for i, row in enumerate(sim.t().tolist())) / 3
    assert itc_loss(sim, sim.t(), temp, 0, 0.1).item() == pytest.approx((expected + expected_t) / 2, rel=1e-5)
    # Matching unit features: similarity 1 on the diagonal, -1/(n-1) elsewhere. With label smoothing eps the
    # lowest possible loss is the entropy of the smoothed target, reached when softmax(sim / t) equals it:
    # a logit gap of log((1 - eps + eps/n) / (eps/n)). At the temperature giving that gap, ITC is at its minimum.
    n, eps = 8, 0.1
    t = (1 + 1 / (n - 1)) / math.log((1 - eps + eps / n) / (eps / n))
    feats = torch.nn.functional.normalize(torch.eye(n) - 1.0 / n, dim=-1)
    image = feats[:, None, :].repeat(1, 4, 1)  # every query agrees
    sim_i2t, sim_t2i = itc_similarities(image, feats, image, feats)
    loss = itc_loss(sim_i2t, sim_t2i, torch.tensor(t), 0, eps).item()
    smoothed = [(1 - eps) + eps / n] + [eps / n] * (n - 1)
    floor = -sum(p * math.log(p) for p in smoothed)
    assert loss == pytest.approx(floor, abs=1e-4)
    shuffled = itc_loss(sim_i2t.roll(1, dims=1), sim_t2i.roll(1, dims=1), torch.tensor(t), 0, eps).item()
    assert shuffled > loss + 3  # every row now scores a wrong caption highest


def test_itc_offset_selects_own_rows_of_the_gathered_batch():
    sim = torch.zeros(2, 6)
    sim[0, 2], sim[1, 3] = 5.0, 5.0  # rank 1 of 3 with local batch 2 owns columns 2 and 3
    assert itc_loss(sim, sim, torch.tensor(1.0), offset=2, label_smoothing=0.0) < 0.1
    assert itc_loss(sim, sim, torch.tensor(1.0), offset=0, label_smoothing=0.0) > 4


def test_hard_negatives_never_pick_the_positive_and_prefer_similar_items():
    generator = torch.Generator().manual_seed(0)
    sim = torch.tensor([[10.0, 5.0, 0.0, 0.0], [0.0, 10.0, 0.0, 5.0]])  # rank 1 of 2: positives are columns 2, 3
    picks = torch.stack([hard_negative_indices(sim, offset=2, generator=generator) for _ in range(300)])
    assert (picks[:, 0] != 2).all() and (picks[:, 1] != 3).all()
    assert (picks[:, 0] == 0).float().mean() > 0.95  # drawn by softmax(sim): the most similar non-positive
    assert (picks[:, 1] == 1).float().mean() > 0.95
    # Degenerate rows (everything equal, or NaN) still give a valid non-positive index.
    flat = hard_negative_indices(torch.zeros(3, 3), generator=generator)
    assert (flat != torch.arange(3)).all()


def test_itm_labels_are_one_for_positives_and_zero_for_both_negatives():
    assert itm_labels(3).tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]


def test_align_loss_is_zero_at_the_target_and_only_moves_the_prompts():
    target = torch.randn(2, 4, 8)
    assert align_loss(target.clone(), target).item() == 0.0
    prompts = (target + 0.5).requires_grad_(True)
    moving_target = target.clone().requires_grad_(True)
    loss = align_loss(prompts, moving_target)
    assert loss.item() == pytest.approx(0.25)
    loss.backward()
    assert moving_target.grad is None and prompts.grad is not None


def test_multimodal_causal_mask():
    text_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    mask = multimodal_causal_mask(2, text_mask)  # (B, 1, 5, 5)
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bool
    first = mask[0, 0].int().tolist()
    assert first[:2] == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0]]  # queries see queries only
    assert first[2:] == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]  # text: all queries, causal text
    assert mask[1, 0, 4].int().tolist() == [1, 1, 1, 1, 0]  # padding is never attended
