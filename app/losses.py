"""Loss functions: pure functions of tensors, one per named loss term.

Every stage's `compute_losses` returns a dict of these by name (`lm_loss`, `contrastive_loss`,
`vocab_loss`, `itc_loss`, ...), each with its weight applied; the step's loss is the sum of the keys
ending in `_loss` (`total_loss`); the training loop logs each term separately. Gathering features from
the other workers is kept apart from the math (`app.train.dist.gather_features`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from app.train import dist

IGNORE_INDEX = -100


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, shift: bool, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean token cross-entropy over positions whose label is not IGNORE_INDEX.

    shift=True for decoder-only models (logits at t predict labels at t+1); shift=False when the
    logits are already aligned with the labels (encoder-decoder, teacher forcing).
    """
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)


def contrastive_loss(features: torch.Tensor, all_features: torch.Tensor, temp: torch.Tensor,
                     offset: int = 0, label_smoothing: float = 0.1) -> torch.Tensor:
    """InfoNCE of `features` (B, C) against `all_features` (N, C), e.g. gathered from every worker.

    The positive for row i is column `offset + i` (offset = rank * B when gathered). With
    all_features built from the same forward pass this is the reference P-Former's single-view loss
    (a uniformity regulariser); with a second view it is SimCSE.
    """
    sim = features.float() @ all_features.float().t() / temp  # (B, N)
    targets = torch.arange(features.shape[0], device=features.device) + offset
    return F.cross_entropy(sim, targets, label_smoothing=label_smoothing)


@torch.no_grad()
def nearest_rows(vectors: torch.Tensor, table: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Index of the nearest (L2) row of `table` (V, D) for each of `vectors` (..., D)."""
    flat = vectors.reshape(-1, vectors.shape[-1]).to(table.dtype)
    table_sq = torch.linalg.vector_norm(table, dim=-1, dtype=torch.float32) ** 2  # (V,)
    out = []
    for start in range(0, flat.shape[0], chunk):
        part = flat[start:start + chunk]
        # |x - e|^2 = |x|^2 - 2 x.e + |e|^2; |x|^2 is the same for every e. The matmul stays in the
        # table's dtype (no fp32 copy of a 50k x 2560 table every step).
        out.append((table_sq[None, :] - 2.0 * (part @ table.t()).float()).argmin(-1))
    return torch.cat(out).view(vectors.shape[:-1])


def vocab_loss(prompts: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """MSE between each prompt vector (B, Q, D) and its nearest frozen input-embedding row (V, D).

    The target is detached: only the prompts move toward the vocabulary manifold.
    """
    target = embeddings[nearest_rows(prompts, embeddings)].detach()  # (B, Q, D)
    return F.mse_loss(prompts.float(), target.float())


def itc_similarities(image_feats: torch.Tensor, text_feat: torch.Tensor, all_image_feats: torch.Tensor,
                     all_text_feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP-2's image-text similarities: the best-matching query decides.

    image_feats (B, Q, C) and text_feat (B, C) are this worker's normalised features; all_* (N, ...)
    are gathered from every worker. Returns sim_i2t (B, N) = max_q <image_q, text_n> and
    sim_t2i (B, N) = max_q <text, image_n,q>.
    """
    sim_i2t = torch.einsum("bqc,nc->bqn", image_feats.float(), all_text_feats.float()).amax(dim=1)
    sim_t2i = torch.einsum("bc,nqc->bqn", text_feat.float(), all_image_feats.float()).amax(dim=1)
    return sim_i2t, sim_t2i


def itc_loss(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, temp: torch.Tensor, offset: int = 0,
             label_smoothing: float = 0.1, positives: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch; the positive of local row i is column offset + i.

    positives (B, N) bool, optional: every column marked True is a positive of its row (captions of the
    same image), the target mass spread evenly over them, as LAVIS does with image ids."""
    if positives is None:
        targets = torch.arange(sim_i2t.shape[0], device=sim_i2t.device) + offset
    else:
        pos = positives.float()
        targets = pos / pos.sum(dim=1, keepdim=True)
    return 0.5 * (F.cross_entropy(sim_i2t / temp, targets, label_smoothing=label_smoothing)
                  + F.cross_entropy(sim_t2i / temp, targets, label_smoothing=label_smoothing))


def same_image_mask(image_ids: torch.Tensor, all_image_ids: torch.Tensor) -> torch.Tensor:
    """(B, N) bool: local sample i and global sample n show the same image."""
    return image_ids.view(-1, 1) == all_image_ids.view(1, -1)


@torch.no_grad()
def hard_negative_indices(sim: torch.Tensor, offset: int = 0, generator: torch.Generator | None = None,
                          excluded: torch.Tensor | None = None) -> torch.Tensor:
    """For each local row i of `sim` (B, N), a column != offset + i drawn with probability
    softmax(sim[i]) over the other columns: similar (hard) negatives are drawn more often.
    excluded (B, N) bool, optional: further columns never drawn (e.g. other captions of the same image)."""
    rows = torch.arange(sim.shape[0], device=sim.device)
    logits = sim.float().clone()
    logits[rows, rows + offset] = float("-inf")
    if excluded is not None:
        logits.masked_fill_(excluded, float("-inf"))
    weights = torch.softmax(logits, dim=1).nan_to_num_(0.0) + 1e-12  # a tie-free fallback for degenerate rows
    weights[rows, rows + offset] = 0.0
    if excluded is not None:
        weights.masked_fill_(excluded, 0.0)
        # A row whose every other column is excluded (a batch of one image) falls back to any other column.
        empty = weights.sum(dim=1) == 0
        if empty.any():
            weights[empty] = 1.0
            weights[rows[empty], rows[empty] + offset] = 0.0
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def itm_labels(batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """ITM targets for [positives; image with a negative text; text with a negative image]: 1, 0, 0."""
    return torch.cat([torch.ones(batch_size, dtype=torch.long, device=device),
                      torch.zeros(2 * batch_size, dtype=torch.long, device=device)])


def align_loss(prompts: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Unweighted P-Former alignment: MSE between the projected queries and the P-Former's prompts
    (both (B, Q, D_llm); the targets come from the frozen P-Former and carry no gradient)."""
    return F.mse_loss(prompts.float(), targets.detach().float())


def itm_loss(logits: torch.Tensor) -> torch.Tensor:
    """ITM cross-entropy of (3B, 2) logits ordered [positives; image + negative text; negative image + text]."""
    return F.cross_entropy(logits.float(), itm_labels(logits.shape[0] // 3, logits.device))


def total_loss(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    """The step's loss: the sum of the (already weighted) terms whose name ends in `_loss`."""
    return sum(value for name, value in losses.items() if name.endswith("_loss"))


def with_total(losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**losses, "loss": total_loss(losses)}


# ---------------------------------------------------------------------------------------------
# each stage's objective: named, weighted terms from the composite's typed output and its weights (a
# term whose weight is 0 is left out)


def align_terms(prompts: torch.Tensor, target: torch.Tensor | None, weight: float) -> dict[str, torch.Tensor]:
    """The P-Former alignment: `align_mse` (unweighted, comparable across weights) and `align_loss`."""
    if target is None or weight <= 0:
        return {}
    mse = align_loss(prompts, target)
    return {"align_mse": mse, "align_loss": weight * mse}


def stage0_terms(out, w, embedding_matrix: torch.Tensor) -> dict[str, torch.Tensor]:
    """Stage 0 (`Stage0Output`, `Stage0Weights`): the frozen LLM's LM loss behind the prompt, the
    sentence contrastive loss over the global batch (second view: the same features with one view, as
    the reference; SimCSE's second masked view with two), and the vocabulary loss that keeps the prompts
    near the LLM's input embeddings."""
    losses: dict[str, torch.Tensor] = {}
    if w.lm_weight > 0:
        losses["lm_loss"] = w.lm_weight * lm_loss(out.lm.logits, out.lm.labels, shift=out.lm.shift)
    if w.contrastive_weight > 0:
        offset = dist.rank() * out.first_view.shape[0]
        loss = contrastive_loss(out.first_view, dist.gather_features(out.second_view, w.gather_with_grad), out.temp,
                                offset, w.label_smoothing)
        if w.contrastive_views == 2:
            loss = 0.5 * (loss + contrastive_loss(out.second_view, dist.gather_features(out.first_view, w.gather_with_grad),
                                                  out.temp, offset, w.label_smoothing))
        losses["contrastive_loss"] = w.contrastive_weight * loss
    if w.vocab_weight > 0:
        losses["vocab_loss"] = w.vocab_weight * vocab_loss(out.prompts, embedding_matrix)
    return losses


def stage1_terms(out, w) -> dict[str, torch.Tensor]:
    """Stage 1 (`Stage1Output`, `Stage1Weights`): ITC, ITM, ITG and the alignment loss."""
    q = out.qformer
    losses: dict[str, torch.Tensor] = {}
    if w.itc > 0:
        losses["itc_loss"] = w.itc * itc_loss(q.sim_i2t, q.sim_t2i, q.temp, q.offset, w.label_smoothing, q.same_image)
    if w.itm > 0:
        losses["itm_loss"] = w.itm * itm_loss(q.itm_logits)
    if w.itg > 0:
        losses["itg_loss"] = w.itg * lm_loss(q.itg_logits, q.itg_labels, shift=True, label_smoothing=w.label_smoothing)
    if q.prompts is not None:
        losses.update(align_terms(q.prompts, out.align_target, w.align))
    return losses


def stage2_terms(out, w) -> dict[str, torch.Tensor]:
    """Stage 2 (`Stage2Output`, `Stage2Weights`): the frozen LLM's (prefix-)LM loss and the alignment loss."""
    losses = {"lm_loss": w.lm * lm_loss(out.lm.logits, out.lm.labels, shift=out.lm.shift)} if w.lm > 0 else {}
    losses.update(align_terms(out.prompts, out.align_target, w.align))
    return losses


# Each stage's objective on its composite: `Stage.compute_losses` and `stage_losses` both use this one table.
STAGE_TERMS = {"pformer": lambda model, batch: stage0_terms(model(batch), model.weights, model.llm.embedding_matrix),
               "qformer": lambda model, batch: stage1_terms(model(batch), model.weights),
               "llm": lambda model, batch: stage2_terms(model(batch), model.weights)}


def stage_losses(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A stage composite's weighted loss terms on a batch and their sum under "loss" (a training step's
    losses, for tests and benchmarks that drive a composite without the loop)."""
    return with_total(STAGE_TERMS[model.stage](model, batch))
