"""The three evaluation tasks on a trained checkpoint, end to end: data -> model -> scores -> files + MLflow.

Each writes into `out_dir`: the predictions, per-item scores, `metrics.json` and (captioning, VQA) a
`samples.png` grid, logs the metrics and files to MLflow (see `app.evaluation.report`) and returns a
summary dict (also what `--summary` writes).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import ray

from app import storage
from app.evaluation import data as eval_data
from app.evaluation import report
from app.evaluation.inference import InferenceResult, InferenceSettings, run_generation
from app.evaluation.model import VQA_OPTIONS, GenerationOptions, TrainedBLIP2
from app.train.checkpoint import find_checkpoint

logger = logging.getLogger(__name__)


@dataclass
class EvalSource:
    """Where the evaluation set is (see `app.evaluation.data`)."""

    data: Optional[str] = None         # shards
    images: Optional[str] = None       # image folder (or one image)
    captions: Optional[str] = None     # captions.json for the folder
    annotations: Optional[str] = None  # COCO captions (caption task) or VQAv2 annotations (vqa task)
    questions: Optional[str] = None    # VQAv2 / GQA questions
    image_pattern: str = "COCO_val2014_{image_id:012d}.jpg"
    limit: Optional[int] = None
    image_format: str = "auto"


@dataclass
class EvalRun:
    checkpoint: str
    out_dir: str
    s3: Optional[storage.S3Options] = None
    settings: InferenceSettings = field(default_factory=InferenceSettings)
    tracking_uri: Optional[str] = None
    mlflow_run_id: Optional[str] = None
    log_mlflow: bool = True
    grid_size: int = 8
    parent_run_id: Optional[str] = None  # MLflow parent of the evaluation run (default: the training run)
    keep_rows: bool = False              # also return each image's id and references ("rows")


def _coco_id(value: str) -> Any:
    """COCO image ids are integers; other ids (file names, keys such as "000123") stay strings."""
    return int(value) if value.isdigit() and str(int(value)) == value else value


def _source_dataset(source: EvalSource, prompt: str, s3) -> ray.data.Dataset:
    if source.data:
        ds = eval_data.shard_dataset(source.data, prompt=prompt, fmt=source.image_format, s3=s3)
        return ds.limit(source.limit) if source.limit else ds
    items = eval_data.caption_items(captions=source.captions, annotations=source.annotations, images=source.images,
                                    prompt=prompt, s3=s3, limit=source.limit)
    return eval_data.items_dataset(items)


def _merge_duplicates(rows: list[dict]) -> list[dict]:
    """Samples of one photo written once per caption (`--per caption` shards) become one image with all its
    references: same pixels -> same image (same id when no thumbnails were kept). Generation ran for each
    copy; the first copy's text is kept."""
    import hashlib

    merged: dict[str, dict] = {}
    for row in rows:
        digest = hashlib.sha1(row["thumb"].tobytes()).hexdigest() if "thumb" in row else row["id"]
        refs = json.loads(row["refs"])
        if digest in merged:
            merged[digest]["references"] += [r for r in refs if r not in merged[digest]["references"]]
        else:
            merged[digest] = {**row, "references": list(refs)}
    if len(merged) < len(rows):
        logger.warning("%d samples show %d distinct images (one sample per caption?): scored per image with all "
                       "their captions; write evaluation shards with --per file to generate once per image",
                       len(rows), len(merged))
    return list(merged.values())


def _resolved_prompt(checkpoint: str, s3, prompt: Optional[str]) -> tuple[str, dict]:
    uri, manifest = find_checkpoint(checkpoint, ("llm",), s3, purpose="generating text")
    if prompt is None:
        prompt = manifest.get("prompt") or ""  # the prompt the checkpoint was trained with
    return prompt, {"uri": uri, "manifest": manifest}


def checkpoint_image_size(uri: str, s3, cfg=None) -> int:
    """The square size the checkpoint's images were resized to (data.image_size, else the vision tower's).
    `cfg`: the checkpoint's config when the caller already read it."""
    from app.models.vision import vision_config

    cfg = cfg or checkpoint_config(uri, s3)
    if cfg.data.image_size:
        return int(cfg.data.image_size)
    frozen_vision = _manifest(uri, s3).get("frozen", {}).get("vision") or cfg.model.vision
    return int(vision_config(storage.local_model(frozen_vision, s3)).image_size)


def _manifest(uri: str, s3) -> dict:
    from app.train.checkpoint import MANIFEST_FILE

    return storage.read_json(storage.join(uri, MANIFEST_FILE), s3)


def checkpoint_config(uri: str, s3):
    from app.config import load_config
    from app.train.checkpoint import CONFIG_FILE

    local = storage.local_model(uri, s3, only=(CONFIG_FILE,)) if storage.is_s3(uri) else uri
    return load_config(Path(local) / CONFIG_FILE)


def _finish(run: EvalRun, task: str, cfg, checkpoint: str, metrics: dict[str, Any], files: list[Path],
            params: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    out = Path(run.out_dir)
    metrics_file = report.write_json(out / "metrics.json", summary)
    files = [*files, metrics_file]
    if run.log_mlflow:
        uri, run_id = report.start_eval_run(cfg, task, checkpoint, tracking_uri=run.tracking_uri,
                                            run_id=run.mlflow_run_id, parent_run_id=run.parent_run_id,
                                            params=params)
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) or v is None}
        report.log_eval(uri, run_id, numeric, files, artifact_path=None if run.mlflow_run_id is None else f"eval_{task}")
        summary.update(mlflow_run_id=run_id, tracking_uri=uri)
        report.write_json(metrics_file, summary)
    return summary


def _skips(result: InferenceResult) -> dict[str, Any]:
    return {"images_skipped": result.skipped_total,
            "skipped": [{"source": e["shard"], "id": e["key"], "reason": e["reason"]} for e in result.skipped]}


# ---------------------------------------------------------------------------------------------
# captioning


def evaluate_captions(run: EvalRun, source: EvalSource, options: GenerationOptions = GenerationOptions(),
                      prompt: Optional[str] = None, spice: bool = True) -> dict[str, Any]:
    from app.evaluation.captioning import score_captions

    prompt, found = _resolved_prompt(run.checkpoint, run.s3, prompt)
    checkpoint = found["uri"]
    cfg = checkpoint_config(checkpoint, run.s3)
    result = run_generation(_source_dataset(source, prompt, run.s3), checkpoint=checkpoint,
                            image_size=checkpoint_image_size(checkpoint, run.s3, cfg),
                            num_frames=cfg.model.num_frames, options=options, settings=run.settings,
                            s3=run.s3)
    if not result.rows:
        raise eval_data.EvalDataError(f"no readable image in the evaluation set ({_skips(result)['skipped'][:3]})")
    images = _merge_duplicates(result.rows)
    out = Path(run.out_dir)
    results = [{"image_id": _coco_id(r["id"]), "caption": r["text"]} for r in images]
    files = [report.write_json(out / "results.json", results)]
    with_refs = [r for r in images if r["references"]]
    metrics: dict[str, Any] = {}
    if with_refs:
        metrics, per_image = score_captions(results, {r["id"]: r["references"] for r in with_refs}, spice=spice)
        files.append(report.write_json(out / "per_image.json", {
            r["id"]: {"caption": r["text"], "references": r["references"], **per_image.get(str(r["id"]), {})}
            for r in with_refs}))
    else:
        logger.warning("the evaluation set has no reference captions: captions are written, not scored")
    if run.grid_size and "thumb" in images[0]:
        files.append(report.sample_grid(images[: run.grid_size], out / "samples.png"))
    throughput = len(result.rows) / result.seconds if result.seconds else 0.0
    summary = {"task": "caption", "checkpoint": checkpoint, "images": len(images), "scored": len(with_refs),
               "metrics": metrics, "captions_per_s": round(throughput, 3), "prompt": prompt,
               "generation": asdict(options), **_skips(result), "files": [str(f) for f in files]}
    params = {**asdict(options), "prompt": prompt, "data": source.data or source.images, "images": len(images)}
    summary = _finish(run, "caption", cfg, checkpoint, {**metrics, "images_skipped": result.skipped_total,
                                                        "captions_per_s": throughput}, files, params, summary)
    if run.keep_rows:
        summary["rows"] = [{"id": r["id"], "references": r["references"]} for r in with_refs]
    return summary


# ---------------------------------------------------------------------------------------------
# VQA


def evaluate_vqa(run: EvalRun, source: EvalSource, template: str = "Question: {} Short answer:",
                 options: GenerationOptions = VQA_OPTIONS,
                 metric: Optional[str] = None) -> dict[str, Any]:
    from app.evaluation.vqa import detect_metric, score_vqa

    if not source.questions or not source.images:
        raise eval_data.EvalDataError("--task vqa needs --questions and --images (and --annotations for VQAv2)")
    if "{}" not in template:
        raise eval_data.EvalDataError(f"--prompt for VQA must contain '{{}}' where the question goes: {template!r}")
    _, found = _resolved_prompt(run.checkpoint, run.s3, "")
    checkpoint = found["uri"]
    cfg = checkpoint_config(checkpoint, run.s3)
    items, truth = eval_data.vqa_items(questions=source.questions, annotations=source.annotations,
                                       images=source.images, template=template, image_pattern=source.image_pattern,
                                       s3=run.s3, limit=source.limit)
    result = run_generation(eval_data.items_dataset(items), checkpoint=checkpoint,
                            image_size=checkpoint_image_size(checkpoint, run.s3, cfg),
                            num_frames=cfg.model.num_frames, options=options, settings=run.settings,
                            s3=run.s3)
    predictions = {r["id"]: r["text"] for r in result.rows}
    metric = detect_metric(truth, metric)
    metrics, per_question = score_vqa(predictions, truth, metric)
    out = Path(run.out_dir)
    files = [report.write_json(out / "results.json", [{"question_id": _coco_id(q), "answer": a}
                                                      for q, a in sorted(predictions.items())]),
             report.write_json(out / "per_question.json", {
                 q: {"question": truth[q]["question"], "prediction": predictions[q], "answers": truth[q]["answers"],
                     "accuracy": acc} for q, acc in per_question.items()})]
    if run.grid_size and result.rows and "thumb" in result.rows[0]:
        shown = [{**r, "text": f"{truth[r['id']]['question']} -> {r['text']}",
                  "refs": json.dumps([", ".join(truth[r["id"]]["answers"][:5])])} for r in result.rows[: run.grid_size]]
        files.append(report.sample_grid(shown, out / "samples.png"))
    summary = {"task": "vqa", "checkpoint": checkpoint, "metric": metric, "metrics": metrics, "template": template,
               "generation": asdict(options), **_skips(result), "files": [str(f) for f in files]}
    params = {**asdict(options), "template": template, "questions": source.questions, "metric": metric}
    return _finish(run, "vqa", cfg, checkpoint, {**metrics, "images_skipped": result.skipped_total}, files, params,
                   summary)


# ---------------------------------------------------------------------------------------------
# retrieval


class ImageFeatures:
    """Ray Data callable class: image tokens and ITC query features for each image."""

    def __init__(self, checkpoint: str, s3, use_gpu: bool):
        import torch

        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.model = TrainedBLIP2.from_checkpoint(checkpoint, s3, need_llm=False, device=device)

    def __call__(self, batch):
        import numpy as np
        import torch

        embeds, feats = self.model.image_features(torch.from_numpy(np.ascontiguousarray(batch["pixels"])))
        return {"id": batch["id"], "refs": batch["refs"], "embeds": embeds.half().cpu().numpy(),
                "feats": feats.float().cpu().numpy()}


def evaluate_retrieval_task(run: EvalRun, source: EvalSource, k: int = 128, max_captions: int = 5) -> dict[str, Any]:
    import numpy as np
    import torch

    from app.data.stats import create_counter, read_counts, read_examples
    from app.evaluation.retrieval import evaluate_retrieval

    checkpoint, _ = find_checkpoint(run.checkpoint, ("qformer", "llm"), run.s3, purpose="retrieval")
    cfg = checkpoint_config(checkpoint, run.s3)
    counter = create_counter()
    pixels = eval_data.eval_dataset(_source_dataset(source, "", run.s3), image_size=checkpoint_image_size(checkpoint, run.s3, cfg),
                                    num_frames=cfg.model.num_frames, counter=counter, s3=run.s3)
    rows = pixels.map_batches(ImageFeatures, batch_size=run.settings.batch_size, batch_format="numpy",
                              compute=ray.data.ActorPoolStrategy(size=run.settings.num_actors),
                              fn_constructor_kwargs=dict(checkpoint=checkpoint, s3=run.s3, use_gpu=run.settings.use_gpu),
                              num_gpus=1 if run.settings.use_gpu else 0).take_all()
    rows = sorted(rows, key=lambda r: r["id"])
    rows = [{**r, "refs": json.loads(r["refs"])[:max_captions]} for r in rows]
    rows = [r for r in rows if r["refs"]]
    if len(rows) < 2:
        raise eval_data.EvalDataError("retrieval needs at least 2 images with captions")
    model = TrainedBLIP2.from_checkpoint(checkpoint, run.s3, need_llm=False,
                                         device="cuda" if run.settings.use_gpu and torch.cuda.is_available() else "cpu")
    texts = [c for r in rows for c in r["refs"]]
    owner = [i for i, r in enumerate(rows) for _ in r["refs"]]
    embeds = torch.from_numpy(np.stack([r["embeds"] for r in rows])).to(model.device, torch.float32)
    feats = torch.from_numpy(np.stack([r["feats"] for r in rows]))
    logger.info("retrieval over %d images and %d captions (ITM re-ranking of the top %d)", len(rows), len(texts), k)
    metrics, itc_only = evaluate_retrieval(model, embeds, feats, texts, owner, k=k)
    counts = read_counts(counter)
    skipped = sum(v for key, v in counts.items() if key.startswith("skipped_"))
    summary = {"task": "retrieval", "checkpoint": checkpoint, "images": len(rows), "texts": len(texts), "k": k,
               "metrics": metrics, "itc_only": itc_only, "images_skipped": skipped,
               "skipped": [{"source": e["shard"], "id": e["key"], "reason": e["reason"]} for e in read_examples(counter)]}
    logged = {**metrics, **{f"itc_{name}": v for name, v in itc_only.items()}, "images_skipped": skipped}
    return _finish(run, "retrieval", cfg, checkpoint, logged, [], {"k": k, "images": len(rows), "texts": len(texts)},
                   summary)
