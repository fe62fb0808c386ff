"""A small scene grammar: coloured shapes at positions and sizes, described by templated captions.

Scenes are plain dicts so the same generator can later also draw the images that go with them.
"""

from __future__ import annotations

import random

COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black", "pink", "brown")
SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross", "heart")
SIZES = ("small", "large", "tiny", "big", "medium sized")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center", "top", "bottom", "left", "right")
BACKGROUNDS = ("gray", "white", "black", "light blue", "beige", "dark green")
RELATIONS = ("to the left of", "to the right of", "above", "below", "next to")

ONE_OBJECT = (
    "a {size} {color} {shape} in the {position}",
    "a {color} {shape} on a {background} background",
    "there is a {size} {color} {shape} near the {position} of the picture",
    "the picture shows one {color} {shape} at the {position}",
    "a {size} {shape} painted {color} against a {background} background",
    "in the {position} there is a {color} {shape}",
    "a single {color} {shape} sits in the {position} of a {background} image",
)
TWO_OBJECTS = (
    "a {color} {shape} {relation} a {color2} {shape2}",
    "a {size} {color} {shape} and a {size2} {color2} {shape2} on a {background} background",
    "two shapes : a {color} {shape} in the {position} and a {color2} {shape2} in the {position2}",
    "the {color} {shape} is {relation} the {color2} {shape2}",
    "a {size} {color} {shape} with a {color2} {shape2} {relation} it",
)


def random_object(rng: random.Random) -> dict:
    return {"color": rng.choice(COLORS), "shape": rng.choice(SHAPES), "size": rng.choice(SIZES),
            "position": rng.choice(POSITIONS)}


def random_scene(rng: random.Random) -> dict:
    objects = [random_object(rng) for _ in range(rng.choice((1, 1, 2)))]
    return {"objects": objects, "background": rng.choice(BACKGROUNDS), "relation": rng.choice(RELATIONS)}


def caption(scene: dict, rng: random.Random) -> str:
    first = scene["objects"][0]
    fields = dict(first, background=scene["background"], relation=scene["relation"])
    if len(scene["objects"]) == 1:
        return rng.choice(ONE_OBJECT).format(**fields)
    second = scene["objects"][1]
    fields.update(color2=second["color"], shape2=second["shape"], size2=second["size"], position2=second["position"])
    return rng.choice(TWO_OBJECTS).format(**fields)


def corpus(num_lines: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [caption(random_scene(rng), rng) for _ in range(num_lines)]
