"""What a picture of the demo world shows, as labels a frozen vision tower can be probed for (demo only).

A picture has no "first" and "second" object (that order exists only in a caption), so the labels are
per position slot: for each of the grammar's five positions, the colour, shape and size of the object
there (or "none"), plus the background, the number of objects and, for two objects, where the one in
the earlier slot is relative to the other. `linear_probe` fits one linear (softmax) classifier per label
on frozen features and scores it on held-out pictures; `probe_summary` folds the slots into the
attributes the captions name.
"""

from __future__ import annotations

import random
from typing import Callable

import torch
import torch.nn.functional as F

from app.demo.shapes import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, random_scene, relation

SLOT_VALUES = {"color": COLORS, "shape": SHAPES, "size": SIZES}
RELATION_VALUES = ("to the left of", "to the right of", "above", "below")
IGNORE = -100


def label_classes() -> dict[str, int]:
    """Label name -> number of classes: per position, whether an object is there (`occupied@<position>`) and
    its colour, shape and size; the background, the count and the relation."""
    out = {}
    for pos in POSITIONS:
        out[f"occupied@{pos}"] = 2
        out.update({f"{attr}@{pos}": len(values) for attr, values in SLOT_VALUES.items()})
    out.update(background=len(BACKGROUNDS), count=2, relation=len(RELATION_VALUES))
    return out


def scene_labels(scenes: list[dict]) -> dict[str, torch.Tensor]:
    """Class index per label (`label_classes`) and scene; IGNORE where a label does not apply (the colour,
    shape and size of an empty position, the relation of a one-object scene)."""
    out: dict[str, list[int]] = {name: [] for name in label_classes()}
    for scene in scenes:
        at = {o["position"]: o for o in scene["objects"]}
        for pos in POSITIONS:
            out[f"occupied@{pos}"].append(int(pos in at))
            for attr, values in SLOT_VALUES.items():
                out[f"{attr}@{pos}"].append(values.index(at[pos][attr]) if pos in at else IGNORE)
        out["background"].append(BACKGROUNDS.index(scene["background"]))
        out["count"].append(len(scene["objects"]) - 1)
        if len(scene["objects"]) == 2:
            first, second = sorted(scene["objects"], key=lambda o: POSITIONS.index(o["position"]))
            out["relation"].append(RELATION_VALUES.index(relation(first, second)))
        else:
            out["relation"].append(IGNORE)
    return {name: torch.tensor(values) for name, values in out.items()}


def pixels(scenes: list[dict], draw_size: int, image_size: int) -> torch.Tensor:
    """The scenes drawn at `draw_size` and transformed as evaluation images are: uint8 (B, S, S, 3)."""
    import numpy as np

    from app.data.transforms import transform_image
    from app.demo.shapes import draw

    return torch.from_numpy(np.stack([transform_image(draw(s, draw_size), image_size, False) for s in scenes]))


def draw_scenes(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [random_scene(rng) for _ in range(count)]


def fit_linear(x: torch.Tensor, labels: dict[str, torch.Tensor], classes: dict[str, int], steps: int = 200,
               weight_decay: float = 1e-3, seed: int = 0) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """One softmax classifier per label on the same features, fitted together (their losses are separate, so
    this is one independent fit each) by full-batch L-BFGS; rows whose label is IGNORE do not count. Returns
    `predict(x)` -> {label: class index}."""
    torch.manual_seed(seed)
    names = list(labels)
    sizes = [classes[n] for n in names]
    head = torch.nn.Linear(x.shape[1], sum(sizes))
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=steps, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        logits = head(x).split(sizes, dim=1)
        loss = sum(F.cross_entropy(z, labels[n], ignore_index=IGNORE) for z, n in zip(logits, names))
        loss = loss + weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)

    def predict(features: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {n: z.argmax(-1) for n, z in zip(names, head(features).split(sizes, dim=1))}

    return predict


def linear_probe(fit_x: torch.Tensor, fit_y: dict[str, torch.Tensor], test_x: torch.Tensor,
                 test_y: dict[str, torch.Tensor], steps: int = 200) -> dict[str, float]:
    """Held-out accuracy of a linear classifier per label (standardised features), fitted on (fit_x, fit_y);
    the label "position" (when given) is scored per scene: right when every `occupied@<slot>` label is."""
    mean, std = fit_x.mean(0, keepdim=True), fit_x.std(0, keepdim=True) + 1e-6
    fit_x, test_x = (fit_x - mean) / std, (test_x - mean) / std
    predicted = fit_linear(fit_x, fit_y, label_classes(), steps=steps)(test_x)
    out = {}
    for name, labels in test_y.items():
        keep = labels != IGNORE
        out[name] = float((predicted[name][keep] == labels[keep]).float().mean()) if keep.any() else float("nan")
    slots = [n for n in test_y if n.startswith("occupied@")]
    if slots:
        out["position"] = float(torch.stack([predicted[n] == test_y[n] for n in slots]).all(0).float().mean())
    return out


def probe_summary(per_label: dict[str, float], test_y: dict[str, torch.Tensor]) -> dict[str, float]:
    """Slot labels folded into the caption's attributes: colour / shape / size = the accuracy over the
    objects (each position's label weighted by how many objects it holds); position = the share of pictures
    whose occupied positions are all read right; background, count, relation as they are."""
    weights = {pos: int(test_y[f"occupied@{pos}"].sum()) for pos in POSITIONS}
    total = sum(weights.values()) or 1
    out = {attr: sum(per_label[f"{attr}@{pos}"] * weights[pos] for pos in POSITIONS) / total
           for attr in SLOT_VALUES}
    out["position"] = per_label.get("position", float("nan"))
    for name in ("background", "count", "relation"):
        out[name] = per_label[name]
    return out


def probe_tower(encode: Callable[[list[dict]], torch.Tensor], fit: int = 2400, test: int = 600,
                seed: int = 12345) -> dict[str, dict[str, float]]:
    """Probe frozen features: `encode(scenes)` -> (B, F) features of their pictures. Fitted on `fit` drawn
    scenes and scored on `test` others (seed `seed`, other scenes than the demo's pairs). Returns
    {"attributes": accuracy per caption attribute, "labels": per slot label}."""
    scenes = draw_scenes(fit + test, seed)
    fit_s, test_s = scenes[:fit], scenes[fit:]
    fit_y, test_y = scene_labels(fit_s), scene_labels(test_s)
    per_label = linear_probe(encode(fit_s), fit_y, encode(test_s), test_y)
    return {"attributes": {k: round(v, 3) for k, v in probe_summary(per_label, test_y).items()},
            "labels": {k: round(v, 3) for k, v in per_label.items()}}


def tower_features(folder: str, draw_size: int, batch_size: int = 200) -> Callable[[list[dict]], torch.Tensor]:
    """`encode(scenes)` for `probe_tower`: the frozen tower in `folder` on the drawn pictures, its output
    tokens flattened (what the Q-Former cross-attends to, positions included)."""
    from app.models.vision import VisionEncoder

    encoder = VisionEncoder.from_pretrained(folder).eval()

    def encode(scenes: list[dict]) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for i in range(0, len(scenes), batch_size):
                out.append(encoder(pixels(scenes[i:i + batch_size], draw_size, encoder.image_size)).flatten(1))
        return torch.cat(out)

    return encode

