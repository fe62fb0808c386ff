"""Frozen-feature cache for stages 1 and 2: run the frozen image encoder and the frozen P-Former once,
store their outputs as Parquet, and train from them.

In stages 1-2 the image encoder and the P-Former never change, yet a live run recomputes them for every
sample of every epoch (the image encoder is the largest single cost of a BLIP-2 step). `cache_features`
is a Ray Data batch-inference job over the training shards:

    shard files --read (one task per shard, rows numbered, an end row per shard)
               --map_batches (CPU tasks: decode, eval transform, clean captions; bad samples marked)
               --map_batches (actor pool, GPUs when there are: image encoder + P-Former, writes a Parquet
                              part per block, returns counts)
               --> driver: a shard whose rows are all written or skipped gets a `_done/` marker

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

Resuming: finished shards (with a `_done/` marker) are not recomputed; parts of unfinished shards are
deleted before they are redone, so an interrupted run never leaves duplicate rows. The identity holds the
weights' SHA-256 (over the state dict, in float32), so a run whose models differ from the cache's is
refused with the mismatch named (`check_cache`).
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
import ray
import ray.data
import torch
from ray.data.datasource import FileBasedDatasource

from app import storage
from app.config import Config, ConfigError
from app.data.images import (SCHEMA, _parquet_to_rows, decode_image, iter_tar_samples, shard_files,
                             transform_image)
from app.data.text import in_blocks, normalise_caption

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
IDENTITY_FILE = "_identity.json"
MANIFEST_FILE = "manifest.json"
DONE_DIR = "_done"
PARTS_DIR = "parts"
END = "end_of_shard"
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
INPUT_SCHEMA = SCHEMA.append(pa.field("index", pa.int64()))


class CacheError(ConfigError):
    """A cache that cannot serve this run (missing, unfinished, made with other models)."""


# ---------------------------------------------------------------------------------------------
# identities


def module_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's weights (names, shapes and float32 values, in name order): the same for the
    same weights whatever file format or dtype they were loaded from (bf16 and fp16 are exact in fp32)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        value = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(value.shape)}".encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()


def stage_for(cfg: Config):
    from app.stages import get_stage

    if cfg.stage not in ("qformer", "llm"):
        raise ConfigError(f"stage: the feature cache serves stages 1 and 2 ('qformer', 'llm'), not '{cfg.stage}'")
    return get_stage(cfg.stage)


def run_identity(cfg: Config, s3: Optional[storage.S3Options], kind: str) -> dict[str, Any]:
    """What a cache of `kind` made for this (validated) run config must match: the frozen image encoder and
    the transform (features), the frozen P-Former and the caption handling (both kinds)."""
    from app.models.vision import VisionEncoder
    from app.stages import load_frozen_pformer

    stage = stage_for(cfg)
    identity: dict[str, Any] = {"format": FORMAT_VERSION, "kind": kind}
    if kind == "features":
        vision = VisionEncoder.from_pretrained(storage.local_model(cfg.model.vision, s3), dtype=torch.float32,
                                               final_layernorm=not cfg.model.train_ln_vision)
        identity["vision"] = {"uri": cfg.model.vision, "sha256": module_digest(vision)}
        # model.train_ln_vision: the cache keeps the tokens before the tower's final LayerNorm, so it stays valid
        # while the Q-Former's ln_vision trains.
        identity["transform"] = {"image_size": stage.image_size(cfg, s3), "num_frames": cfg.data.num_frames,
                                 "tokens": ("before the tower's final LayerNorm" if cfg.model.train_ln_vision
                                            else "after the tower's frozen final LayerNorm"),
                                 "resize": "bicubic to image_size x image_size, no crop, no flip",
                                 "frames": "centre of each of num_frames equal segments" if cfg.data.num_frames else None}
        del vision
    # The captions are stored normalised (data.caption_style), for the P-Former and the stage's tokenizers alike.
    identity["captions"] = {"caption_style": cfg.data.caption_style, "max_words": cfg.data.max_words}
    identity["pformer"] = None
    if cfg.init_from.pformer:
        pformer = load_frozen_pformer(cfg.init_from.pformer, s3)
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


# ---------------------------------------------------------------------------------------------
# reading the input shards


def _parquet_rows(f, shard: str, image_column: str, caption_column: str) -> Iterator[dict]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(f)
    names = parquet.schema_arrow.names
    columns = [image_column, caption_column] + (["key"] if "key" in names else [])
    for batch in parquet.iter_batches(columns=columns):
        yield from _parquet_to_rows(pa.Table.from_batches([batch]), image_column, caption_column, "").to_pylist()


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
    from app.data.video import VideoDecodeError, clip_pixels, is_video

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
                ext = row["ext"] or ""
                try:
                    if num_frames:
                        array, _ = clip_pixels(row["image"], ext, num_frames=num_frames, size=image_size, train=False)
                    elif is_video(ext):
                        state = "skip:video_in_image_run"
                    else:
                        array = transform_image(decode_image(row["image"], draft_size=2 * image_size)[0], image_size,
                                                train=False)
                except VideoDecodeError as err:
                    state, detail = f"skip:{err.reason}", f" ({err})"
                except Exception as err:  # PIL raises many types for corrupt data
                    state, detail = "skip:corrupt_image", f" ({type(err).__name__}: {err})"
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


def tensor_bytes(tensor: torch.Tensor, dtype: str) -> bytes:
    """Raw bytes of a tensor in the cache dtype (bf16 as its 16 bits)."""
    value = tensor.detach().to("cpu", TORCH_DTYPES[dtype]).contiguous()
    if dtype == "bfloat16":
        value = value.view(torch.int16)
    return value.numpy().tobytes()


def bytes_array(values: list[bytes], dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Stacked arrays from raw bytes: float16/float32 as they are, bfloat16 as int16 bits (see `to_tensor`)."""
    np_dtype = {"bfloat16": np.int16, "float16": np.float16, "float32": np.float32}[dtype]
    return np.stack([np.frombuffer(v, dtype=np_dtype).reshape(shape) for v in values])


def to_tensor(array: torch.Tensor, dtype: str) -> torch.Tensor:
    """A batch tensor from `bytes_array` back in its cache dtype."""
    return array.view(torch.bfloat16) if dtype == "bfloat16" else array


class CacheEncoder:
    """Ray Data actor: the frozen image encoder (features) and P-Former on one device; each call encodes a
    block, writes it as one Parquet part, and returns per-shard counts."""

    def __init__(self, cfg: Config, s3: Optional[storage.S3Options], use_gpu: bool):
        from app.data.text import load_tokenizer
        from app.models.llm import resolve_dtype
        from app.models.vision import VisionEncoder
        from app.stages import load_frozen_pformer

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
            self.pformer = load_frozen_pformer(cfg.init_from.pformer, s3).to(self.device)
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
        from app.data.text import tokenize

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
        import pyarrow.parquet as pq

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


def _read_json(fs, path: str) -> Optional[dict]:
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode("utf-8"))
    except (FileNotFoundError, OSError):
        return None


def _write_json(fs, path: str, data: dict) -> None:
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(data, indent=2).encode("utf-8"))


def _listing(fs, folder: str) -> list[str]:
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)


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
    stage = stage_for(cfg)
    fs, root = storage.resolve(cache.out, s3)
    identity = run_identity(cfg, s3, cache.kind)
    identity["store"] = cache.store
    identity["dtype"] = cache.dtype
    found = _read_json(fs, f"{root}/{IDENTITY_FILE}")
    if found is not None:
        problem = identity_mismatch(found, identity) or (
            f"stored {found.get('store')} in {found.get('dtype')}, this run asks for {cache.store} in {cache.dtype}"
            if (found.get("store"), found.get("dtype")) != (cache.store, cache.dtype) else None)
        if problem:
            raise CacheError(f"cache.out: {cache.out} holds a cache made differently ({problem}); write to another "
                             f"cache.out or delete it")
    else:
        fs.create_dir(root, recursive=True)
        _write_json(fs, f"{root}/{IDENTITY_FILE}", identity)
    for folder in (PARTS_DIR, DONE_DIR):
        fs.create_dir(f"{root}/{folder}", recursive=True)

    source_fs, by_format = shard_files(cfg.data.train, cfg.data.image_format, s3)
    prefix = "s3://" if storage.is_s3(cfg.data.train) else ""
    shards = sorted(prefix + p for paths in by_format.values() for p in paths)
    done = {name.removesuffix(".json") for name in _listing(fs, f"{root}/{DONE_DIR}")}
    pending = [s for s in shards if shard_stem(s) not in done]
    # Parts of unfinished shards (an interrupted run) are redone from scratch: no duplicate rows.
    stale = [n for n in _listing(fs, f"{root}/{PARTS_DIR}") if n.rsplit("-", 1)[0] in {shard_stem(s) for s in pending}]
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
        image_size = stage.image_size(cfg, s3)
        raw = ray.data.read_datasource(
            CacheInputSource([p.removeprefix(prefix) for p in pending], caption_field=cfg.data.caption_column,
                             image_column=cfg.data.image_column, uri_prefix=prefix, rows_per_block=cache.rows_per_block,
                             filesystem=source_fs),
            override_num_blocks=len(pending))
        # Fractional CPUs keep the decode stage out of the encoder actors (Ray would fuse it into them), so CPU
        # tasks decode while the actors encode; without a batch size it fuses with the read (one task per shard).
        prepared = raw.map_batches(prepare_cache_batch, batch_size=None, batch_format="pyarrow", num_cpus=0.5, fn_kwargs=dict(
            kind=cache.kind, image_size=image_size, num_frames=cfg.data.num_frames, max_chars=cfg.data.max_chars,
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
                _write_json(fs, f"{root}/{DONE_DIR}/{shard_stem(shard)}.json",
                            {"shard": shard, "rows": entry["written"], "skipped": dict(entry["skipped"]),
                             "parts": sorted(entry["parts"])})
                finished += 1
                elapsed = time.perf_counter() - start
                progress(f"[cache] {finished}/{len(pending)} shard(s) done: {shard} ({entry['written']} rows, "
                         f"{sum(entry['skipped'].values())} skipped); {rows_now / elapsed:.1f} rows/s")
    return _finish(fs, root, cache.out, shards, identity, cfg, time.perf_counter() - start, progress)


def _finish(fs, root: str, uri: str, shards: list[str], identity: dict, cfg: Config, seconds: float,
            progress) -> dict[str, Any]:
    done = {name.removesuffix(".json") for name in _listing(fs, f"{root}/{DONE_DIR}")}
    missing = [s for s in shards if shard_stem(s) not in done]
    if missing:
        progress(f"[cache] {len(shards) - len(missing)}/{len(shards)} shard(s) done; run again to finish "
                 f"({len(missing)} left)")
        return {"finished": False, "shards": len(shards), "shards_done": len(shards) - len(missing)}
    rows, skipped, parts = 0, Counter(), []
    for shard in shards:
        entry = _read_json(fs, f"{root}/{DONE_DIR}/{shard_stem(shard)}.json") or {}
        rows += entry.get("rows", 0)
        skipped.update(entry.get("skipped", {}))
        parts += entry.get("parts", [])
    shapes = _shapes(fs, root, parts, identity)
    manifest = {"identity": identity, "source": cfg.data.train, "rows": rows, "skipped": dict(skipped),
                "shards": len(shards), "parts": sorted(parts), **shapes,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(seconds, 1)}
    _write_json(fs, f"{root}/{MANIFEST_FILE}", manifest)
    progress(f"[cache] finished: {rows} rows in {len(parts)} part(s) at {uri} "
             f"({sum(skipped.values())} samples skipped: {dict(skipped) or 'none'})")
    return {"finished": True, **manifest}


def _shapes(fs, root: str, parts: list[str], identity: dict) -> dict[str, Any]:
    """Per-row tensor shapes (all rows share them), from the first part's schema metadata."""
    import pyarrow.parquet as pq

    if not parts:
        return {"shapes": {}}
    with fs.open_input_file(f"{root}/{parts[0]}") as f:
        metadata = pq.read_schema(f).metadata or {}
    return {"shapes": json.loads(metadata.get(b"shapes", b"{}"))}
