"""Evaluation outputs: a picture of sample predictions, files on disk, and the MLflow run they go to.

MLflow: by default a child run ("eval-<task>") under the training run that wrote the checkpoint (found
by the Ray run name and storage path the checkpoint's config records) or under a given parent (the
pipeline's run), in the same experiment; with
`--mlflow-run-id` the metrics go to that run instead; with no training run found, a standalone run.
"""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from app import tracking

logger = logging.getLogger(__name__)


def sample_grid(rows: Sequence[dict[str, Any]], path: str | Path, columns: int = 4, cell: int = 192,
                text_lines: int = 6) -> Path:
    """PNG grid: each cell an image with its generated text ("gen") and first reference ("ref")."""
    from PIL import Image, ImageDraw, ImageFont

    rows = list(rows)
    if not rows:
        raise ValueError("no rows to draw")
    font = ImageFont.load_default()
    line_h, width_chars = 12, max(20, cell // 6)
    cols = min(columns, len(rows))
    grid_rows = (len(rows) + cols - 1) // cols
    text_h = line_h * text_lines + 6
    canvas = Image.new("RGB", (cols * (cell + 8) + 8, grid_rows * (cell + text_h + 8) + 8), "white")
    draw = ImageDraw.Draw(canvas)
    for i, row in enumerate(rows):
        x, y = 8 + (i % cols) * (cell + 8), 8 + (i // cols) * (cell + text_h + 8)
        thumb = Image.fromarray(np.asarray(row["thumb"], dtype=np.uint8)).resize((cell, cell), Image.BICUBIC)
        canvas.paste(thumb, (x, y))
        refs = json.loads(row["refs"]) if isinstance(row.get("refs"), str) else list(row.get("refs") or [])
        gen = textwrap.wrap(f"gen: {row['text']}", width_chars)[: text_lines // 2]
        ref = textwrap.wrap(f"ref: {refs[0]}", width_chars)[: text_lines - len(gen)] if refs else []
        for j, (line, colour) in enumerate([(g, (0, 0, 160)) for g in gen] + [(r, (0, 0, 0)) for r in ref]):
            draw.text((x, y + cell + 3 + j * line_h), line, fill=colour, font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path


def write_json(path: str | Path, payload: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


def start_eval_run(cfg, task: str, checkpoint: str, *, tracking_uri: Optional[str] = None,
                   run_id: Optional[str] = None, parent_run_id: Optional[str] = None,
                   params: Optional[dict[str, Any]] = None) -> tuple[str, str]:
    """(tracking URI, run id) of the run the evaluation logs to (see the module docstring)."""
    from mlflow.entities import Param, RunTag

    uri = tracking.resolve_tracking_uri(tracking_uri or cfg.mlflow.tracking_uri)
    client = tracking.client(uri)
    if run_id is None:
        parent = parent_run_id or tracking.find_run(uri, cfg.mlflow.experiment, cfg.run.name, cfg.run.storage_path)
        tags = {"task": task, "checkpoint": checkpoint, "stage": "evaluate", tracking.RUN_NAME_TAG: cfg.run.name}
        if not parent:
            logger.info("no MLflow run of '%s' found at %s: the evaluation gets a run of its own", cfg.run.name, uri)
        run_id = tracking.create_run(uri, cfg.mlflow.experiment, f"eval-{task}-{cfg.run.name}", tags, parent)
    if params:
        prefix = f"eval_{task}."
        client.log_batch(run_id, params=[Param(prefix + k, str(v)[:500]) for k, v in sorted(params.items())])
    client.log_batch(run_id, tags=[RunTag(f"eval_{task}.checkpoint", checkpoint)])
    return uri, run_id


def log_eval(uri: str, run_id: str, metrics: dict[str, Optional[float]], files: Sequence[Path], step: int = 0,
             artifact_path: Optional[str] = None, finish: bool = True) -> None:
    """Numeric metrics (None values, e.g. an unavailable SPICE, are left out) and artifact files."""
    tracking.log_metrics(uri, run_id, {k: v for k, v in metrics.items() if v is not None}, step)
    client = tracking.client(uri)
    for path in files:
        client.log_artifact(run_id, str(path), artifact_path=artifact_path)
    if finish:
        run = client.get_run(run_id)
        if run.info.status == "RUNNING" and run.data.tags.get("stage") == "evaluate":
            tracking.end_run(uri, run_id)
