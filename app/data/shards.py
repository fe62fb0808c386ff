"""Write WebDataset shards from a folder of media files and their captions, with Ray Data.

Inputs: a folder + `captions.json` (`{file: [captions]}`; a value may also be one string, or an object
with a `captions` list and optionally the `file` it describes, relative to the folder, as MSR-VTT's
`{"video0": {"file": "videos/video0.mp4", "captions": [...]}}`: the key is then the entry's name), or a COCO caption annotation file (`images` + `annotations`) + its image
folder. Output: `shard-00000.tar`, ... at a local folder or s3:// prefix, keys sorted, each sample
`<key>.<original extension>` (bytes copied as they are) + `<key>.txt` (one sample per caption) or
`<key>.json` with the `captions` list (one sample per file), and `_index.json` (shards, counts).
One Ray task writes each shard; a listed file that is missing or unreadable is skipped and counted.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from app import storage

INDEX_FILE = "_index.json"


@dataclass
class Sample:
    key: str
    file: str
    captions: list[str] = field(default_factory=list)


def _key(stem: str) -> str:
    """WebDataset keys end at the first dot of a member name: keep letters, digits, '_' and '-'."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem)


def _caption_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = value.get("captions", value.get("caption"))
        return _caption_list(value) if value is not None else []
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def load_captions_json(path: str | os.PathLike) -> dict[str, list[str]]:
    """{file: [captions]}. An entry may name its file: `{"video0": {"file": "videos/video0.mp4",
    "captions": [...]}}` (MSR-VTT style); its key is then the entry's name (see `listed_keys`)."""
    data = _read_listing(path)
    return {_listed_file(name, value): _caption_list(value) for name, value in data.items()}


def listed_keys(path: str | os.PathLike) -> dict[str, str]:
    """{file: key} for the entries of a captions.json that name their file (the entry name is the key)."""
    data = _read_listing(path)
    return {value["file"]: _key(name) for name, value in data.items()
            if isinstance(value, dict) and isinstance(value.get("file"), str)}


def _read_listing(path: str | os.PathLike) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read captions file {path}: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping {{file: [captions]}}, got {type(data).__name__}")
    return data


def _listed_file(name: str, value: Any) -> str:
    return value["file"] if isinstance(value, dict) and isinstance(value.get("file"), str) else str(name)


def load_coco_annotations(path: str | os.PathLike) -> dict[str, list[str]]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        files = {img["id"]: img["file_name"] for img in data["images"]}
        out: dict[str, list[str]] = {name: [] for name in files.values()}
        for ann in data["annotations"]:
            if ann["image_id"] in files and isinstance(ann.get("caption"), str):
                out[files[ann["image_id"]]].append(ann["caption"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a COCO caption annotation file (images + annotations): {err}") from None
    return out


def plan_samples(captions: dict[str, list[str]], per: str = "caption",
                 keys: Optional[dict[str, str]] = None) -> tuple[list[Sample], int]:
    """Samples sorted by key, and the number of files without any caption (left out). `keys`: {file: key}
    where the listing gives one (else the key is the file's path without its extension)."""
    if per not in ("caption", "file"):
        raise ValueError(f"per must be 'caption' or 'file', not {per!r}")
    samples, uncaptioned = [], 0
    for name in sorted(captions):
        texts = [t for t in captions[name] if t.strip()]
        if not texts:
            uncaptioned += 1
            continue
        stem = (keys or {}).get(name) or _key(Path(name).with_suffix("").as_posix())
        if per == "file":
            samples.append(Sample(stem, name, texts))
        else:
            width = len(str(len(texts) - 1))
            samples.extend(Sample(f"{stem}_{j:0{width}d}", name, [t]) for j, t in enumerate(texts))
    samples.sort(key=lambda s: s.key)
    return samples, uncaptioned


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(mtime)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shard(row: dict[str, Any], *, media_dir: str, out: str, s3: Optional[storage.S3Options]) -> dict[str, Any]:
    """Ray Data `map` function: one shard from its planned samples. Returns counts for the index."""
    fs, out_path = storage.resolve(out, s3)
    name = f"shard-{row['index']:05d}.tar"
    buffer = io.BytesIO()
    written, missing = 0, []
    now = time.time()
    cache: dict[str, Optional[bytes]] = {}
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for sample in row["samples"]:
            if sample["file"] not in cache:
                try:
                    cache = {sample["file"]: (Path(media_dir) / sample["file"]).read_bytes()}
                except OSError:
                    cache = {sample["file"]: None}
            data = cache[sample["file"]]
            if not data:
                missing.append(sample["file"])
                continue
            ext = Path(sample["file"]).suffix.lower().lstrip(".") or "bin"
            _add(tar, f"{sample['key']}.{ext}", data, now)
            if len(sample["captions"]) == 1:
                _add(tar, f"{sample['key']}.txt", sample["captions"][0].encode("utf-8"), now)
            meta = {"key": sample["key"], "file": sample["file"], "image_id": sample["file"], "captions": sample["captions"]}
            _add(tar, f"{sample['key']}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"), now)
            written += 1
    if written:
        with fs.open_output_stream(f"{out_path}/{name}") as f:
            f.write(buffer.getvalue())
    return {"shard": name if written else "", "samples": written, "bytes": buffer.tell() if written else 0,
            "missing": sorted(set(missing))}


def make_shards(media_dir: str, captions: dict[str, list[str]], out: str, *, shard_size: int = 1000,
                per: str = "caption", s3: Optional[storage.S3Options] = None,
                keys: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """Plan, write in parallel with Ray Data, and index the shards. Returns the index."""
    import ray.data

    if shard_size <= 0:
        raise ValueError(f"shard size must be positive, got {shard_size}")
    if not Path(media_dir).is_dir():
        raise FileNotFoundError(f"no such folder: {media_dir}")
    samples, uncaptioned = plan_samples(captions, per, keys)
    if not samples:
        raise ValueError(f"no captioned files to write ({len(captions)} listed, {uncaptioned} without captions)")
    plans = [{"index": i, "samples": [s.__dict__ for s in samples[start:start + shard_size]]}
             for i, start in enumerate(range(0, len(samples), shard_size))]
    fs, out_path = storage.resolve(out, s3)
    fs.create_dir(out_path, recursive=True)
    results = (ray.data.from_items(plans, override_num_blocks=len(plans))
               .map(write_shard, fn_kwargs=dict(media_dir=str(Path(media_dir).resolve()), out=out, s3=s3))
               .take_all())
    results.sort(key=lambda r: r["shard"])
    missing = sorted({m for r in results for m in r["missing"]})
    index = {
        "shards": [r["shard"] for r in results if r["shard"]],
        "samples": sum(r["samples"] for r in results),
        "files": len({s.file for s in samples}) - len(missing),
        "per": per,
        "bytes": sum(r["bytes"] for r in results),
        "skipped_missing_files": len(missing),
        "skipped_uncaptioned_files": uncaptioned,
        "missing_examples": missing[:10],
    }
    with fs.open_output_stream(f"{out_path}/{INDEX_FILE}") as f:
        f.write(json.dumps(index, indent=2).encode("utf-8"))
    return index


def shards_from_listing(*, images: Optional[str], captions: Optional[str], coco_annotations: Optional[str], out: str,
                        shard_size: int, per: str, s3: Optional[storage.S3Options]) -> dict[str, Any]:
    """jobs.make_shards: shards from a captions.json ({file: [captions]}, media beside it unless `images`) or a
    COCO annotation file (with `images`), on this Ray cluster or a local instance; returns the shard index."""
    import ray

    if coco_annotations and not images:
        raise ValueError("--coco-annotations needs --images (the folder of the images it names)")
    media = images or os.path.dirname(os.path.abspath(captions))
    listing = load_captions_json(captions) if captions else load_coco_annotations(coco_annotations)
    keys = listed_keys(captions) if captions else None
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init()
        else:  # extra logical CPUs: on a 2-core machine Ray Data would otherwise get no budget
            ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False)
    return make_shards(media, listing, out, shard_size=shard_size, per=per, s3=s3, keys=keys)
