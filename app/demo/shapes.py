"""A small scene grammar: coloured shapes at positions and sizes, described by templated captions,
and drawn as the images those captions describe (demo only).
"""

from __future__ import annotations

import functools
import random

# Attributes a tiny vision tower can tell apart in a 64-pixel picture: well separated colours, silhouettes that
# differ at low resolution, two clearly different sizes, five positions, backgrounds no object shares.
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle", "star", "cross", "heart")
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
BACKGROUNDS = ("gray", "light blue", "beige", "dark green")
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
    "a {size} {color} {shape} {relation} a {size2} {color2} {shape2}",
)


def random_object(rng: random.Random) -> dict:
    return {"color": rng.choice(COLORS), "shape": rng.choice(SHAPES), "size": rng.choice(SIZES),
            "position": rng.choice(POSITIONS)}


def relation(first: dict, second: dict) -> str:
    """Where the first object is relative to the second, from their positions (as the picture shows it)."""
    (x1, y1), (x2, y2) = CENTRES[first["position"]], CENTRES[second["position"]]
    if abs(x1 - x2) >= abs(y1 - y2):
        return "to the left of" if x1 < x2 else "to the right of"
    return "above" if y1 < y2 else "below"


def random_scene(rng: random.Random) -> dict:
    objects = [random_object(rng)]
    if rng.random() < 1 / 3:
        second = random_object(rng)
        second["position"] = rng.choice([p for p in POSITIONS if p != objects[0]["position"]])
        objects.append(second)
    scene = {"objects": objects, "background": rng.choice(BACKGROUNDS)}
    # "next to" is true of any two objects; the exact relation is the informative one most of the time.
    scene["relation"] = (relation(*objects) if len(objects) == 2 and rng.random() < 0.8 else "next to")
    return scene


def caption(scene: dict, rng: random.Random) -> str:
    return described(scene, rng)[0]


def described(scene: dict, rng: random.Random) -> tuple[str, set[str]]:
    """A caption of the scene and the fields its template names ("color", "shape2", "background", ...):
    what a reader of the caption alone knows. Draws from `rng` exactly as `caption` does."""
    import string

    first = scene["objects"][0]
    fields = dict(first, background=scene["background"], relation=scene["relation"])
    if len(scene["objects"]) == 1:
        template = rng.choice(ONE_OBJECT)
    else:
        second = scene["objects"][1]
        fields.update(color2=second["color"], shape2=second["shape"], size2=second["size"],
                      position2=second["position"])
        template = rng.choice(TWO_OBJECTS)
    named = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    return template.format(**fields), named


VOCABULARY = {"color": COLORS, "shape": SHAPES, "size": SIZES, "position": POSITIONS, "background": BACKGROUNDS,
              "relation": RELATIONS}


def _alternatives(field: str) -> str:
    import re

    return "|".join(re.escape(v) for v in sorted(VOCABULARY[field.rstrip("2")], key=len, reverse=True))


@functools.lru_cache(maxsize=1)
def _template_patterns() -> tuple:
    """Each template as a compiled pattern whose named groups match its fields' vocabulary (built once)."""
    import re
    import string

    return tuple(re.compile("".join(re.escape(literal) + (f"(?P<{name}>{_alternatives(name)})" if name else "")
                                    for literal, name, _, _ in string.Formatter().parse(template)))
                 for template in (*ONE_OBJECT, *TWO_OBJECTS))


def caption_fields(text: str) -> "set[str] | None":
    """The fields of the template that wrote `text` (as `described` returns them), or None when no template
    matches."""
    for pattern in _template_patterns():
        match = pattern.fullmatch(text.strip())
        if match:
            return set(match.groupdict())
    return None


def corpus(num_lines: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [caption(random_scene(rng), rng) for _ in range(num_lines)]


RGB = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 220, 40),
       "purple": (140, 60, 180), "orange": (245, 140, 30), "white": (250, 250, 250), "black": (15, 15, 15),
       "pink": (245, 150, 190), "brown": (130, 80, 40), "gray": (128, 128, 128), "light blue": (170, 210, 240),
       "beige": (225, 210, 170), "dark green": (20, 80, 40)}
CENTRES = {"top left": (0.26, 0.26), "top right": (0.74, 0.26), "bottom left": (0.26, 0.74),
           "bottom right": (0.74, 0.74), "center": (0.5, 0.5)}
RADII = {"small": 0.12, "large": 0.22}


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    import math

    def ring(n: int, radius: float, phase: float = -math.pi / 2) -> list[tuple[float, float]]:
        return [(cx + radius * math.cos(phase + 2 * math.pi * k / n), cy + radius * math.sin(phase + 2 * math.pi * k / n))
                for k in range(n)]

    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return ring(3, r)
    if shape == "star":
        outer, inner = ring(5, r), ring(5, r * 0.45, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    if shape == "cross":
        t = r / 3
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t), (cx + t, cy + t),
                (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t)]
    if shape == "heart":
        return [(cx + r * 16 * math.sin(a) ** 3 / 17,
                 cy - r * (13 * math.cos(a) - 5 * math.cos(2 * a) - 2 * math.cos(3 * a) - math.cos(4 * a)) / 17)
                for a in (2 * math.pi * k / 40 for k in range(40))]
    raise ValueError(shape)


def draw(scene: dict, size: int = 96):
    """The scene as an RGB PIL image: each object at its position, with its size, colour and shape."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), RGB[scene["background"]])
    pen = ImageDraw.Draw(img)
    for obj in scene["objects"]:
        cx, cy = CENTRES[obj["position"]]
        r = RADII[obj["size"]] * size
        if obj["shape"] == "circle":
            pen.ellipse([cx * size - r, cy * size - r, cx * size + r, cy * size + r], fill=RGB[obj["color"]])
        else:
            pen.polygon(_polygon(obj["shape"], cx * size, cy * size, r), fill=RGB[obj["color"]])
    return img


def scene_captions(num_images: int, captions_per_image: int = 2, seed: int = 0) -> list[tuple[dict, list[str]]]:
    """[(scene, [captions])]: the scenes `image_text_pairs` draws, with the same seed, without drawing."""
    rng = random.Random(seed)
    out = []
    for _ in range(num_images):
        scene = random_scene(rng)
        out.append((scene, [caption(scene, rng) for _ in range(captions_per_image)]))
    return out


def scene_key(scene: dict) -> str:
    """What a scene's captions can describe (its objects, background and relation), as one string:
    two pictures with the same key have interchangeable descriptions."""
    import json

    return json.dumps(scene, sort_keys=True)


def novel_scene_captions(num_images: int, exclude: set[str], captions_per_image: int = 2,
                         seed: int = 0) -> tuple[list[tuple[dict, list[str]]], dict[str, int]]:
    """`num_images` scenes drawn with `seed`, each unlike every scene in `exclude` (scene keys) and unlike
    each other; returns them and how many draws were dropped for each reason."""
    rng = random.Random(seed)
    out, seen = [], set()
    dropped = {"seen_in_train_or_val": 0, "repeated_in_test": 0}
    while len(out) < num_images:
        scene = random_scene(rng)
        texts = [caption(scene, rng) for _ in range(captions_per_image)]
        key = scene_key(scene)
        if key in exclude:
            dropped["seen_in_train_or_val"] += 1
        elif key in seen:
            dropped["repeated_in_test"] += 1
        else:
            seen.add(key)
            out.append((scene, texts))
        if sum(dropped.values()) > 100 * num_images + 10_000:
            raise ValueError(f"cannot draw {num_images} scenes unlike the {len(exclude)} excluded ones")
    return out, dropped


def image_text_pairs(num_images: int, captions_per_image: int = 2, seed: int = 0):
    """[(PIL image, [captions])]: the images are drawn from the same grammar the captions describe."""
    return [(draw(scene), texts) for scene, texts in scene_captions(num_images, captions_per_image, seed)]
