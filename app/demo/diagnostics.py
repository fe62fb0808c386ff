"""What the demo world's scenes let the evaluation say besides CIDEr (demo only): the ceiling of the caption
metrics (the grammar's own captions of the true scenes, scored like a model's) and, for generated captions,
how many of the attribute words they use are true of the picture (`app.demo.questions.attribute_accuracy`).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

from app.demo.questions import attribute_accuracy
from app.demo.shapes import caption


def split_scenes(eval_data: Optional[str], demo_root: Optional[str]) -> Optional[dict[str, dict]]:
    """The scenes of a drawn split when `eval_data` is one of the demo's shard folders (`<root>/shards/<split>`,
    with `<root>/images/<split>/scenes.json`), else None."""
    if not eval_data or not demo_root:
        return None
    from app.demo.assets import load_scenes

    shards = Path(eval_data).resolve()
    images = Path(demo_root).resolve() / "images" / shards.name
    if shards.parent != Path(demo_root).resolve() / "shards" or not (images / "scenes.json").exists():
        return None
    return load_scenes(images)


def grammar_ceiling(scenes: dict[str, dict], references: dict[str, list[str]], seed: int = 0) -> dict[str, float]:
    """Caption metrics of a fresh caption the grammar writes for each picture's true scene (a template draw
    of its own), against that picture's references: what a model that sees everything and writes like the
    grammar scores. Pictures without a scene are left out."""
    from app.evaluation.captioning import score_captions

    rng = random.Random(seed)
    ids = sorted(i for i in references if str(i) in scenes)
    results = [{"image_id": i, "caption": caption(scenes[str(i)], rng)} for i in ids]
    metrics, _ = score_captions(results, {i: references[i] for i in ids}, spice=False)
    return metrics


def caption_attributes_report(results: list[dict], scenes: dict[str, dict]) -> dict[str, dict[str, float]]:
    """`attribute_accuracy` of generated captions ([{image_id, caption}], as results.json holds them)."""
    return attribute_accuracy((r["caption"], scenes[str(r["image_id"])]) for r in results
                              if str(r["image_id"]) in scenes)
