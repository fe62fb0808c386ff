"""Reading image-text shards (WebDataset tar or Parquet, local or s3://) as raw sample rows, and the
picture subsets of `data.train_pictures`.

Reading never fails on a bad sample: each raw row carries its key, shard, media bytes and captions, or
the reason it is unusable (`truncated_shard`, `no_image`, `bad_json`, `undecodable_caption`); decoding
happens later (`app.data.samples`, `app.data.media`).

WebDataset layout (as img2dataset writes it): members `<key>.<ext>` grouped by key, with the image
in `.jpg|.jpeg|.png|.webp|.bmp` (or a clip in `.mp4|.webm|.avi|.mkv|.mov|.m4v`, for video runs:
`model.num_frames`, see `app.data.video`) and the caption in `.txt`, or in `.json` under the caption field
(`data.caption_column`, a string) or `captions` (a list: one is sampled per pass in training).
Parquet: an image-bytes column (`data.image_column`, binary or a `{bytes: ...}` struct as written by
Hugging Face datasets), a caption column (string or list of strings) and optionally `key`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import tarfile
from dataclasses import dataclass
from typing import Iterator, Optional

import pyarrow as pa
import ray.data
from ray.data.datasource import FileBasedDatasource, FileShuffleConfig

from app import storage
from app.data.media import MEDIA_EXTENSIONS
from app.data.progress import files_digest, from_ranges, sample_id
from app.data.text import file_order, in_blocks

logger = logging.getLogger(__name__)

SHARD_EXTENSIONS = {".tar": "webdataset", ".parquet": "parquet"}
CHUNK_ROWS = 256
VIDEO_CHUNK_ROWS = 8  # clips per block: ~10 MB of frames at 8 x 224 px
SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string()), ("image", pa.binary()),
                    ("captions", pa.list_(pa.string())), ("problem", pa.string()), ("ext", pa.string()),
                    ("image_id", pa.string()), ("sample_id", pa.int64()), ("epoch", pa.int32())])


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
    ext = next((e for e in MEDIA_EXTENSIONS if e in members), "")
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


class _ShardSource(FileBasedDatasource):
    """A shard reader whose rows carry a `sample_id` (`app.data.progress`). Given the run's data actor
    (`plan`), it is a training read: it orders its files by (run seed, epoch), skips what the epoch's
    skip plan names before anything is decoded (whole files unopened), and tells the actor the row count of
    each file it reads to the end. Each format's subclass yields its raw rows from `_rows(f, path)`."""

    def __init__(self, paths, *, uri_prefix: str, pictures: Optional[frozenset] = None,
                 file_ids: Optional[dict[str, int]] = None, plan=None, seed: Optional[int] = None, **kwargs):
        super().__init__(paths, **kwargs)
        self._uri_prefix = uri_prefix
        self._pictures = pictures
        self._file_ids = file_ids or {p: i for i, p in enumerate(sorted(paths))}
        self._plan = plan
        self._seed = seed
        self._epoch: Optional[int] = None  # a training read's epoch: seeds its samples' augmentation
        self._skips: dict[str, object] = {}

    def get_read_tasks(self, *args, **kwargs):
        self._skips = {}  # looked up afresh by each execution's read tasks (an epoch's plan)
        if self._plan is not None and self._shuffle is not None:
            epoch = ray.get(self._plan.epoch.remote())  # the same order for an epoch in every attempt of the run
            self._epoch = epoch
            self._shuffle = FileShuffleConfig(seed=hash((self._seed or 0, epoch)) % 2**32,
                                              reseed_after_execution=False)
        return super().get_read_tasks(*args, **kwargs)

    def _skip(self, path: str):
        if self._plan is None:
            return None
        if path not in self._skips:
            self._skips[path] = ray.get(self._plan.plan_for.remote(self._file_ids[path]))
        return self._skips[path]

    def _open_input_source(self, filesystem, path: str, **open_args):
        if self._skip(path) == "whole":
            return pa.BufferReader(b"")  # trained on in full this epoch: not opened
        return self._open_file(filesystem, path, **open_args)

    def _open_file(self, filesystem, path: str, **open_args):
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f: "pa.NativeFile", path: str) -> Iterator[pa.Table]:
        skip = self._skip(path)
        if skip == "whole":
            return
        dropped = set(from_ranges(skip).tolist()) if skip else set()
        file_index = self._file_ids[path]
        counted = {"rows": 0}

        def numbered() -> Iterator[dict]:
            rows = self._rows(f, path)
            if self._pictures is not None:
                rows = (r for r in rows if picture_name(r) in self._pictures)
            for ordinal, row in enumerate(rows):
                counted["rows"] = ordinal + 1
                if ordinal not in dropped:
                    row["sample_id"] = sample_id(file_index, ordinal)
                    row["epoch"] = self._epoch
                    yield row

        yield from in_blocks(numbered(), self._chunk_rows, _table)
        if self._plan is not None:
            ray.get(self._plan.file_read.remote(file_index, counted["rows"]))


class WebDatasetSource(_ShardSource):
    """Streams WebDataset tar shards as raw sample rows (bytes undecoded), CHUNK_ROWS per block."""

    def __init__(self, paths, *, caption_field: str, chunk_rows: int = CHUNK_ROWS, **kwargs):
        super().__init__(paths, **kwargs)
        self._caption_field = caption_field
        self._chunk_rows = chunk_rows

    def _rows(self, f: "pa.NativeFile", path: str) -> Iterator[dict]:
        return iter_tar_samples(f, self._uri_prefix + path, self._caption_field)


class ParquetShardSource(_ShardSource):
    """Parquet image-text shards as raw sample rows, CHUNK_ROWS per block (see `parquet_rows`)."""

    def __init__(self, paths, *, image_column: str, caption_column: str, columns: list[str], **kwargs):
        super().__init__(paths, **kwargs)
        self._image_column, self._caption_column, self._columns = image_column, caption_column, columns
        self._chunk_rows = CHUNK_ROWS

    def _open_file(self, filesystem, path: str, **open_args):
        return filesystem.open_input_file(path)  # Parquet needs random access (its footer)

    def _rows(self, f: "pa.NativeFile", path: str) -> Iterator[dict]:
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(f).iter_batches(batch_size=CHUNK_ROWS, columns=self._columns):
            yield from parquet_rows(pa.Table.from_batches([batch]), self._image_column, self._caption_column,
                                    self._uri_prefix + path)


def _image_bytes(value) -> Optional[bytes]:
    if isinstance(value, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes")
    return value if isinstance(value, (bytes, bytearray)) and value else None


def parquet_rows(batch: pa.Table, image_column: str, caption_column: str, shard: str) -> list[dict]:
    """Raw sample rows of a batch of one Parquet shard (named `shard`)."""
    n = batch.num_rows
    images = batch.column(image_column).to_pylist()
    captions = batch.column(caption_column).to_pylist()
    keys = batch.column("key").to_pylist() if "key" in batch.column_names else [None] * n
    ids = batch.column("image_id").to_pylist() if "image_id" in batch.column_names else [None] * n
    rows = []
    for key, image, caption, image_id in zip(keys, images, captions, ids):
        listed = caption if isinstance(caption, list) else [caption] if isinstance(caption, str) else []
        data = _image_bytes(image)
        rows.append({"key": str(key) if key is not None else "", "shard": shard, "image": data,
                     "captions": [c for c in listed if isinstance(c, str)],
                     "problem": None if data is not None else "no_image", "ext": "",
                     "image_id": str(image_id) if image_id is not None else None})
    return rows


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
                    s3: storage.S3Options | None = None, shuffle_files: bool = True, seed: Optional[int] = None,
                    chunk_rows: int = CHUNK_ROWS, subset: Optional[PictureSubset] = None,
                    plan=None) -> ray.data.Dataset:
    """Raw rows `{key, shard, image, captions, problem, ext, image_id, sample_id}` of every shard under `uri`
    (or, with `subset`, only the samples of its pictures, read from its shard files), in blocks of `chunk_rows`
    samples (Parquet: CHUNK_ROWS). `plan`: the run's data actor, for a training read that an epoch's progress
    can resume exactly (see `_ShardSource`); it learns the `files_digest` of the files read."""
    import pyarrow.parquet as pq

    fs, by_format = shard_files(uri, fmt, s3)
    pictures = None
    if subset is not None:
        by_format, pictures = {f: list(p) for f, p in subset.by_format}, subset.pictures
    prefix = "s3://" if storage.is_s3(uri) else ""
    shuffle = file_order(shuffle_files, seed)
    file_ids = {p: i for i, p in enumerate(sorted(p for ps in by_format.values() for p in ps))}
    common = dict(uri_prefix=prefix, pictures=pictures, file_ids=file_ids, plan=plan, seed=seed, filesystem=fs,
                  shuffle=shuffle)
    if plan is not None:
        ray.get(plan.set_files.remote(files_digest(file_ids)))
    parts = []
    # One read task per shard, streaming its samples (a read split into more blocks than files adds a SplitBlocks
    # step that holds a CPU slot of its own). A map_batches with a batch size is not fused with the read (Ray's
    # rule for reads, which may change the row count); video runs use none, so their read and decode share one
    # task (see image_text_dataset).
    for found, paths in sorted(by_format.items()):
        if found == "parquet":
            names = pq.read_schema(paths[0], filesystem=fs).names
            missing = [c for c in (image_column, caption_column) if c not in names]
            if missing:
                raise ValueError(f"{prefix}{paths[0]} has no column(s) {missing} (columns: {names}); "
                                 f"set data.image_column / data.caption_column")
            columns = [image_column, caption_column] + [c for c in ("key", "image_id") if c in names]
            source = ParquetShardSource(paths, image_column=image_column, caption_column=caption_column,
                                        columns=columns, **common)
        else:
            source = WebDatasetSource(paths, caption_field=caption_column, chunk_rows=chunk_rows, **common)
        parts.append(ray.data.read_datasource(source, override_num_blocks=len(paths)))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def image_id_number(row: dict) -> int:
    """A 63-bit number naming the sample's image: from the shard's `image_id` (jobs.make_shards writes it, one
    per file), else the sample key (every sample its own image, as the reference assumes)."""
    name = row.get("image_id") or f"{row['shard']}/{row['key']}"
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little") >> 1


