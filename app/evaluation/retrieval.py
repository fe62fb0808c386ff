"""Image-text retrieval as BLIP-2 evaluates it: ITC similarity for every pair, then ITM re-ranking of
each query's top k candidates (score = ITM match logit + ITC similarity), Recall@1/5/10 both ways.

ITC similarity of an image and a text is the best of the image's query features against the text's
[CLS] feature (as in training). Images have several captions (5 in COCO / Flickr): image->text counts a
hit when any of them ranks within K; text->image when its own image does.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

RECALL_AT = (1, 5, 10)


def recall_at_k(scores_i2t: np.ndarray, scores_t2i: np.ndarray, text_to_image: Sequence[int],
                ks: Sequence[int] = RECALL_AT) -> dict[str, float]:
    """Recall in percent. `scores_i2t` (I, T), `scores_t2i` (T, I); `text_to_image[t]` is text t's image."""
    text_to_image = np.asarray(text_to_image)
    num_images, num_texts = scores_i2t.shape
    if scores_t2i.shape != (num_texts, num_images) or len(text_to_image) != num_texts:
        raise ValueError(f"shape mismatch: i2t {scores_i2t.shape}, t2i {scores_t2i.shape}, {len(text_to_image)} labels")
    # image -> text: the best rank among the image's own captions
    i2t_rank = np.full(num_images, num_texts, dtype=np.int64)
    order = np.argsort(-scores_i2t, axis=1, kind="stable")
    for image in range(num_images):
        own = np.flatnonzero(text_to_image == image)
        if len(own):
            positions = np.flatnonzero(np.isin(order[image], own))
            i2t_rank[image] = positions.min()
    has_text = np.bincount(text_to_image, minlength=num_images)[:num_images] > 0
    # text -> image: the rank of the text's own image
    order_t = np.argsort(-scores_t2i, axis=1, kind="stable")
    t2i_rank = np.array([np.flatnonzero(order_t[t] == text_to_image[t])[0] for t in range(num_texts)])
    out: dict[str, float] = {}
    for k in ks:
        out[f"txt_r{k}"] = 100.0 * float(np.mean(i2t_rank[has_text] < k))
        out[f"img_r{k}"] = 100.0 * float(np.mean(t2i_rank < k))
    out["txt_r_mean"] = float(np.mean([out[f"txt_r{k}"] for k in ks]))
    out["img_r_mean"] = float(np.mean([out[f"img_r{k}"] for k in ks]))
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def itc_scores(image_feats: torch.Tensor, text_feats: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """(I, T): max over queries of image query features (I, Q, C) . text features (T, C)."""
    out = []
    for start in range(0, image_feats.shape[0], chunk):
        block = image_feats[start:start + chunk].float()
        out.append(torch.einsum("iqc,tc->iqt", block, text_feats.float()).max(dim=1).values)
    return torch.cat(out)


@torch.no_grad()
def rerank(model, sims: torch.Tensor, image_embeds: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor,
           k: int, batch_size: int = 64, log_every: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP-2's re-ranking: for each image (text), its top-k texts (images) by ITC are scored by
    ITM + ITC; everything else keeps -100. Returns (scores_i2t (I, T), scores_t2i (T, I))."""
    num_images, num_texts = sims.shape
    k_i2t, k_t2i = min(k, num_texts), min(k, num_images)
    i2t = torch.full_like(sims, -100.0)
    for i in range(num_images):
        top_sim, top = sims[i].topk(k_i2t)
        scores = _itm(model, image_embeds[i].expand(k_i2t, -1, -1), text_ids[top], text_mask[top], batch_size)
        i2t[i, top] = scores + top_sim
        if log_every and (i + 1) % log_every == 0:
            logger.info("re-ranked %d/%d images", i + 1, num_images)
    t2i = torch.full_like(sims.t(), -100.0)
    for t in range(num_texts):
        top_sim, top = sims[:, t].topk(k_t2i)
        scores = _itm(model, image_embeds[top], text_ids[t].expand(k_t2i, -1), text_mask[t].expand(k_t2i, -1),
                      batch_size)
        t2i[t, top] = scores + top_sim
        if log_every and (t + 1) % (5 * log_every) == 0:
            logger.info("re-ranked %d/%d texts", t + 1, num_texts)
    return i2t, t2i


def _itm(model, image_embeds, ids, mask, batch_size: int) -> torch.Tensor:
    parts = [model.itm_scores(image_embeds[s:s + batch_size], ids[s:s + batch_size], mask[s:s + batch_size])
             for s in range(0, ids.shape[0], batch_size)]
    return torch.cat(parts).cpu()


def evaluate_retrieval(model, image_embeds: torch.Tensor, image_feats: torch.Tensor, texts: Sequence[str],
                       text_to_image: Sequence[int], k: int = 128, batch_size: int = 64,
                       max_text_len: int = 35) -> tuple[dict[str, float], dict[str, float]]:
    """(metrics after ITM re-ranking, metrics from ITC alone), in percent."""
    ids, mask = model.tokenize_text(texts, max_text_len)
    text_feats = torch.cat([model.text_features(ids[s:s + batch_size], mask[s:s + batch_size]).cpu()
                            for s in range(0, len(texts), batch_size)])
    sims = itc_scores(image_feats.cpu(), text_feats)
    itc_only = recall_at_k(sims.numpy(), sims.t().numpy(), text_to_image)
    if k <= 0:
        return itc_only, itc_only
    i2t, t2i = rerank(model, sims, image_embeds, ids, mask, k, batch_size)
    return recall_at_k(i2t.numpy(), t2i.numpy(), text_to_image), itc_only


def retrieval_pairs(rows: Sequence[dict], max_captions: Optional[int] = 5) -> tuple[list[str], list[int]]:
    """Texts and their image index from rows carrying `refs` (a list of captions)."""
    texts, owner = [], []
    for index, row in enumerate(rows):
        for caption in list(row["refs"])[:max_captions]:
            texts.append(caption)
            owner.append(index)
    return texts, owner
