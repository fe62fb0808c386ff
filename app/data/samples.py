"""The dataset builders of stages 1 and 2: raw sample rows (`app.data.sources`) -> decoded media
(`app.data.media`) + caption tokens (`app.data.captions`), in `map_batches` on CPU; or rows of a feature
cache (`app.data.feature_cache`).

Unusable samples are counted by reason, with a few (shard, key) examples, and dropped, never raised.
Images leave as uint8 arrays (a quarter of float32's bytes); the vision encoder normalises them on the
device. Training draws its randomness (crops, flips, caption choice) from the run seed, the epoch and the
batch's keys: fresh every epoch, the same in every run with that seed; evaluation's is seeded by the run seed
and the batch's keys.
"""

from __future__ import annotations

import logging
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import ray.data

from app import storage
from app.data.captions import CaptionSpec, tokenize_captions
from app.data.feature_cache import bytes_array, cached_key, pformer_column, preprocess_cached_batch
from app.data.media import MediaSpec, SkipSample, decode_sample
from app.data.sources import CHUNK_ROWS, VIDEO_CHUNK_ROWS, PictureSubset, image_id_number, read_image_text
from app.data.stats import report_counts
from app.data.text import file_order

logger = logging.getLogger(__name__)

_skips_logged = Counter()
SKIPS_LOGGED_IN_FULL = 20


def _log_skip(shard: str, key: str, reason: str) -> None:
    """One warning per unusable sample for the first few in this process, then one per thousand."""
    _skips_logged["n"] += 1
    n = _skips_logged["n"]
    if n <= SKIPS_LOGGED_IN_FULL or n % 1000 == 0:
        more = "" if n < SKIPS_LOGGED_IN_FULL else f" ({n} skipped in this process so far; further ones are counted)"
        logger.warning("skipped sample %r of %s: %s%s", key, shard, reason, more)


@dataclass
class DecodedRows:
    """The usable rows of a batch (pixels, normalised caption, the row, its cached P-Former output) and
    the counts: rows_read, skipped_<reason>, converted_<mode>, with a few (shard, key, reason) examples."""

    pixels: list = field(default_factory=list)
    texts: list = field(default_factory=list)
    rows: list = field(default_factory=list)
    vectors: list = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)


def decode_rows(rows: list[dict], *, media: MediaSpec, captions: CaptionSpec, rng: np.random.Generator,
                count_prefix: str = "", cached: Optional[dict] = None) -> DecodedRows:
    """Decode each raw row's media and normalise its caption; an unusable row is counted by reason and
    dropped, never raised."""
    out = DecodedRows(counts=Counter(rows_read=len(rows)))
    counts, examples = out.counts, out.examples

    def skip(row: dict, reason: str, detail: str = "") -> None:
        counts[f"skipped_{reason}"] += 1
        examples.append({"shard": row["shard"], "key": row["key"] or "?", "reason": count_prefix + reason + detail})
        _log_skip(row["shard"], row["key"] or "?", count_prefix + reason + detail)

    for row in rows:
        if row.get("problem") is not None:
            skip(row, row["problem"])
            continue
        listed = row["captions"] or []
        if not listed:
            skip(row, "no_caption")
            continue
        choice = int(rng.integers(len(listed))) if media.train and len(listed) > 1 else 0
        text = captions.normalise(listed[choice])
        if not text:
            skip(row, "empty_caption")
            continue
        try:
            pixels, converted = decode_sample(row["image"], row.get("ext") or "", media, rng)
        except SkipSample as err:
            skip(row, err.reason, err.detail)
            continue
        if converted is not None:
            counts[f"converted_{converted.lower().replace(';', '_')}"] += 1
        out.pixels.append(pixels)
        out.texts.append(text)
        out.rows.append(row)
        if cached:
            out.vectors.append(row[cached["column"]][choice])
    return out


def preprocess_image_batch(batch: pa.Table, *, media: MediaSpec, captions: CaptionSpec, seed: int = 0, counter=None,
                           count_prefix: str = "", s3: Optional[storage.S3Options] = None, keep_text: bool = False,
                           cached: Optional[dict] = None, image_ids: bool = False) -> dict[str, np.ndarray]:
    """Raw sample rows -> `pixels` uint8 (N, S, S, 3), or (N, T, S, S, 3) with media.num_frames T, + caption
    tokens. Bad samples are counted, not raised.

    keep_text: also return `key`, `shard` and the chosen `caption` (evaluation, inspection).
    In training, rows read with a `sample_id` (`app.data.sources`) keep it; the ids of those dropped go to `counter`.
    image_ids: also return `image_id` (int64), equal for the samples of one image (see `image_id_number`).
    cached: rows of a prompt cache (kind prompts): {column, dtype, shape} of the P-Former outputs kept per
    caption; the chosen caption's output leaves as `pformer_sentence` / `pformer_prompts`.
    """
    rows = batch.to_pylist()
    # Crops, flips, the caption drawn and T5 splits: seeded by the run seed, the batch's keys and (training) the
    # epoch the read belongs to, so a run repeats with its seed and each epoch augments afresh. A training read
    # that does not know its epoch (no data actor) draws unseeded.
    keys = zlib.crc32("".join(r["key"] or "" for r in rows).encode())
    epoch = rows[0].get("epoch") if rows else None
    rng = (np.random.default_rng([seed, epoch, keys]) if media.train and epoch is not None else
           np.random.default_rng() if media.train else np.random.default_rng([seed, keys]))
    kept = decode_rows(rows, media=media, captions=captions, rng=rng, count_prefix=count_prefix, cached=cached)
    counts, examples = kept.counts, kept.examples
    kept_pixels, kept_texts, kept_rows, kept_vectors = kept.pixels, kept.texts, kept.rows, kept.vectors
    counts["rows_kept"] = len(kept_texts)
    if count_prefix:
        counts = Counter({count_prefix + k: v for k, v in counts.items()})
    numbered = media.train and bool(rows) and all(r.get("sample_id") is not None for r in rows)
    kept_ids = {id(r) for r in kept_rows}
    report_counts(counter, counts, examples,
                  [r["sample_id"] for r in rows if id(r) not in kept_ids] if numbered else None)

    if not kept_texts:
        return {}  # an empty batch (Ray Data drops it)
    out = {"pixels": np.stack(kept_pixels)}
    if cached:
        name = "pformer_sentence" if cached["column"] == "sentences" else "pformer_prompts"
        out[cached_key(name, cached["dtype"])] = bytes_array(kept_vectors, cached["dtype"], tuple(cached["shape"]))
    out.update(tokenize_captions(kept_texts, captions, rng, s3))
    if image_ids:
        out["image_id"] = np.array([image_id_number(r) for r in kept_rows], dtype=np.int64)
    if numbered:
        out["sample_id"] = np.array([r["sample_id"] for r in kept_rows], dtype=np.int64)
    if keep_text:
        out["key"] = np.array([r["key"] for r in kept_rows])
        out["shard"] = np.array([r["shard"] for r in kept_rows])
        out["caption"] = np.array(kept_texts)
    return out


def image_text_dataset(uri: str, cfg, *, train: bool, image_size: int, captions: CaptionSpec, counter=None,
                       count_prefix: str = "", s3: Optional[storage.S3Options] = None,
                       keep_text: bool = False, subset: Optional[PictureSubset] = None) -> ray.data.Dataset:
    """Shards at `uri` -> decoded, transformed, tokenized samples (see `preprocess_image_batch`); `subset`:
    only its pictures (`first_pictures`, data.train_pictures)."""
    video = bool(cfg.model.num_frames)
    raw = read_image_text(uri, fmt=cfg.data.image_format, image_column=cfg.data.image_column,
                          caption_column=cfg.data.caption_column, s3=s3, shuffle_files=train, seed=cfg.run.seed,
                          chunk_rows=VIDEO_CHUNK_ROWS if video else CHUNK_ROWS, subset=subset,
                          plan=counter if train else None)
    # Clips: one batch per read block (VIDEO_CHUNK_ROWS clips). A map_batches with a batch size is never
    # fused with the read before it (Ray's fusion rule for ops that may change the row count); without
    # one, each shard's read and decoding run in one task, and every CPU slot decodes.
    return raw.map_batches(
        preprocess_image_batch,
        batch_size=None if video else 64,
        batch_format="pyarrow",
        fn_kwargs=dict(media=MediaSpec.from_config(cfg, size=image_size, train=train), captions=captions,
                       seed=cfg.run.seed, counter=counter, count_prefix=count_prefix, s3=s3, keep_text=keep_text,
                       image_ids=cfg.loss.itc_same_image_positives),
    )


def cached_dataset(uri: str, cfg, manifest: dict[str, Any], *, train: bool, image_size: int, captions: CaptionSpec,
                   counter=None, s3: Optional[storage.S3Options] = None) -> ray.data.Dataset:
    """The cache at `uri` as a training dataset (`captions` without a P-Former tokenizer: its outputs are cached)."""
    fs, root = storage.resolve(uri, s3)
    ds = ray.data.read_parquet([f"{root}/{p}" for p in manifest["parts"]], filesystem=fs,
                               shuffle=file_order(train, cfg.run.seed))
    dtype, shapes = manifest["identity"]["dtype"], manifest["shapes"]
    if manifest["identity"]["kind"] == "features":
        return ds.map_batches(preprocess_cached_batch, batch_size=64, batch_format="pyarrow", fn_kwargs=dict(
            train=train, captions=captions, dtype=dtype, shapes=shapes, seed=cfg.run.seed, counter=counter, s3=s3))
    column = pformer_column(manifest)
    return ds.map_batches(
        preprocess_image_batch, batch_size=16 if cfg.model.num_frames else 64, batch_format="pyarrow",
        fn_kwargs=dict(media=MediaSpec.from_config(cfg, size=image_size, train=train), captions=captions,
                       seed=cfg.run.seed, counter=counter, s3=s3,
                       cached=dict(column=column, dtype=dtype, shape=shapes.get(column)) if column else None))
