"""The frozen-feature cache as a data format: its layout, identity, manifest and codec, and the dataset
that trains from it. `app.cache` is the batch-inference job that writes one (jobs.cache_features).

Layout at `cache.out` (a folder or s3:// prefix):

    _identity.json        what the cache is made with (written first; a restart must match it)
    parts/<shard>-<first row>.parquet   key, shard, captions, features, sentences|prompts (+ image, ext)
    _done/<shard>.json    one per finished input shard (rows written and skipped)
    manifest.json         identity + shapes + counts, written when every shard is done

Kinds: `features` stores the image features (eval transform: resize, centre frames; no augmentation:
the cache trades augmentation for speed) and the P-Former output of every caption; `prompts` stores the
media bytes and the P-Former outputs, so images are still decoded and augmented in training (always
valid, saves only the P-Former forward). P-Former output: its [CLS] sentence vector (`store:
sentence`; the frozen heads turn it into prompts in the training step) or the prompts themselves.

Training from a `features` cache: each row holds the frozen image features and the P-Former output of
each of its captions; a sample picks a caption (a random one per pass in training, the first in
evaluation), and leaves with the caption's tokens for the Q-Former (stage 1) or the LLM (stage 2), the
features as `image_embeds` and the chosen caption's P-Former output as `pformer_sentence` (or
`pformer_prompts`). 16-bit floats stay 16-bit on the way to the device: float16 as it is, bfloat16 as its
int16 bits under a `_bf16` key (numpy has no bfloat16); `decode_cached` views them back on the device.

The identity holds the weights' SHA-256 (over the state dict, in float32), so a run whose models differ
from the cache's is refused with the mismatch named (`check_cache`).
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections import Counter
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import torch

from app import storage
from app.config import Config, ConfigError
from app.data.captions import CaptionSpec, tokenize_captions
from app.data.stats import report_counts

FORMAT_VERSION = 1
IDENTITY_FILE = "_identity.json"
MANIFEST_FILE = "manifest.json"
DONE_DIR = "_done"
PARTS_DIR = "parts"
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
BF16_SUFFIX = "_bf16"


class CacheError(ConfigError):
    """A cache that cannot serve this run (missing, unfinished, made with other models)."""


def module_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's weights (names, shapes and float32 values, in name order): the same for the
    same weights whatever file format or dtype they were loaded from (bf16 and fp16 are exact in fp32)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        value = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(value.shape)}".encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()


def run_identity(cfg: Config, s3: Optional[storage.S3Options], kind: str) -> dict[str, Any]:
    """What a cache of `kind` made for this (validated) run config must match: the frozen image encoder and
    the transform (features), the frozen P-Former and the caption handling (both kinds)."""
    if cfg.stage not in ("qformer", "llm"):
        raise ConfigError(f"stage: the feature cache serves stages 1 and 2 ('qformer', 'llm'), not '{cfg.stage}'")
    # The models are imported here, not with the module: Ray Train's controller and Ray Data's coordinators
    # unpickle this module's batch functions for every run and never build a model (~2 s of imports each).
    from app.models.pformer import PFormer
    from app.models.vision import VisionEncoder, image_size_for

    identity: dict[str, Any] = {"format": FORMAT_VERSION, "kind": kind}
    if kind == "features":
        vision = VisionEncoder.from_pretrained(storage.local_model(cfg.model.vision, s3), dtype=torch.float32,
                                               final_layernorm=not cfg.model.train_ln_vision)
        identity["vision"] = {"uri": cfg.model.vision, "sha256": module_digest(vision)}
        # model.train_ln_vision: the cache keeps the tokens before the tower's final LayerNorm, so it stays valid
        # while the Q-Former's ln_vision trains.
        identity["transform"] = {"image_size": image_size_for(cfg, s3), "num_frames": cfg.model.num_frames,
                                 "tokens": ("before the tower's final LayerNorm" if cfg.model.train_ln_vision
                                            else "after the tower's frozen final LayerNorm"),
                                 "resize": "bicubic to image_size x image_size, no crop, no flip",
                                 "frames": "centre of each of num_frames equal segments" if cfg.model.num_frames else None}
        del vision
    # The captions are stored normalised (data.caption_style), for the P-Former and the stage's tokenizers alike.
    identity["captions"] = {"caption_style": cfg.data.caption_style, "max_words": cfg.data.max_words}
    identity["pformer"] = None
    if cfg.init_from.pformer:
        pformer = PFormer.load_frozen(cfg.init_from.pformer, s3)
        identity["pformer"] = {"uri": cfg.init_from.pformer, "sha256": module_digest(pformer),
                               "max_txt_len": cfg.data.max_txt_len, "max_chars": cfg.data.max_chars}
    return identity


def _short(digest: Optional[str]) -> str:
    return (digest or "none")[:12]


def identity_mismatch(cache: dict[str, Any], run: dict[str, Any]) -> Optional[str]:
    """A sentence naming what differs between a cache's identity and a run's, or None."""
    if cache.get("format") != run.get("format"):
        return f"cache format {cache.get('format')} (this code writes and reads format {run.get('format')})"
    if cache.get("kind") != run.get("kind"):
        return f"a '{cache.get('kind')}' cache where a '{run.get('kind')}' one was expected"
    if run.get("kind") == "features":
        for key, value in run["transform"].items():
            if (cache.get("transform") or {}).get(key) != value:
                return f"transform: the cache has {key}={cache['transform'].get(key)!r}, this run needs {value!r}"
        made, now = cache.get("vision") or {}, run["vision"]
        if made.get("sha256") != now["sha256"]:
            return (f"image encoder: the cache was made with {made.get('uri')} (weights sha256 {_short(made.get('sha256'))}), "
                    f"this run's model.vision is {now['uri']} (sha256 {_short(now['sha256'])})")
    for key, value in run["captions"].items():
        made_value = (cache.get("captions") or {}).get(key)
        if made_value != value:
            return (f"captions: the cache holds captions normalised with data.{key}={made_value!r}, this run uses "
                    f"data.{key}={value!r}")
    made, now = cache.get("pformer"), run.get("pformer")
    if now is not None:
        if made is None:
            return "P-Former: the cache holds no P-Former outputs, this run aligns to init_from.pformer"
        if made.get("sha256") != now["sha256"]:
            return (f"P-Former: the cache was made with {made.get('uri')} (weights sha256 {_short(made.get('sha256'))}), "
                    f"this run's init_from.pformer is {now['uri']} (sha256 {_short(now['sha256'])})")
        for key in ("max_txt_len", "max_chars"):
            if made.get(key) != now[key]:
                return f"P-Former input: the cache used data.{key}={made.get(key)}, this run data.{key}={now[key]}"
    return None


def read_manifest(uri: str, s3: Optional[storage.S3Options]) -> dict[str, Any]:
    """The finished cache's manifest; CacheError naming the problem when there is none."""
    fs, root = storage.resolve(uri, s3)
    info = fs.get_file_info(f"{root}/{MANIFEST_FILE}")
    if info.type.name != "File":
        started = fs.get_file_info(f"{root}/{IDENTITY_FILE}").type.name == "File"
        if started:
            raise CacheError(f"data.train_features: the cache at {uri} is unfinished (no {MANIFEST_FILE}); run "
                             f"jobs.cache_features again with the same config to finish it")
        raise CacheError(f"data.train_features: no feature cache at {uri} (expected {MANIFEST_FILE}; make one with "
                         f"jobs.cache_features)")
    with fs.open_input_stream(f"{root}/{MANIFEST_FILE}") as f:
        return json.loads(f.read().decode("utf-8"))


def check_cache(cfg: Config, s3: Optional[storage.S3Options]) -> dict[str, Any]:
    """The manifest of `data.train_features` if it was made with this run's frozen models and transform;
    CacheError naming the mismatch otherwise."""
    manifest = read_manifest(cfg.data.train_features, s3)
    problem = identity_mismatch(manifest["identity"], run_identity(cfg, s3, manifest["identity"]["kind"]))
    if problem:
        raise CacheError(f"data.train_features: {cfg.data.train_features} does not match this run: {problem}")
    return manifest


def tensor_bytes(tensor: torch.Tensor, dtype: str) -> bytes:
    """Raw bytes of a tensor in the cache dtype (bf16 as its 16 bits)."""
    value = tensor.detach().to("cpu", TORCH_DTYPES[dtype]).contiguous()
    if dtype == "bfloat16":
        value = value.view(torch.int16)
    return value.numpy().tobytes()


def bytes_array(values: list[bytes], dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Stacked arrays from raw bytes: float16/float32 as they are, bfloat16 as int16 bits (see `decode_cached`)."""
    np_dtype = {"bfloat16": np.int16, "float16": np.float16, "float32": np.float32}[dtype]
    return np.stack([np.frombuffer(v, dtype=np_dtype).reshape(shape) for v in values])


def cached_key(name: str, dtype: str) -> str:
    """The batch key of a cached tensor: `name`, or `name_bf16` for bfloat16 bits carried as int16."""
    return f"{name}{BF16_SUFFIX}" if dtype == "bfloat16" else name


def decode_cached(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch with every `<name>_bf16` tensor (int16 bits) viewed back as bfloat16 under `<name>`; the
    models only ever see the plain names."""
    return {(k[:-len(BF16_SUFFIX)] if k.endswith(BF16_SUFFIX) else k):
            (v.view(torch.bfloat16) if k.endswith(BF16_SUFFIX) else v) for k, v in batch.items()}


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


