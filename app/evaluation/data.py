"""Evaluation sets as Ray Data: eval-transformed pixels with their ids, references and prompts.

Sources (local paths or s3:// URIs):
  shards              WebDataset / Parquet shards as used for training; the id is the sample key and the
                      references are the sample's captions (write eval shards with `make_shards --per file`
                      so each photo carries all its references)
  folder + captions   a folder of images and `captions.json` ({file: [captions]}); the id is the file name
  COCO annotations    a COCO caption annotation file + its image folder; the id is the COCO image id
  images only         a folder, one image file, or a list of files (captioning without references)
  VQA                 VQAv2 questions + annotations JSON + image folder, or GQA-style questions JSON

Every row keeps: `id`, `source` (file or shard), `refs` (JSON list of reference texts), `prompt`, and after
preprocessing `pixels` (S, S, 3) uint8 and a small `thumb`. Unreadable images are skipped and counted
(with file and reason) through `app.data.stats`, never raised.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import pyarrow as pa
import ray
from PIL import Image

from app import storage
from app.errors import UserError
from app.data.media import MEDIA_EXTENSIONS, MediaSpec, SkipSample, decode_sample
from app.data.sources import read_image_text
from app.data.transforms import transform_image
from app.data.stats import report_counts

logger = logging.getLogger(__name__)

THUMB_SIZE = 96
ITEM_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("path", pa.string()),
                         ("image", pa.binary()), ("refs", pa.string()), ("prompt", pa.string()),
                         ("problem", pa.string()), ("ext", pa.string())])


class EvalDataError(UserError, ValueError):
    """An evaluation set that cannot be read (missing files, wrong format, nothing in it)."""


def eval_item(id_: Any, path: str, refs: Iterable[str] = (), prompt: str = "", source: Optional[str] = None) -> dict:
    ext = path.rsplit("/", 1)[-1].rpartition(".")[2].lower() if "." in path.rsplit("/", 1)[-1] else ""
    return {"id": str(id_), "source": source or path, "path": path, "image": None,
            "refs": json.dumps([r for r in refs if isinstance(r, str)]), "prompt": prompt, "problem": None, "ext": ext}


def _read_json(path: str, what: str, s3: Optional[storage.S3Options]) -> Any:
    try:
        return storage.read_json(path, s3)
    except FileNotFoundError:
        raise EvalDataError(f"{what}: no such file: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EvalDataError(f"{what}: cannot read {path}: {err}") from None


def _image_files(uri: str, s3: Optional[storage.S3Options]) -> list[str]:
    try:
        _, files = storage.list_files(uri, s3)
    except (FileNotFoundError, OSError) as err:
        raise EvalDataError(f"no images at {uri}: {err}") from None
    prefix = "s3://" if storage.is_s3(uri) else ""
    found = sorted(prefix + f for f in files if f.lower().rsplit(".", 1)[-1] in MEDIA_EXTENSIONS)
    if not found:
        raise EvalDataError(f"no image or video files ({', '.join(MEDIA_EXTENSIONS)}) at {uri}")
    return found


def _check_folder(images: str, s3: Optional[storage.S3Options]) -> None:
    if storage.is_s3(images):
        return  # listed lazily; a missing object is counted as missing_file
    if not Path(images).is_dir():
        raise EvalDataError(f"--images: no such folder: {images}")


def caption_items(*, captions: Optional[str] = None, annotations: Optional[str] = None, images: Optional[str] = None,
                  prompt: str = "", s3: Optional[storage.S3Options] = None, limit: Optional[int] = None) -> list[dict]:
    """Items (no image bytes yet) for a folder + captions.json, COCO annotations + folder, or images alone."""
    items: list[dict] = []
    if annotations:
        if not images:
            raise EvalDataError("--annotations needs --images (the folder the annotation file names images in)")
        _check_folder(images, s3)
        data = _read_json(annotations, "--annotations", s3)
        try:
            refs: dict[Any, list[str]] = {img["id"]: [] for img in data["images"]}
            for ann in data["annotations"]:
                if ann["image_id"] in refs and isinstance(ann.get("caption"), str):
                    refs[ann["image_id"]].append(ann["caption"])
            items = [eval_item(img["id"], storage.join(images, img["file_name"]), refs[img["id"]], prompt)
                     for img in sorted(data["images"], key=lambda i: str(i["id"]))]
        except (KeyError, TypeError) as err:
            raise EvalDataError(f"{annotations} is not a COCO caption annotation file (images + annotations): "
                                f"missing {err}") from None
    elif captions:
        if not images:
            raise EvalDataError("--captions needs --images (the folder holding the files it lists)")
        _check_folder(images, s3)
        data = _read_json(captions, "--captions", s3)
        if not isinstance(data, dict):
            raise EvalDataError(f"{captions}: expected a mapping {{file: [captions]}}, got {type(data).__name__}")
        for name in sorted(data):
            value = data[name]
            if isinstance(value, dict):
                value = value.get("captions", value.get("caption", []))
            items.append(eval_item(name, storage.join(images, name), value if isinstance(value, list) else [value], prompt))
    elif images:
        is_file = storage.is_s3(images) and images.lower().rsplit(".", 1)[-1] in MEDIA_EXTENSIONS
        if not storage.is_s3(images) and not Path(images).exists():
            raise EvalDataError(f"no such image or folder: {images}")
        files = [images] if is_file or Path(images).is_file() else _image_files(images, s3)
        items = [eval_item(Path(f).name if len(files) > 1 else f, f, (), prompt) for f in files]
    else:
        raise EvalDataError("nothing to evaluate: give --data (shards), --captions or --annotations with --images, "
                            "or --images alone")
    if not items:
        raise EvalDataError("the evaluation set is empty")
    return items[:limit] if limit else items


def vqa_items(*, questions: str, annotations: Optional[str], images: str, template: str,
              image_pattern: str = "COCO_val2014_{image_id:012d}.jpg", s3: Optional[storage.S3Options] = None,
              limit: Optional[int] = None) -> tuple[list[dict], dict[str, dict]]:
    """(items, ground truth by question id) for VQAv2 (questions + annotations JSON) or GQA (one JSON of
    {question_id: {imageId, question, answer}}). Items' refs hold the question; prompts use `template`."""
    _check_folder(images, s3)
    data = _read_json(questions, "--questions", s3)
    items: list[dict] = []
    truth: dict[str, dict] = {}
    if isinstance(data, dict) and "questions" in data:  # VQAv2
        if not annotations:
            raise EvalDataError("VQAv2 questions need --annotations (the matching annotation file with answers)")
        ann = _read_json(annotations, "--annotations", s3)
        try:
            by_qid = {str(a["question_id"]): a for a in ann["annotations"]}
            for q in data["questions"]:
                qid = str(q["question_id"])
                if qid not in by_qid:
                    continue
                a = by_qid[qid]
                truth[qid] = {"answers": [x["answer"] for x in a["answers"]], "answer_type": a.get("answer_type", ""),
                              "question": q["question"]}
                image_id = q["image_id"]
                image_id = int(image_id) if str(image_id).isdigit() else image_id
                name = image_pattern.format(image_id=image_id)
                items.append(eval_item(qid, storage.join(images, name), [q["question"]], template.format(q["question"])))
        except (KeyError, TypeError, ValueError) as err:
            raise EvalDataError(f"{questions} / {annotations}: not the VQAv2 layout (missing {err})") from None
    elif isinstance(data, dict):  # GQA: {qid: {"imageId", "question", "answer"}}
        try:
            for qid, q in sorted(data.items()):
                truth[str(qid)] = {"answers": [q["answer"]], "answer_type": q.get("types", {}).get("structural", "")
                                   if isinstance(q.get("types"), dict) else "", "question": q["question"]}
                items.append(eval_item(qid, storage.join(images, f"{q['imageId']}.jpg"), [q["question"]],
                                   template.format(q["question"])))
        except (KeyError, TypeError, AttributeError) as err:
            raise EvalDataError(f"{questions}: not the GQA layout {{question_id: {{imageId, question, answer}}}} "
                                f"(missing {err})") from None
    else:
        raise EvalDataError(f"{questions}: neither VQAv2 ({{'questions': [...]}}) nor GQA ({{qid: {{...}}}}) layout")
    if not items:
        raise EvalDataError(f"{questions}: no question has an answer in the annotations")
    if limit:
        items = items[:limit]
        truth = {i["id"]: truth[i["id"]] for i in items}
    return items, truth


# ---------------------------------------------------------------------------------------------
# Ray Data


def items_dataset(items: list[dict], parallelism: int = 8) -> ray.data.Dataset:
    table = pa.Table.from_pylist(items, schema=ITEM_SCHEMA)
    return ray.data.from_arrow(table).repartition(max(1, min(parallelism, len(items))))


def shard_dataset(uri: str, *, prompt: str = "", fmt: str = "auto", image_column: str = "image",
                  caption_column: str = "caption", s3: Optional[storage.S3Options] = None) -> ray.data.Dataset:
    """Training-format shards as evaluation rows (the id is the sample key)."""
    try:
        raw = read_image_text(uri, fmt=fmt, image_column=image_column, caption_column=caption_column, s3=s3,
                              shuffle_files=False)
    except (FileNotFoundError, ValueError, OSError) as err:
        raise EvalDataError(f"--data: {err}") from None

    def to_items(batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        return pa.Table.from_pylist([{"id": r["key"], "source": r["shard"], "path": None, "image": r["image"],
                                      "refs": json.dumps(r["captions"] or []), "prompt": prompt,
                                      "problem": r["problem"], "ext": r["ext"]} for r in rows], schema=ITEM_SCHEMA)

    return raw.map_batches(to_items, batch_format="pyarrow")


def preprocess_eval_batch(batch: pa.Table, *, image_size: int, counter=None,
                          s3: Optional[storage.S3Options] = None, num_frames: Optional[int] = None) -> dict[str, np.ndarray]:
    """Read (when only a path is known), decode and resize; unreadable images are counted and dropped.
    With `num_frames` (a video model): clips give `num_frames` frames from the segment centres, images
    are one-frame clips; `pixels` is then (T, S, S, 3) per row and the thumbnail is the middle frame."""
    rows = batch.to_pylist()
    counts: Counter = Counter(rows_read=len(rows))
    examples: list[dict[str, str]] = []
    kept: list[dict] = []
    pixels, thumbs = [], []
    media = MediaSpec(size=image_size, num_frames=num_frames or None)
    for row in rows:
        data, problem = row["image"], row["problem"]
        if data is None and problem is None and row["path"]:
            try:
                fs, path = storage.resolve(row["path"], s3)
                with fs.open_input_stream(path) as f:
                    data = f.read()
            except (FileNotFoundError, OSError) as err:
                problem = "missing_file" if isinstance(err, FileNotFoundError) or "not found" in str(err).lower() \
                    else f"unreadable_file ({err})"
        if problem is None and not data:
            problem = "no_image"
        if problem is None:
            try:
                array, converted = decode_sample(data, row.get("ext") or "", media)
            except SkipSample as err:
                problem = f"{err.reason}{err.detail}"
        if problem is not None:
            reason = problem.split(" ", 1)[0]
            counts[f"skipped_{reason}"] += 1
            examples.append({"shard": row["source"], "key": row["id"], "reason": problem})
            logger.warning("skipped %s (id %s): %s", row["source"], row["id"], problem)
            continue
        if converted is not None:
            counts[f"converted_{converted.lower().replace(';', '_')}"] += 1
        pixels.append(array)
        middle = array[num_frames // 2] if num_frames else array  # a clip's thumbnail is its middle frame
        thumbs.append(transform_image(Image.fromarray(middle), THUMB_SIZE, train=False))
        kept.append(row)
    counts["rows_kept"] = len(kept)
    report_counts(counter, counts, examples)
    if not kept:
        return {}
    return {"pixels": np.stack(pixels), "thumb": np.stack(thumbs),
            **{k: np.array([r[k] for r in kept], dtype=object) for k in ("id", "source", "refs", "prompt")}}


def eval_dataset(source: ray.data.Dataset, *, image_size: int, counter=None,
                 s3: Optional[storage.S3Options] = None, num_frames: Optional[int] = None) -> ray.data.Dataset:
    # Fractional CPUs keep this CPU stage from fusing into the model's actor pool: decoding then runs in
    # parallel tasks while the actors generate.
    return source.map_batches(preprocess_eval_batch, batch_size=32, batch_format="pyarrow", num_cpus=0.5,
                              fn_kwargs=dict(image_size=image_size, counter=counter, s3=s3, num_frames=num_frames))
