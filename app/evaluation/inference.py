"""Batch inference with Ray Data: CPU tasks decode and resize, an actor pool holds the model.

    eval rows --map_batches(preprocess, CPU tasks)--> pixels --map_batches(Generate, actor pool)--> texts

Each actor loads the checkpoint once (on a GPU when `use_gpu`), then generates for batch after batch;
the decode stage keeps running in parallel, so the model never waits for JPEG decoding.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np
import ray
import torch

from app import storage
from app.data.stats import create_counter, read_counts, read_examples
from app.evaluation.data import eval_dataset
from app.evaluation.model import GenerationOptions, TrainedBLIP2

logger = logging.getLogger(__name__)

PASSTHROUGH = ("id", "source", "refs", "prompt")
MAX_CPU_ACTORS = 4


class Generate:
    """Ray Data callable class: one model per actor, `text` added to each batch (pixels dropped)."""

    def __init__(self, checkpoint: str, s3: Optional[storage.S3Options], options: dict[str, Any], use_gpu: bool,
                 keep_thumbs: bool = False):
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.model = TrainedBLIP2.from_checkpoint(checkpoint, s3, device=device)
        self.options = GenerationOptions(**options)
        self.keep_thumbs = keep_thumbs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"]))
        texts = self.model.generate(pixels, [str(p) for p in batch["prompt"]], self.options)
        out = {k: batch[k] for k in PASSTHROUGH}
        out["text"] = np.array(texts, dtype=object)
        if self.keep_thumbs:
            out["thumb"] = batch["thumb"]
        return out


@dataclass
class InferenceResult:
    rows: list[dict[str, Any]]
    counts: dict[str, int] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def skipped_total(self) -> int:
        return sum(v for k, v in self.counts.items() if k.startswith("skipped_"))


@dataclass(frozen=True)
class InferenceSettings:
    batch_size: int = 16
    num_actors: int = 1
    use_gpu: bool = False
    keep_thumbs: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def run_generation(source: ray.data.Dataset, *, checkpoint: str, image_size: int, options: GenerationOptions,
                   settings: InferenceSettings = InferenceSettings(),
                   s3: Optional[storage.S3Options] = None, num_frames: Optional[int] = None) -> InferenceResult:
    """Generate a text for every readable image (or clip, with `num_frames`) of `source` (eval rows from
    `app.evaluation.data`)."""
    counter = create_counter()
    start = time.perf_counter()
    pixels = eval_dataset(source, image_size=image_size, counter=counter, s3=s3, num_frames=num_frames)
    generated = pixels.map_batches(
        Generate, batch_size=settings.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=settings.num_actors),
        fn_constructor_kwargs=dict(checkpoint=checkpoint, s3=s3, options=asdict(options), use_gpu=settings.use_gpu,
                                   keep_thumbs=settings.keep_thumbs),
        num_gpus=1 if settings.use_gpu else 0, num_cpus=0 if settings.use_gpu else 1)
    rows = sorted(generated.take_all(), key=lambda r: r["id"])
    result = InferenceResult(rows=rows, counts=read_counts(counter), skipped=read_examples(counter),
                             seconds=time.perf_counter() - start)
    if result.skipped_total:
        logger.warning("skipped %d unreadable image(s): %s", result.skipped_total,
                       "; ".join(f"{e['shard']} ({e['reason']})" for e in result.skipped[:5]))
    return result


def default_settings(batch_size: int = 16, num_actors: Optional[int] = None,
                     use_gpu: Optional[bool] = None) -> InferenceSettings:
    """One actor per GPU when the cluster has GPUs, else one per four CPUs (decoding needs the rest), at
    most MAX_CPU_ACTORS: each CPU actor holds a full model copy in memory."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    use_gpu = gpus > 0 if use_gpu is None else use_gpu
    if num_actors is None:
        num_actors = max(1, gpus) if use_gpu else min(MAX_CPU_ACTORS, max(1, int(resources.get("CPU", 4)) // 4))
    return InferenceSettings(batch_size=batch_size, num_actors=num_actors, use_gpu=use_gpu)
