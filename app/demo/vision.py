"""The demo's frozen image encoder: a tiny BLIP-2-style ViT pre-trained on drawn scenes (demo only).

BLIP-2 freezes an image encoder that was pre-trained elsewhere (EVA-CLIP). The demo does the same at toy
scale: before the pipeline runs, a tiny ViT learns to name what its grammar draws (colour, shape, size and
position of each object, the background) from scenes that are not in the demo's image-text pairs, with
linear heads on its output tokens (flattened, so where things are stays readable); the heads are then
thrown away and the tower is saved as an ordinary HF folder. A random tower keeps colours but little else, and the Q-Former then needs far more
steps than the demo's budget to learn anything from it.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F

from app.demo.shapes import draw, random_scene


def pretrain_demo_vision(folder: str | Path, *, draw_size: int, steps: int = 800, num_scenes: int = 4000,
                         batch_size: int = 64, lr: float = 2e-3, seed: int = 0, heads_on: str = "both") -> dict[str, float]:
    """Train the tower saved in `folder` (weights overwritten in place) and return its held-out accuracy
    per label (`app.demo.probe.scene_labels`: what is at each position, background, count, relation; the
    better of the two heads). `heads_on`: where linear heads read the labels from: "mean" (the mean of the
    output tokens: every token learns the whole scene, which a Q-Former's cross-attention picks up at once,
    but shape stays weak: a linear probe read 0.63), "tokens" (the tokens flattened: each token keeps its own
    patch, shape 0.98 and position 1.0, but a fresh Q-Former's uniform attention then averages the object
    away: stage-1 ITC stayed at chance for 150 steps) or "both" (default: shape 0.94, position 1.0, ITC
    learns)."""
    from app.demo.probe import IGNORE, label_classes, pixels, scene_labels
    from app.models.vision import VisionEncoder

    torch.manual_seed(seed)
    rng = random.Random(seed + 1000)  # other scenes than the demo's pairs
    train_scenes = [random_scene(rng) for _ in range(num_scenes)]
    test_scenes = [random_scene(rng) for _ in range(500)]
    encoder = VisionEncoder.from_pretrained(str(folder))
    size = encoder.image_size
    x_train, x_test = pixels(train_scenes, draw_size, size), pixels(test_scenes, draw_size, size)
    y_train, y_test = scene_labels(train_scenes), scene_labels(test_scenes)
    tokens = encoder(x_train[:1]).shape[1]
    views = {"mean": ("mean",), "tokens": ("tokens",), "both": ("mean", "tokens")}[heads_on]
    widths = {"mean": encoder.width, "tokens": tokens * encoder.width}
    names = {f"{view}/{name}".replace("@", "_at_").replace(" ", "_"): (view, name)
             for view in views for name in label_classes()}
    classes = label_classes()
    heads = torch.nn.ModuleDict({key: torch.nn.Linear(widths[view], classes[name]) for key, (view, name) in names.items()})
    encoder.tower.requires_grad_(True)
    encoder.train()
    params = list(encoder.tower.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, num_scenes, (batch_size,), generator=generator)
        out = encoder(x_train[idx])
        pooled = {"mean": out.mean(1), "tokens": out.flatten(1)}
        loss = sum(F.cross_entropy(heads[key](pooled[view]), y_train[name][idx], ignore_index=IGNORE)
                   for key, (view, name) in names.items())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    encoder.eval()
    with torch.no_grad():
        out = encoder(x_test)
        pooled = {"mean": out.mean(1), "tokens": out.flatten(1)}
        accuracy = {}
        for key, (view, name) in names.items():
            keep = y_test[name] != IGNORE
            right = heads[key](pooled[view]).argmax(-1)[keep] == y_test[name][keep]
            accuracy[name] = max(accuracy.get(name, 0.0), round(float(right.float().mean()), 3))
    encoder.tower.save_pretrained(str(folder))
    return accuracy
