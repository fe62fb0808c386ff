"""Prepare the embedded default's assets once: a generated text corpus, tiny models trained on it, drawn
images with captions written as WebDataset shards (through the same writer as real data), and a tiny
frozen vision tower. A second call with the same settings reuses everything."""

from __future__ import annotations

import json
from pathlib import Path

from app.demo.shapes import corpus, image_text_pairs
from app.models.tiny import build_tiny_vision, prepare_tiny_models

DEFAULT_ROOT = Path(".demo")
IMAGE_SIZE = 96  # drawn size; the vision tower sees DEMO_VISION_SIZE after the transforms
DEMO_VISION_SIZE = 64
READY = "READY.json"


def _write_images(folder: Path, pairs) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    captions = {}
    for i, (image, texts) in enumerate(pairs):
        name = f"{i:06d}.png"
        image.save(folder / name)
        captions[name] = texts
    path = folder / "captions.json"
    path.write_text(json.dumps(captions, indent=0))
    return path


def prepare_image_assets(root: Path, num_train: int, num_val: int, seed: int) -> dict[str, str]:
    """`<root>/images/{train,val}` (PNG + captions.json), `<root>/shards/{train,val}`, `<root>/models/vision`."""
    settings = {"num_train": num_train, "num_val": num_val, "seed": seed, "size": IMAGE_SIZE,
                "vision": DEMO_VISION_SIZE, "version": 1}
    paths = {"train": str(root / "shards" / "train"), "val": str(root / "shards" / "val"),
             "vision": str(root / "models" / "vision")}
    ready = root / "shards" / READY
    if ready.exists() and json.loads(ready.read_text()) == settings:
        return paths
    import ray

    from app.data.shards import load_captions_json, make_shards

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        for split, count, split_seed in (("train", num_train, seed), ("val", num_val, seed + 1)):
            listing = _write_images(root / "images" / split, image_text_pairs(count, seed=split_seed))
            make_shards(str(listing.parent), load_captions_json(listing), paths[split], shard_size=500,
                        per="caption" if split == "train" else "file")
    finally:
        if started:
            ray.shutdown()
    build_tiny_vision(paths["vision"], kind="blip2", image_size=DEMO_VISION_SIZE, patch_size=16, hidden=64, seed=seed)
    ready.write_text(json.dumps(settings))
    return paths


def prepare_demo_assets(root: str | Path = DEFAULT_ROOT, num_lines: int = 50_000, num_train_images: int = 2000,
                        num_val_images: int = 200, seed: int = 0) -> dict[str, str]:
    """`<root>/text/corpus.txt`, `<root>/models/{bert,opt,t5,vision}` and `<root>/shards/{train,val}`."""
    root = Path(root)
    text_path = root / "text" / "corpus.txt"
    lines = corpus(num_lines, seed)
    content = "\n".join(lines) + "\n"
    if not text_path.exists() or text_path.read_text() != content:
        text_path.parent.mkdir(parents=True, exist_ok=True)
        text_path.write_text(content)
    models = prepare_tiny_models(root / "models", lines, seed=seed, bert_vocab=500, llm_vocab=500)
    images = prepare_image_assets(root, num_train_images, num_val_images, seed)
    return {"text": str(text_path), **models, **images}
