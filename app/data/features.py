"""Training samples from a frozen-feature cache (`app.cache`, written by jobs.cache_features).

`features` caches: each row holds the frozen image features and the P-Former output of each of its
captions; a sample picks a caption (a random one per pass in training, the first in evaluation), and
leaves with the caption's tokens for the Q-Former (stage 1) or the LLM (stage 2), the features as
`image_embeds` and the chosen caption's P-Former output as `pformer_sentence` (or `pformer_prompts`).
16-bit floats stay 16-bit on the way to the device: float16 as it is, bfloat16 as its int16 bits under a
`_bf16` key (numpy has no bfloat16); `app.models.blip2` views them back.

`prompts` caches hold the media bytes instead of features; their rows go through the ordinary image
preprocessing (decode, augment) and only the P-Former output comes from the cache.
"""

from __future__ import annotations

import zlib
from collections import Counter
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import ray.data

from app import storage
from app.cache import bytes_array
from app.data.images import CaptionSpec, preprocess_image_batch, tokenize_captions
from app.data.stats import report_counts


def cached_key(name: str, dtype: str) -> str:
    return f"{name}_bf16" if dtype == "bfloat16" else name


def pformer_column(manifest: dict[str, Any]) -> Optional[str]:
    """'sentences' or 'prompts': where the cache keeps the P-Former outputs (None without a P-Former)."""
    shapes = manifest.get("shapes", {})
    return next((c for c in ("sentences", "prompts") if c in shapes), None)


def preprocess_cached_batch(batch: pa.Table, *, train: bool, captions: CaptionSpec, dtype: str,
                            shapes: dict[str, list[int]], seed: int = 0, counter=None,
                            s3: Optional[storage.S3Options] = None) -> dict[str, np.ndarray]:
    """Cached rows -> `image_embeds` (+ P-Former output) + caption tokens (see the module docstring)."""
    rows = batch.to_pylist()
    rng = (np.random.default_rng() if train else
           np.random.default_rng([seed, zlib.crc32("".join(r["key"] for r in rows).encode())]))
    column = next((c for c in ("sentences", "prompts") if c in shapes), None)
    texts, features, vectors = [], [], []
    for row in rows:
        listed = row["captions"]
        j = int(rng.integers(len(listed))) if train and len(listed) > 1 else 0
        texts.append(listed[j])
        features.append(row["features"])
        if column:
            vectors.append(row[column][j])
    report_counts(counter, Counter(rows_read=len(rows), rows_kept=len(rows)))
    if not rows:
        return {}
    out = {cached_key("image_embeds", dtype): bytes_array(features, dtype, tuple(shapes["features"]))}
    if column:
        name = "pformer_sentence" if column == "sentences" else "pformer_prompts"
        out[cached_key(name, dtype)] = bytes_array(vectors, dtype, tuple(shapes[column]))
    out.update(tokenize_captions(texts, captions, rng, s3))
    return out


def cached_dataset(uri: str, cfg, manifest: dict[str, Any], *, train: bool, image_size: int, captions: CaptionSpec,
                   counter=None, s3: Optional[storage.S3Options] = None) -> ray.data.Dataset:
    """The cache at `uri` as a training dataset (`captions` without a P-Former tokenizer: its outputs are cached)."""
    fs, root = storage.resolve(uri, s3)
    ds = ray.data.read_parquet([f"{root}/{p}" for p in manifest["parts"]], filesystem=fs,
                               shuffle="files" if train else None)
    dtype, shapes = manifest["identity"]["dtype"], manifest["shapes"]
    if manifest["identity"]["kind"] == "features":
        return ds.map_batches(preprocess_cached_batch, batch_size=64, batch_format="pyarrow", fn_kwargs=dict(
            train=train, captions=captions, dtype=dtype, shapes=shapes, seed=cfg.run.seed, counter=counter, s3=s3))
    column = pformer_column(manifest)
    return ds.map_batches(
        preprocess_image_batch, batch_size=16 if cfg.data.num_frames else 64, batch_format="pyarrow",
        fn_kwargs=dict(image_size=image_size, train=train, captions=captions, min_crop_scale=cfg.data.min_crop_scale,
                       horizontal_flip=cfg.data.horizontal_flip, seed=cfg.run.seed, counter=counter, s3=s3,
                       num_frames=cfg.data.num_frames,
                       cached=dict(column=column, dtype=dtype, shape=shapes.get(column)) if column else None))
