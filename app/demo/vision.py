"""The demo's frozen image encoder: a tiny BLIP-2-style ViT pre-trained on drawn scenes (demo only).

BLIP-2 freezes an image encoder that was pre-trained elsewhere (EVA-CLIP). The demo does the same at toy
scale: before the pipeline runs, a tiny ViT learns to name what its grammar draws (colour, shape, size and
position of each object, the background) from scenes that are not in the demo's image-text pairs, with
linear heads on its mean-pooled output tokens; the heads are then thrown away and the tower is saved as
an ordinary HF folder. A random tower keeps colours but little else, and the Q-Former then needs far more
steps than the demo's budget to learn anything from it.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from app.demo.shapes import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, draw, random_scene

ATTRIBUTES = {"color": COLORS, "shape": SHAPES, "size": SIZES, "position": POSITIONS}


def scene_labels(scenes: list[dict]) -> dict[str, torch.Tensor]:
    """Class indices per attribute of the first and (when there is one) second object, and the background;
    -100 where a scene has no second object."""
    labels = {}
    for name, values in ATTRIBUTES.items():
        labels[name] = torch.tensor([values.index(s["objects"][0][name]) for s in scenes])
        labels[name + "2"] = torch.tensor([values.index(s["objects"][1][name]) if len(s["objects"]) > 1 else -100
                                           for s in scenes])
    labels["background"] = torch.tensor([BACKGROUNDS.index(s["background"]) for s in scenes])
    return labels


def _pixels(scenes: list[dict], draw_size: int, image_size: int) -> torch.Tensor:
    from app.data.transforms import transform_image

    return torch.from_numpy(np.stack([transform_image(draw(s, draw_size), image_size, False) for s in scenes]))


def pretrain_demo_vision(folder: str | Path, *, draw_size: int, steps: int = 800, num_scenes: int = 4000,
                         batch_size: int = 64, lr: float = 2e-3, seed: int = 0) -> dict[str, float]:
    """Train the tower saved in `folder` (weights overwritten in place) and return its held-out accuracy
    per attribute, read by linear heads from the mean of its output tokens."""
    from app.models.vision import VisionEncoder

    torch.manual_seed(seed)
    rng = random.Random(seed + 1000)  # other scenes than the demo's pairs
    train_scenes = [random_scene(rng) for _ in range(num_scenes)]
    test_scenes = [random_scene(rng) for _ in range(500)]
    encoder = VisionEncoder.from_pretrained(str(folder))
    size = encoder.image_size
    x_train, x_test = _pixels(train_scenes, draw_size, size), _pixels(test_scenes, draw_size, size)
    y_train, y_test = scene_labels(train_scenes), scene_labels(test_scenes)
    classes = {name: len(ATTRIBUTES.get(name.rstrip("2"), BACKGROUNDS)) for name in y_train}
    heads = torch.nn.ModuleDict({name: torch.nn.Linear(encoder.width, n) for name, n in classes.items()})
    encoder.tower.requires_grad_(True)
    encoder.train()
    params = list(encoder.tower.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, num_scenes, (batch_size,), generator=generator)
        pooled = encoder(x_train[idx]).mean(1)
        loss = sum(F.cross_entropy(heads[name](pooled), y_train[name][idx], ignore_index=-100) for name in heads)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    encoder.eval()
    with torch.no_grad():
        pooled = encoder(x_test).mean(1)
        accuracy = {}
        for name, head in heads.items():
            keep = y_test[name] != -100
            accuracy[name] = round(float((head(pooled).argmax(-1)[keep] == y_test[name][keep]).float().mean()), 3)
    encoder.tower.save_pretrained(str(folder))
    return accuracy
