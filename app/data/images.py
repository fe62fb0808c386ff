"""Image-text shards for stages 1 and 2: read (WebDataset tar or Parquet, local or s3://), decode,
transform, tokenize, stream.

Reading never fails on a bad sample: each raw row carries its key, shard, image bytes and captions,
or the reason it is unusable (`truncated_shard`, `no_image`, `bad_json`). Preprocessing, in
`map_batches` on CPU, decodes and converts images (grayscale, CMYK, palette and alpha images become
RGB; alpha is composited on white), applies the transform (train: random resized crop + horizontal
flip; eval: resize), picks a caption, normalises it (`data.caption_style`: BLIP's `pre_caption` by
default, see `app.data.text.normalise_caption`) and tokenizes it for the Q-Former, the P-Former and,
in stage 2, the LLM. Unusable samples are counted by reason, with a few (shard, key) examples, and
dropped. Images leave as uint8 HWC arrays (a quarter of float32's bytes); the vision encoder
normalises them on the device.

WebDataset layout (as img2dataset writes it): members `<key>.<ext>` grouped by key, with the image
in `.jpg|.jpeg|.png|.webp|.bmp` (or a clip in `.mp4|.webm|.avi|.mkv|.mov|.m4v`, for video runs:
`data.num_frames`, see `app.data.video`) and the caption in `.txt`, or in `.json` under the caption field
(`data.caption_column`, a string) or `captions` (a list: one is sampled per pass in training).
Parquet: an image-bytes column (`data.image_column`, binary or a `{bytes: ...}` struct as written by
Hugging Face datasets), a caption column (string or list of strings) and optionally `key`.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import math
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import ray.data
from PIL import Image
from ray.data.datasource import FileBasedDatasource

from app import storage
from app.data.stats import report_counts
from app.data.text import in_blocks, load_tokenizer, normalise_caption, split_words, tokenize

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
SHARD_EXTENSIONS = {".tar": "webdataset", ".parquet": "parquet"}
CHUNK_ROWS = 256
VIDEO_CHUNK_ROWS = 8  # clips per block: ~10 MB of frames at 8 x 224 px
SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string()), ("image", pa.binary()),
                    ("captions", pa.list_(pa.string())), ("problem", pa.string()), ("ext", pa.string()),
                    ("image_id", pa.string())])


def shard_files(uri: str, fmt: str = "auto", s3: storage.S3Options | None = None):
    """(filesystem, {format: [paths]}) for a shard URI (file, folder, glob, s3:// prefix)."""
    fs, files = storage.list_files(uri, s3)
    by_format: dict[str, list[str]] = {}
    for path in files:
        found = next((f for ext, f in SHARD_EXTENSIONS.items() if path.lower().endswith(ext)), None)
        if found is not None and fmt in ("auto", found):
            by_format.setdefault(found, []).append(path)
    if not by_format:
        wanted = {"auto": ".tar or .parquet", "webdataset": ".tar", "parquet": ".parquet"}[fmt]
        raise FileNotFoundError(f"no {wanted} shards found at {uri}")
    return fs, by_format


def check_shards(uri: str, fmt: str = "auto", s3: storage.S3Options | None = None) -> int:
    """Fail fast from one listing: no shards, or only empty ones. Returns the number of shard files."""
    fs, by_format = shard_files(uri, fmt, s3)
    paths = [p for ps in by_format.values() for p in ps]
    if all(info.size == 0 for info in fs.get_file_info(paths)):
        raise ValueError(f"the shards at {uri} are empty ({len(paths)} file(s), 0 bytes)")
    return len(paths)


# ---------------------------------------------------------------------------------------------
# reading


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset naming: the key is the member path up to the first dot of its base name."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _sample_row(key: str, shard: str, members: dict[str, bytes], caption_field: str) -> dict:
    from app.data.video import VIDEO_EXTENSIONS

    ext = next((e for e in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS if e in members), "")
    image = members[ext] if ext else None
    captions: list[str] = []
    problem = None
    image_id = None
    if "json" in members:
        try:
            meta = json.loads(members["json"].decode("utf-8"))
            if isinstance(meta, dict):  # jobs.make_shards writes image_id; img2dataset-style json has none
                found = meta.get("image_id", meta.get("file"))
                image_id = str(found) if found is not None else None
            listed = meta.get("captions") if isinstance(meta, dict) else None
            single = meta.get(caption_field) if isinstance(meta, dict) else None
            if isinstance(listed, list):
                captions = [c for c in listed if isinstance(c, str)]
            elif isinstance(single, str):
                captions = [single]
        except (UnicodeDecodeError, json.JSONDecodeError):
            problem = "bad_json"
    if not captions and "txt" in members:
        try:
            captions = [members["txt"].decode("utf-8")]
        except UnicodeDecodeError:
            problem = "undecodable_caption"
    if image is None:
        problem = "no_image"
    return {"key": key, "shard": shard, "image": image, "captions": captions, "problem": problem, "ext": ext,
            "image_id": image_id}


def iter_tar_samples(f, shard: str, caption_field: str = "caption") -> Iterator[dict]:
    """Samples of one tar stream, in order. A truncated or corrupt tar ends with one `truncated_shard` row."""
    key: Optional[str] = None
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=f, mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                member_key, ext = _split_name(info.name)
                if member_key.rpartition("/")[2].startswith(("_", ".")):
                    continue  # hidden files and __metadata__-style members
                if member_key != key:
                    if key is not None:
                        yield _sample_row(key, shard, members, caption_field)
                    key, members = member_key, {}
                data = tar.extractfile(info)
                members[ext] = data.read() if data is not None else b""
    except (tarfile.TarError, EOFError, OSError) as err:
        logger.warning("%s: unreadable after key %r (%s); the rest of the shard is skipped", shard, key, err)
        yield {"key": key or "", "shard": shard, "image": None, "captions": [], "problem": "truncated_shard", "ext": ""}
        return
    if key is not None:
        yield _sample_row(key, shard, members, caption_field)


def _table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SCHEMA)


class WebDatasetSource(FileBasedDatasource):
    """Streams WebDataset tar shards as raw sample rows (bytes undecoded), CHUNK_ROWS per block."""

    def __init__(self, paths, *, caption_field: str, uri_prefix: str, chunk_rows: int = CHUNK_ROWS,
                 pictures: Optional[frozenset] = None, **kwargs):
        super().__init__(paths, **kwargs)
        self._caption_field = caption_field
        self._uri_prefix = uri_prefix
        self._chunk_rows = chunk_rows
        self._pictures = pictures

    def _read_stream(self, f: "pa.NativeFile", path: str) -> Iterator[pa.Table]:
        rows = iter_tar_samples(f, self._uri_prefix + path, self._caption_field)
        if self._pictures is not None:
            rows = (r for r in rows if picture_name(r) in self._pictures)
        yield from in_blocks(rows, self._chunk_rows, _table)


def _image_bytes(value) -> Optional[bytes]:
    if isinstance(value, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes")
    return value if isinstance(value, (bytes, bytearray)) and value else None


def _parquet_to_rows(batch: pa.Table, image_column: str, caption_column: str, uri_prefix: str,
                     pictures: Optional[frozenset] = None) -> pa.Table:
    n = batch.num_rows
    images = batch.column(image_column).to_pylist()
    captions = batch.column(caption_column).to_pylist()
    keys = batch.column("key").to_pylist() if "key" in batch.column_names else [None] * n
    paths = batch.column("path").to_pylist() if "path" in batch.column_names else [""] * n
    ids = batch.column("image_id").to_pylist() if "image_id" in batch.column_names else [None] * n
    rows = []
    for key, path, image, caption, image_id in zip(keys, paths, images, captions, ids):
        listed = caption if isinstance(caption, list) else [caption] if isinstance(caption, str) else []
        data = _image_bytes(image)
        rows.append({"key": str(key) if key is not None else "", "shard": uri_prefix + path, "image": data,
                     "captions": [c for c in listed if isinstance(c, str)],
                     "problem": None if data is not None else "no_image", "ext": "",
                     "image_id": str(image_id) if image_id is not None else None})
    if pictures is not None:
        rows = [r for r in rows if picture_name(r) in pictures]
    return _table(rows)


def picture_name(row: dict) -> str:
    """What names a sample's picture: the shard's `image_id` (jobs.make_shards writes one per file, shared by
    its captions' samples), else shard and key (every sample its own picture)."""
    return row.get("image_id") or f"{row['shard']}/{row['key']}"


@dataclass(frozen=True)
class PictureSubset:
    """The first `count` pictures of a shard set (see `first_pictures`)."""

    uri: str
    count: int
    by_format: tuple[tuple[str, tuple[str, ...]], ...]  # the shard files holding them, per format
    pictures: frozenset  # their `picture_name`s
    samples: int         # samples of those pictures in those files
    shards_total: int    # shard files at `uri`

    def describe(self) -> str:
        files = sum(len(paths) for _, paths in self.by_format)
        return (f"the first {self.count} pictures ({self.samples} samples) of {self.uri}, "
                f"in {files} of its {self.shards_total} shard file(s)")


def _shard_rows(fs, fmt: str, path: str, prefix: str, caption_column: str, image_column: str) -> Iterator[dict]:
    """The rows of one shard without decoding images (Parquet: the id columns only)."""
    import pyarrow.parquet as pq

    if fmt == "webdataset":
        with fs.open_input_stream(path) as f:
            yield from iter_tar_samples(f, prefix + path, caption_column)
        return
    names = pq.read_schema(path, filesystem=fs).names
    ids = [c for c in ("key", "image_id") if c in names]
    if not ids:
        raise ValueError(f"{prefix}{path} has neither a 'key' nor an 'image_id' column: data.train_pictures needs "
                         f"one to name the pictures")
    table = pq.read_table(path, filesystem=fs, columns=ids)
    for i, row in enumerate(table.to_pylist()):
        yield {"key": str(row.get("key", i)), "shard": prefix + path, "problem": None,
               "image_id": str(row["image_id"]) if row.get("image_id") is not None else None}


@functools.lru_cache(maxsize=8)
def first_pictures(uri: str, count: int, fmt: str = "auto", s3: Optional[storage.S3Options] = None,
                   caption_column: str = "caption", image_column: str = "image") -> PictureSubset:
    """The first `count` distinct pictures of the shards at `uri`, in a fixed order: shard files by name
    (WebDataset before Parquet), samples in file order; unusable samples (no image, truncated shard) do
    not count. Reads the shards in that order only until the count is reached (to the end of that shard).
    Samples of the chosen pictures in later shards are not used (jobs.make_shards writes a picture's
    captions next to each other). ValueError when the shards hold fewer pictures."""
    fs, by_format = shard_files(uri, fmt, s3)
    prefix = "s3://" if storage.is_s3(uri) else ""
    pictures: set[str] = set()
    chosen: dict[str, list[str]] = {}
    samples = 0
    for found, paths in sorted(by_format.items(), key=lambda item: item[0] != "webdataset"):
        for path in sorted(paths):
            if len(pictures) >= count:
                break
            names = [picture_name(r) for r in _shard_rows(fs, found, path, prefix, caption_column, image_column)
                     if r.get("problem") is None]
            fresh = list(dict.fromkeys(n for n in names if n not in pictures))[:count - len(pictures)]
            if fresh:
                pictures.update(fresh)
                chosen.setdefault(found, []).append(path)
                samples += sum(1 for n in names if n in pictures)
    total = sum(len(p) for p in by_format.values())
    if len(pictures) < count:
        raise ValueError(f"data.train_pictures is {count} but the {total} shard file(s) at {uri} hold "
                         f"{len(pictures)} usable pictures")
    return PictureSubset(uri=uri, count=count, by_format=tuple((f, tuple(p)) for f, p in sorted(chosen.items())),
                         pictures=frozenset(pictures), samples=samples, shards_total=total)


def read_image_text(uri: str, *, fmt: str = "auto", image_column: str = "image", caption_column: str = "caption",
                    s3: storage.S3Options | None = None, shuffle_files: bool = True,
                    chunk_rows: int = CHUNK_ROWS, subset: Optional[PictureSubset] = None) -> ray.data.Dataset:
    """Raw rows `{key, shard, image, captions, problem, ext}` of every shard under `uri` (or, with `subset`,
    only the samples of its pictures, read from its shard files); WebDataset shards come in blocks of
    `chunk_rows` samples."""
    import pyarrow.parquet as pq

    fs, by_format = shard_files(uri, fmt, s3)
    pictures = None
    if subset is not None:
        by_format, pictures = {f: list(p) for f, p in subset.by_format}, subset.pictures
    prefix = "s3://" if storage.is_s3(uri) else ""
    shuffle = "files" if shuffle_files else None
    parts = []
    for found, paths in sorted(by_format.items()):
        if found == "parquet":
            names = pq.read_schema(paths[0], filesystem=fs).names
            missing = [c for c in (image_column, caption_column) if c not in names]
            if missing:
                raise ValueError(f"{prefix}{paths[0]} has no column(s) {missing} (columns: {names}); "
                                 f"set data.image_column / data.caption_column")
            columns = [image_column, caption_column] + [c for c in ("key", "image_id") if c in names]
            ds = ray.data.read_parquet(paths, filesystem=fs, include_paths=True, shuffle=shuffle).select_columns(
                columns + ["path"])
            parts.append(ds.map_batches(_parquet_to_rows, batch_format="pyarrow", fn_kwargs=dict(
                image_column=image_column, caption_column=caption_column, uri_prefix=prefix, pictures=pictures)))
        else:
            # One read task per shard, streaming its samples (a read split into more blocks than files adds
            # a SplitBlocks step that holds a CPU slot of its own). A map_batches with a batch size is not
            # fused with the read (Ray's rule for reads, which may change the row count); video runs use
            # none, so their read and decode share one task (see image_text_dataset).
            parts.append(ray.data.read_datasource(WebDatasetSource(
                paths, caption_field=caption_column, uri_prefix=prefix, chunk_rows=chunk_rows, filesystem=fs,
                shuffle=shuffle, pictures=pictures),
                override_num_blocks=len(paths)))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


# ---------------------------------------------------------------------------------------------
# decoding and transforms


def decode_image(data: bytes, draft_size: Optional[int] = None) -> tuple[Image.Image, Optional[str]]:
    """Decode to RGB; returns (image, original mode if it was converted). Raises on corrupt or
    truncated data. `draft_size`: let the JPEG decoder scale down by powers of two while keeping
    both sides >= draft_size (much faster for large photos, same result after resizing)."""
    img = Image.open(io.BytesIO(data))
    if draft_size and img.format == "JPEG":
        img.draft(None, (draft_size, draft_size))
    img.load()
    mode = img.mode
    if mode == "RGB":
        return img, None
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background, mode
    if mode in ("I", "I;16", "I;16B", "F"):  # high bit depth grayscale: scale to 8 bits first
        arr = np.asarray(img, dtype=np.float32)
        top = float(arr.max()) or 1.0
        img = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8))
    return img.convert("RGB"), mode


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator, scale: tuple[float, float] = (0.5, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a crop covering `scale` of the area with aspect ratio in `ratio`
    (torchvision's RandomResizedCrop sampling, including its centre-crop fallback)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def transform_image(img: Image.Image, size: int, train: bool, rng: Optional[np.random.Generator] = None,
                    min_scale: float = 0.5, flip: bool = True) -> np.ndarray:
    """uint8 (size, size, 3). Train: random resized crop (area in [min_scale, 1]; 1 = the whole image) +
    horizontal flip (when `flip`);
    eval: resize to size x size (BLIP-2's eval transform). Bicubic resampling."""
    if train:
        assert rng is not None
        box = random_resized_crop_box(img.width, img.height, rng, (min_scale, 1.0))
        arr = np.asarray(img.resize((size, size), Image.BICUBIC, box=box))
        if flip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        return np.ascontiguousarray(arr)
    return np.asarray(img.resize((size, size), Image.BICUBIC))


# ---------------------------------------------------------------------------------------------
# captions


@dataclass(frozen=True)
class CaptionSpec:
    """Which tokenizers the captions go through (URIs or paths, resolved on each worker)."""

    qformer: Optional[str] = None  # stage 1: the Q-Former's text side
    pformer: Optional[str] = None  # the frozen P-Former (alignment targets)
    llm: Optional[str] = None      # stage 2: the frozen LLM
    llm_is_encoder_decoder: bool = False
    prompt: str = ""
    max_txt_len: int = 32
    max_chars: int = 1000
    caption_style: str = "blip"  # data.caption_style (app.data.text.normalise_caption)
    max_words: int = 50

    def normalise(self, text: str) -> str:
        return normalise_caption(text, self.caption_style, self.max_words, self.max_chars)


@functools.lru_cache(maxsize=8)
def _tokenizer(uri: str, s3: Optional[storage.S3Options]):
    return load_tokenizer(storage.local_model(uri, s3))


@functools.lru_cache(maxsize=8)
def prompt_length(llm_tokenizer: str, prompt: str, s3: Optional[storage.S3Options] = None) -> int:
    """Tokens the decoder-only prompt occupies at the start of every LLM sequence (BOS included);
    BLIP-2 excludes them from the loss."""
    return len(_tokenizer(llm_tokenizer, s3)(prompt).input_ids)


def tokenize_captions(texts: list[str], spec: CaptionSpec, rng: np.random.Generator,
                      s3: Optional[storage.S3Options] = None) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    if spec.qformer:
        out.update(tokenize(_tokenizer(spec.qformer, s3), texts, spec.max_txt_len, "qformer"))
    if spec.pformer:
        tok = _tokenizer(spec.pformer, s3)
        if spec.qformer and tok.get_vocab() == _tokenizer(spec.qformer, s3).get_vocab():
            out["pformer_ids"], out["pformer_mask"] = out["qformer_ids"], out["qformer_mask"]
        else:
            out.update(tokenize(tok, texts, spec.max_txt_len, "pformer"))
    if spec.llm:
        tok = _tokenizer(spec.llm, s3)
        if spec.llm_is_encoder_decoder:
            prefixes, suffixes = zip(*(split_words(t, rng) for t in texts))
            inputs = [f"{spec.prompt} {p}".strip() if spec.prompt else p for p in prefixes]
            width = spec.max_txt_len + (prompt_length(spec.llm, spec.prompt, s3) if spec.prompt else 0)
            out.update(tokenize(tok, inputs, width, "llm"))
            out.update(tokenize(tok, list(suffixes), spec.max_txt_len, "llm_target"))
        else:
            width = spec.max_txt_len + prompt_length(spec.llm, spec.prompt, s3)
            out.update(tokenize(tok, [spec.prompt + t + "\n" for t in texts], width, "llm"))
    return out


# ---------------------------------------------------------------------------------------------
# the preprocessing step


_skips_logged = Counter()
SKIPS_LOGGED_IN_FULL = 20


def _log_skip(shard: str, key: str, reason: str) -> None:
    """One warning per unusable sample for the first few in this process, then one per thousand."""
    _skips_logged["n"] += 1
    n = _skips_logged["n"]
    if n <= SKIPS_LOGGED_IN_FULL or n % 1000 == 0:
        more = "" if n < SKIPS_LOGGED_IN_FULL else f" ({n} skipped in this process so far; further ones are counted)"
        logger.warning("skipped sample %r of %s: %s%s", key, shard, reason, more)


def preprocess_image_batch(batch: pa.Table, *, image_size: int, train: bool, captions: CaptionSpec,
                           min_crop_scale: float = 0.5, horizontal_flip: bool = True, seed: int = 0, counter=None, count_prefix: str = "",
                           s3: Optional[storage.S3Options] = None, keep_text: bool = False,
                           num_frames: Optional[int] = None, cached: Optional[dict] = None,
                           image_ids: bool = False) -> dict[str, np.ndarray]:
    """Raw sample rows -> `pixels` uint8 (N, S, S, 3), or (N, T, S, S, 3) with `num_frames` T (video: clips
    are sampled as in `app.data.video`, images repeated), + caption tokens. Bad samples are counted, not raised.

    keep_text: also return `key`, `shard` and the chosen `caption` (evaluation, inspection).
    image_ids: also return `image_id` (int64), equal for the samples of one image (see `image_id_number`).
    cached: rows of a prompt cache (`app.cache`, kind prompts): {column, dtype, shape} of the P-Former outputs
    kept per caption; the chosen caption's output leaves as `pformer_sentence` / `pformer_prompts`.
    """
    from app.data import video

    rows = batch.to_pylist()
    counts: Counter = Counter(rows_read=len(rows))
    examples: list[dict[str, str]] = []
    # Training draws fresh randomness (crops, flips, caption choice) every pass; eval is deterministic.
    rng = (np.random.default_rng() if train else
           np.random.default_rng([seed, zlib.crc32("".join(r["key"] or "" for r in rows).encode())]))
    kept_pixels, kept_texts, kept_rows, kept_vectors = [], [], [], []

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
        choice = int(rng.integers(len(listed))) if train and len(listed) > 1 else 0
        text = captions.normalise(listed[choice])
        if not text:
            skip(row, "empty_caption")
            continue
        ext = row.get("ext") or ""
        if not row["image"]:
            skip(row, "empty_file")
            continue
        if num_frames:
            try:
                pixels, converted = video.clip_pixels(row["image"], ext, num_frames=num_frames, size=image_size,
                                                      train=train, rng=rng, min_scale=min_crop_scale,
                                                      flip=horizontal_flip)
            except video.VideoDecodeError as err:
                skip(row, err.reason, f" ({err})")
                continue
            except Exception as err:  # PIL raises many types for corrupt data (OSError, SyntaxError, ValueError...)
                skip(row, "corrupt_image", f" ({type(err).__name__}: {err})")
                continue
        elif video.is_video(ext):
            skip(row, "video_in_image_run", f" (a .{ext} clip; set data.num_frames to train on video)")
            continue
        else:
            try:
                img, converted = decode_image(row["image"], draft_size=2 * image_size)
            except Exception as err:  # PIL raises many types for corrupt data (OSError, SyntaxError, ValueError...)
                skip(row, "corrupt_image", f" ({type(err).__name__}: {err})")
                continue
            pixels = transform_image(img, image_size, train, rng, min_crop_scale, horizontal_flip)
        if converted is not None:
            counts[f"converted_{converted.lower().replace(';', '_')}"] += 1
        kept_pixels.append(pixels)
        kept_texts.append(text)
        kept_rows.append(row)
        if cached:
            kept_vectors.append(row[cached["column"]][choice])
    counts["rows_kept"] = len(kept_texts)
    if count_prefix:
        counts = Counter({count_prefix + k: v for k, v in counts.items()})
    report_counts(counter, counts, examples)

    if not kept_texts:
        return {}  # an empty batch (Ray Data drops it)
    out = {"pixels": np.stack(kept_pixels)}
    if cached:
        from app.cache import bytes_array

        name = "pformer_sentence" if cached["column"] == "sentences" else "pformer_prompts"
        key = f"{name}_bf16" if cached["dtype"] == "bfloat16" else name
        out[key] = bytes_array(kept_vectors, cached["dtype"], tuple(cached["shape"]))
    out.update(tokenize_captions(kept_texts, captions, rng, s3))
    if image_ids:
        out["image_id"] = np.array([image_id_number(r) for r in kept_rows], dtype=np.int64)
    if keep_text:
        out["key"] = np.array([r["key"] for r in kept_rows])
        out["shard"] = np.array([r["shard"] for r in kept_rows])
        out["caption"] = np.array(kept_texts)
    return out


def image_id_number(row: dict) -> int:
    """A 63-bit number naming the sample's image: from the shard's `image_id` (jobs.make_shards writes it, one
    per file), else the sample key (every sample its own image, as the reference assumes)."""
    name = row.get("image_id") or f"{row['shard']}/{row['key']}"
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def image_text_dataset(uri: str, cfg, *, train: bool, image_size: int, captions: CaptionSpec, counter=None,
                       count_prefix: str = "", s3: Optional[storage.S3Options] = None,
                       keep_text: bool = False, subset: Optional[PictureSubset] = None) -> ray.data.Dataset:
    """Shards at `uri` -> decoded, transformed, tokenized samples (see `preprocess_image_batch`); `subset`:
    only its pictures (`first_pictures`, data.train_pictures)."""
    video = bool(cfg.data.num_frames)
    raw = read_image_text(uri, fmt=cfg.data.image_format, image_column=cfg.data.image_column,
                          caption_column=cfg.data.caption_column, s3=s3, shuffle_files=train,
                          chunk_rows=VIDEO_CHUNK_ROWS if video else CHUNK_ROWS, subset=subset)
    # Clips: one batch per read block (VIDEO_CHUNK_ROWS clips). A map_batches with a batch size is never
    # fused with the read before it (Ray's fusion rule for ops that may change the row count); without
    # one, each shard's read and decoding run in one task, and every CPU slot decodes.
    return raw.map_batches(
        preprocess_image_batch,
        batch_size=None if video else 64,
        batch_format="pyarrow",
        fn_kwargs=dict(image_size=image_size, train=train, captions=captions, min_crop_scale=cfg.data.min_crop_scale,
                       horizontal_flip=cfg.data.horizontal_flip,
                       seed=cfg.run.seed, counter=counter, count_prefix=count_prefix, s3=s3, keep_text=keep_text,
                       num_frames=cfg.data.num_frames, image_ids=cfg.loss.itc_same_image_positives),
    )
