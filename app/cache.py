"""The feature-cache job (jobs.cache_features): run the frozen image encoder and the frozen P-Former once
over the training shards and write their outputs in the cache format of `app.data.feature_cache`.

In stages 1-2 the image encoder and the P-Former never change, yet a live run recomputes them for every
sample of every epoch (the image encoder is the largest single cost of a BLIP-2 step). `cache_features`
is a Ray Data batch-inference job:

    shard files --read (one task per shard, rows numbered, an end row per shard)
               --map_batches (CPU tasks: decode, eval transform, clean captions; bad samples marked)
               --map_batches (actor pool, GPUs when there are: image encoder + P-Former, writes a Parquet
                              part per block, returns counts)
               --> driver: a shard whose rows are all written or skipped gets a `_done/` marker

Resuming: finished shards (with a `_done/` marker) are not recomputed; parts of unfinished shards are
deleted before they are redone, so an interrupted run never leaves duplicate rows. Nothing in `app/`
imports this module; training reads caches through `app.data.feature_cache`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
import torch
from ray.data.datasource import FileBasedDatasource

from app import storage
from app.config import Config, ConfigError
from app.data.feature_cache import (DONE_DIR, IDENTITY_FILE, MANIFEST_FILE, PARTS_DIR, CacheError, identity_mismatch,
                                    run_identity, tensor_bytes)
from app.data.media import MediaSpec, SkipSample, decode_sample
from app.data.sources import SCHEMA, iter_tar_samples, parquet_rows, shard_files
from app.data.text import in_blocks, load_tokenizer, normalise_caption, tokenize
from app.models.llm import resolve_dtype
from app.models.pformer import PFormer
from app.models.vision import VisionEncoder, image_size_for
from app.stages import get_stage
from app.train.launcher import init_ray, resolve_paths

logger = logging.getLogger(__name__)

END = "end_of_shard"
INPUT_SCHEMA = SCHEMA.append(pa.field("index", pa.int64()))


def stage_for(cfg: Config):
    """The stage a cache serves (its validation resolves the P-Former and checks the shards)."""
    if cfg.stage not in ("qformer", "llm"):
        raise ConfigError(f"stage: the feature cache serves stages 1 and 2 ('qformer', 'llm'), not '{cfg.stage}'")
    return get_stage(cfg.stage)


# ---------------------------------------------------------------------------------------------
# reading the input shards


def _parquet_rows(f, shard: str, image_column: str, caption_column: str) -> Iterator[dict]:
    parquet = pq.ParquetFile(f)
    names = parquet.schema_arrow.names
    columns = [image_column, caption_column] + (["key"] if "key" in names else [])
    for batch in parquet.iter_batches(columns=columns):
        yield from parquet_rows(pa.Table.from_batches([batch]), image_column, caption_column, "")


class CacheInputSource(FileBasedDatasource):
    """Every sample of each shard with its row number, then one END row holding the shard's row count."""

    def __init__(self, paths, *, caption_field: str, image_column: str, uri_prefix: str, rows_per_block: int,
                 **kwargs):
        super().__init__(paths, **kwargs)
        self._caption_field, self._image_column = caption_field, image_column
        self._uri_prefix, self._rows = uri_prefix, rows_per_block

    def _read_stream(self, f: "pa.NativeFile", path: str) -> Iterator[pa.Table]:
        shard = self._uri_prefix + path
        if path.lower().endswith(".parquet"):
            rows = _parquet_rows(f, shard, self._image_column, self._caption_field)
        else:
            rows = iter_tar_samples(f, shard, self._caption_field)

        def numbered() -> Iterator[dict]:
            count = 0
            for row in rows:
                yield {**row, "shard": shard, "index": count}
                count += 1
            yield {"key": "", "shard": shard, "image": None, "captions": [], "problem": END, "ext": "", "index": count}

        yield from in_blocks(numbered(), self._rows, lambda block: pa.Table.from_pylist(block, schema=INPUT_SCHEMA))


# ---------------------------------------------------------------------------------------------
# the CPU stage


def prepare_cache_batch(batch: pa.Table, *, kind: str, image_size: int, num_frames: Optional[int],
                        max_chars: int, caption_style: str = "blip", max_words: int = 50) -> dict[str, np.ndarray]:
    """Rows -> `status` ("ok", "end", "skip:<reason>"), cleaned captions (JSON), and the eval-transformed
    `pixels` (features; zeros where not ok) or the media bytes (prompts)."""
    media_spec = MediaSpec(size=image_size, num_frames=num_frames or None)
    rows = batch.to_pylist()
    status, captions, pixels, media = [], [], [], []
    shape = (num_frames, image_size, image_size, 3) if num_frames else (image_size, image_size, 3)
    for row in rows:
        state, texts, array, detail = "ok", [], None, ""
        if row["problem"] == END:
            state = "end"
        elif row["problem"] is not None:
            state = f"skip:{row['problem']}"
        else:
            texts = [t for t in (normalise_caption(c, caption_style, max_words, max_chars)
                                 for c in row["captions"] or []) if t]
            if not texts:
                state = "skip:no_caption" if not row["captions"] else "skip:empty_caption"
            elif not row["image"]:
                state = "skip:empty_file"
            elif kind == "features":
                try:
                    array, _ = decode_sample(row["image"], row["ext"] or "", media_spec)
                except SkipSample as err:
                    state, detail = f"skip:{err.reason}", err.detail
        if state.startswith("skip:"):
            logger.warning("skipped sample %r of %s: %s%s", row["key"], row["shard"], state[5:], detail)
        status.append(state)
        captions.append(json.dumps(texts))
        if kind == "features":
            pixels.append(array if array is not None else np.zeros(shape, np.uint8))
        else:
            media.append(row["image"] if state == "ok" else b"")
    out = {"key": np.array([r["key"] for r in rows], dtype=object),
           "shard": np.array([r["shard"] for r in rows], dtype=object),
           "index": np.array([r["index"] for r in rows], dtype=np.int64),
           "ext": np.array([r["ext"] or "" for r in rows], dtype=object),
           "status": np.array(status, dtype=object), "captions": np.array(captions, dtype=object)}
    if kind == "features":
        out["pixels"] = np.stack(pixels) if pixels else np.zeros((0, *shape), np.uint8)
    else:
        out["image"] = np.array(media, dtype=object)
    return out


# ---------------------------------------------------------------------------------------------
# the encoder actors


class CacheEncoder:
    """Ray Data actor: the frozen image encoder (features) and P-Former on one device; each call encodes a
    block, writes it as one Parquet part, and returns per-shard counts."""

    def __init__(self, cfg: Config, s3: Optional[storage.S3Options], use_gpu: bool):
        self.cfg, self.s3, self.cache = cfg, s3, cfg.cache
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.vision = None
        if self.cache.kind == "features":
            self.vision = VisionEncoder.from_pretrained(
                storage.local_model(cfg.model.vision, s3),
                dtype=resolve_dtype(cfg.model.vision_dtype, self.device.type == "cuda"),
                final_layernorm=not cfg.model.train_ln_vision).to(self.device)
        self.shapes: dict[str, list[int]] = {}  # per-row tensor shapes, kept in each part's schema metadata
        self.pformer = self.tokenizer = None
        if cfg.init_from.pformer:
            self.pformer = PFormer.load_frozen(cfg.init_from.pformer, s3).to(self.device)
            self.tokenizer = load_tokenizer(storage.local_model(storage.join(cfg.init_from.pformer, "pformer"), s3))

    @torch.no_grad()
    def _features(self, pixels: np.ndarray) -> list[bytes]:
        out: list[bytes] = []
        for start in range(0, len(pixels), self.cache.batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(pixels[start:start + self.cache.batch_size])).to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                feats = self.vision(chunk)
            self.shapes["features"] = list(feats.shape[1:])
            out.extend(tensor_bytes(f, self.cache.dtype) for f in feats)
        return out

    @torch.no_grad()
    def _pformer(self, texts: list[str]) -> list[bytes]:
        out: list[bytes] = []
        for start in range(0, len(texts), self.cache.batch_size):
            enc = tokenize(self.tokenizer, texts[start:start + self.cache.batch_size], self.cfg.data.max_txt_len, "p")
            ids = torch.from_numpy(enc["p_ids"]).long().to(self.device)
            mask = torch.from_numpy(enc["p_mask"]).long().to(self.device)
            sentence = self.pformer.bert(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
            value = sentence if self.cache.store == "sentence" else self.pformer.prompts_from_sentence(sentence)
            self.shapes["sentences" if self.cache.store == "sentence" else "prompts"] = list(value.shape[1:])
            out.extend(tensor_bytes(v, self.cache.dtype) for v in value)
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        status = [str(s) for s in batch["status"]]
        ok = [i for i, s in enumerate(status) if s == "ok"]
        captions = [json.loads(batch["captions"][i]) for i in ok]
        columns: dict[str, Any] = {
            "key": [str(batch["key"][i]) for i in ok], "shard": [str(batch["shard"][i]) for i in ok],
            "captions": captions}
        if ok and self.vision is not None:
            columns["features"] = self._features(batch["pixels"][ok])
        if ok and self.pformer is not None:
            flat = self._pformer([t for texts in captions for t in texts])
            grouped, at = [], 0
            for texts in captions:
                grouped.append(flat[at:at + len(texts)])
                at += len(texts)
            columns["sentences" if self.cache.store == "sentence" else "prompts"] = grouped
        if ok and self.cache.kind == "prompts":
            columns["image"] = [batch["image"][i] for i in ok]
            columns["ext"] = [str(batch["ext"][i]) for i in ok]
        # One metadata row per shard present in the block (a read task reads one shard, so usually one).
        meta: dict[str, list] = {"shard": [], "written": [], "skipped": [], "end_total": [], "part": []}
        for shard in dict.fromkeys(str(s) for s in batch["shard"]):
            rows = [i for i, s in enumerate(batch["shard"]) if str(s) == shard]
            mine = [i for i in ok if str(batch["shard"][i]) == shard]
            part = ""
            if mine:
                first = int(min(batch["index"][i] for i in mine))
                part = self._write(shard, first, [ok.index(i) for i in mine], columns)
            ends = [int(batch["index"][i]) for i in rows if status[i] == "end"]
            meta["shard"].append(shard)
            meta["written"].append(len(mine))
            meta["skipped"].append(json.dumps(Counter(status[i][5:] for i in rows if status[i].startswith("skip:"))))
            meta["end_total"].append(ends[0] if ends else -1)
            meta["part"].append(part)
        return {k: np.array(v, dtype=object if k in ("shard", "skipped", "part") else np.int64) for k, v in meta.items()}

    def _write(self, shard: str, first: int, picks: list[int], columns: dict[str, Any]) -> str:
        table = pa.table({name: [values[i] for i in picks] for name, values in columns.items()})
        table = table.replace_schema_metadata({"shapes": json.dumps(self.shapes), "dtype": self.cache.dtype})
        fs, root = storage.resolve(self.cache.out, self.s3)
        name = f"{PARTS_DIR}/{shard_stem(shard)}-{first:07d}.parquet"
        with fs.open_output_stream(f"{root}/{name}") as f:
            pq.write_table(table, f)
        return name


def shard_stem(shard: str) -> str:
    """A file-name-safe id of an input shard (its path relative to nothing: the base name plus a short hash
    of the full path, so shards with the same name in different folders do not collide)."""
    base = shard.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return f"{base}-{hashlib.sha1(shard.encode()).hexdigest()[:8]}"


# ---------------------------------------------------------------------------------------------
# the job


def _read_json(uri: str, s3: Optional[storage.S3Options]) -> Optional[dict]:
    try:
        return storage.read_json(uri, s3)
    except (FileNotFoundError, OSError):
        return None


def default_actors(use_gpu: bool) -> int:
    resources = ray.cluster_resources()
    if use_gpu and resources.get("GPU", 0) >= 1:
        return int(resources["GPU"])
    return min(4, max(1, int(resources.get("CPU", 4)) // 4))


def cache_features(cfg: Config, s3: Optional[storage.S3Options] = None, *, max_shards: Optional[int] = None,
                   progress=print) -> dict[str, Any]:
    """Write (or finish) the cache of `cfg.data.train` at `cfg.cache.out`; returns the manifest. `cfg` is a
    validated stage-1 or stage-2 config. `max_shards`: stop after that many shards (the next run goes on)."""
    cache = cfg.cache
    stage_for(cfg)
    fs, root = storage.resolve(cache.out, s3)
    identity = run_identity(cfg, s3, cache.kind)
    identity["store"] = cache.store
    identity["dtype"] = cache.dtype
    found = _read_json(storage.join(cache.out, IDENTITY_FILE), s3)
    if found is not None:
        problem = identity_mismatch(found, identity) or (
            f"stored {found.get('store')} in {found.get('dtype')}, this run asks for {cache.store} in {cache.dtype}"
            if (found.get("store"), found.get("dtype")) != (cache.store, cache.dtype) else None)
        if problem:
            raise CacheError(f"cache.out: {cache.out} holds a cache made differently ({problem}); write to another "
                             f"cache.out or delete it")
    else:
        fs.create_dir(root, recursive=True)
        storage.write_json(storage.join(cache.out, IDENTITY_FILE), identity, s3)
    for folder in (PARTS_DIR, DONE_DIR):
        fs.create_dir(f"{root}/{folder}", recursive=True)

    source_fs, by_format = shard_files(cfg.data.train, cfg.data.image_format, s3)
    prefix = "s3://" if storage.is_s3(cfg.data.train) else ""
    shards = sorted(prefix + p for paths in by_format.values() for p in paths)
    done = {name.removesuffix(".json") for name in storage.list_names(storage.join(cache.out, DONE_DIR), s3)}
    pending = [s for s in shards if shard_stem(s) not in done]
    # Parts of unfinished shards (an interrupted run) are redone from scratch: no duplicate rows.
    pending_stems = {shard_stem(s) for s in pending}
    stale = [n for n in storage.list_names(storage.join(cache.out, PARTS_DIR), s3) if n.rsplit("-", 1)[0] in pending_stems]
    for name in stale:
        fs.delete_file(f"{root}/{PARTS_DIR}/{name}")
    if max_shards is not None:
        pending = pending[:max_shards]
    progress(f"[cache] {len(shards)} shard(s) at {cfg.data.train}: {len(done & {shard_stem(x) for x in shards})} done before, "
             f"{len(pending)} to do now" + (f" ({len(stale)} unfinished part(s) removed)" if stale else ""))
    start = time.perf_counter()
    rows_now = 0
    if pending:
        use_gpu = cfg.scaling.use_gpu and ray.cluster_resources().get("GPU", 0) >= 1
        actors = cache.num_actors or default_actors(use_gpu)
        image_size = image_size_for(cfg, s3)
        raw = ray.data.read_datasource(
            CacheInputSource([p.removeprefix(prefix) for p in pending], caption_field=cfg.data.caption_column,
                             image_column=cfg.data.image_column, uri_prefix=prefix, rows_per_block=cache.rows_per_block,
                             filesystem=source_fs),
            override_num_blocks=len(pending))
        # Fractional CPUs keep the decode stage out of the encoder actors (Ray would fuse it into them), so CPU
        # tasks decode while the actors encode; without a batch size it fuses with the read (one task per shard).
        prepared = raw.map_batches(prepare_cache_batch, batch_size=None, batch_format="pyarrow", num_cpus=0.5, fn_kwargs=dict(
            kind=cache.kind, image_size=image_size, num_frames=cfg.model.num_frames, max_chars=cfg.data.max_chars,
            caption_style=cfg.data.caption_style, max_words=cfg.data.max_words))
        encoded = prepared.map_batches(
            CacheEncoder, batch_size=None, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
            fn_constructor_kwargs=dict(cfg=cfg, s3=s3, use_gpu=use_gpu),
            num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else 1)
        state: dict[str, dict[str, Any]] = {}
        finished = 0
        for meta in encoded.iter_rows():
            shard = meta["shard"]
            entry = state.setdefault(shard, {"written": 0, "skipped": Counter(), "total": None, "parts": []})
            entry["written"] += int(meta["written"])
            entry["skipped"].update(json.loads(meta["skipped"]))
            if meta["part"]:
                entry["parts"].append(meta["part"])
            if int(meta["end_total"]) >= 0:
                entry["total"] = int(meta["end_total"])
            rows_now += int(meta["written"])
            if entry["total"] is not None and entry["written"] + sum(entry["skipped"].values()) == entry["total"]:
                storage.write_json(storage.join(cache.out, DONE_DIR, f"{shard_stem(shard)}.json"),
                                   {"shard": shard, "rows": entry["written"], "skipped": dict(entry["skipped"]),
                                    "parts": sorted(entry["parts"])}, s3)
                finished += 1
                elapsed = time.perf_counter() - start
                progress(f"[cache] {finished}/{len(pending)} shard(s) done: {shard} ({entry['written']} rows, "
                         f"{sum(entry['skipped'].values())} skipped); {rows_now / elapsed:.1f} rows/s")
    return _finish(fs, root, cache.out, shards, identity, cfg, time.perf_counter() - start, progress, s3)


def _finish(fs, root: str, uri: str, shards: list[str], identity: dict, cfg: Config, seconds: float,
            progress, s3: Optional[storage.S3Options]) -> dict[str, Any]:
    done = {name.removesuffix(".json") for name in storage.list_names(storage.join(uri, DONE_DIR), s3)}
    missing = [s for s in shards if shard_stem(s) not in done]
    if missing:
        progress(f"[cache] {len(shards) - len(missing)}/{len(shards)} shard(s) done; run again to finish "
                 f"({len(missing)} left)")
        return {"finished": False, "shards": len(shards), "shards_done": len(shards) - len(missing)}
    rows, skipped, parts = 0, Counter(), []
    for shard in shards:
        entry = _read_json(storage.join(uri, DONE_DIR, f"{shard_stem(shard)}.json"), s3) or {}
        rows += entry.get("rows", 0)
        skipped.update(entry.get("skipped", {}))
        parts += entry.get("parts", [])
    shapes = _shapes(fs, root, parts, identity)
    manifest = {"identity": identity, "source": cfg.data.train, "rows": rows, "skipped": dict(skipped),
                "shards": len(shards), "parts": sorted(parts), **shapes,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(seconds, 1)}
    storage.write_json(storage.join(uri, MANIFEST_FILE), manifest, s3)
    progress(f"[cache] finished: {rows} rows in {len(parts)} part(s) at {uri} "
             f"({sum(skipped.values())} samples skipped: {dict(skipped) or 'none'})")
    return {"finished": True, **manifest}


def _shapes(fs, root: str, parts: list[str], identity: dict) -> dict[str, Any]:
    """Per-row tensor shapes (all rows share them), from the first part's schema metadata."""
    if not parts:
        return {"shapes": {}}
    with fs.open_input_file(f"{root}/{parts[0]}") as f:
        metadata = pq.read_schema(f).metadata or {}
    return {"shapes": json.loads(metadata.get(b"shapes", b"{}"))}


def run_cache_job(cfg: Config, *, max_shards: Optional[int] = None) -> dict[str, Any]:
    """jobs.cache_features: check the stage config the cache is for (its P-Former, shards and cache.out)
    before Ray starts, then write or finish the cache; returns the manifest (or the progress)."""
    if not cfg.cache.out:
        raise ConfigError("cache.out: where to write the cache is required (a folder or s3:// prefix)")
    s3 = storage.S3Options.from_config(cfg)
    cfg = cfg.model_copy(deep=True)
    cfg.data.train_features = None  # the training config may already name the cache this job writes
    if not cfg.data.train:
        raise ConfigError("data.train: the shards to cache are required")
    cfg = stage_for(cfg).validate(resolve_paths(cfg), s3)  # resolves the P-Former, checks the shards
    if not storage.is_s3(cfg.cache.out):
        cfg.cache.out = storage.resolve(cfg.cache.out)[1]
    local = init_ray(cfg)
    try:
        return cache_features(cfg, s3, max_shards=max_shards)
    finally:
        if local:
            ray.shutdown()
