"""Questions about the demo world's scenes and what a caption says of them (demo only).

Three things the demo's instrument needs from the scene grammar (`app.demo.shapes`):

- `scene_questions`: VQAv2-style questions about a drawn scene, each with ten answers, of seven kinds
  (colour of a named shape, shape of a named colour, size, position, background, how many shapes,
  relation), asked only where the object named is the only one so named;
- `text_questions`: the same questions about what a *caption* says (only those the caption answers):
  the tiny LLM's text-only reading-comprehension pre-training, as a real LLM learns to answer a question
  about a text it has just read;
- `caption_attributes`: the attribute words of a generated caption parsed with the grammar's vocabulary,
  and `attribute_accuracy`, the share of them that are true of the scene.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from typing import Iterable, Optional

from app.demo.shapes import BACKGROUNDS, COLORS, POSITIONS, RELATIONS, SHAPES, SIZES, relation

KINDS = ("color", "shape", "size", "position", "background", "count", "relation")
COUNT_WORDS = {1: "one", 2: "two"}
# Relation answers as a person would write them: the word alone most of the time.
RELATION_ANSWERS = {"to the left of": ("left", "to the left"), "to the right of": ("right", "to the right"),
                    "above": ("above", "above"), "below": ("below", "below")}
INVERSE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below",
           "below": "above"}
QA_TEMPLATE = "Question: {} Short answer:"  # the evaluation's default VQA template (BLIP-2's)


def _answers(main: str, variant: Optional[str] = None, variants: int = 3) -> list[str]:
    """Ten human-style answers: `main`, and `variants` of them written as `variant`."""
    if variant is None or variant == main:
        return [main] * 10
    return [main] * (10 - variants) + [variant] * variants


def _unique(objects: list[dict], index: int, *keys: str) -> bool:
    """Whether object `index` is the only one with its values of `keys` (so a question can name it so)."""
    mine = tuple(objects[index][k] for k in keys)
    return sum(tuple(o[k] for k in keys) == mine for o in objects) == 1


def _question(kind: str, text: str, answer: str, answers: list[str]) -> dict:
    return {"kind": kind, "question": text, "answer": answer, "answers": answers}


def scene_questions(scene: dict, known: Optional[set[str]] = None) -> list[dict]:
    """Every question of `KINDS` the scene allows, as {kind, question, answer, answers (10)}.

    `known`: the caption fields a reader has (`shapes.caption_fields`); questions whose object it does not
    name, or whose answer it does not say, are left out. None = the whole scene is seen (a picture)."""
    objects = scene["objects"]
    seen = (lambda *fields: True) if known is None else (lambda *fields: set(fields) <= known)
    suffix = ["", "2"]
    out = []
    for i, obj in enumerate(objects):
        f = {name: name + suffix[i] for name in ("color", "shape", "size", "position")}
        if _unique(objects, i, "shape") and seen(f["shape"], f["color"]):
            out.append(_question("color", f"what color is the {obj['shape']}?", obj["color"], _answers(obj["color"])))
        if _unique(objects, i, "color") and seen(f["shape"], f["color"]):
            out.append(_question("shape", f"what shape is {obj['color']}?", obj["shape"], _answers(obj["shape"])))
        if _unique(objects, i, "color", "shape") and seen(f["shape"], f["color"], f["size"]):
            out.append(_question("size", f"what size is the {obj['color']} {obj['shape']}?", obj["size"],
                                 _answers(obj["size"])))
        if _unique(objects, i, "color", "shape") and seen(f["shape"], f["color"], f["position"]):
            out.append(_question("position", f"where is the {obj['color']} {obj['shape']}?", obj["position"],
                                 _answers(obj["position"], f"in the {obj['position']}")))
    if seen("background"):
        out.append(_question("background", "what color is the background?", scene["background"],
                             _answers(scene["background"])))
    count = COUNT_WORDS[len(objects)]
    out.append(_question("count", "how many shapes are there?", count, _answers(count, str(len(objects)))))
    if len(objects) == 2 and _unique(objects, 0, "color", "shape") and _unique(objects, 1, "color", "shape"):
        a, b = objects
        said = known is None or (scene.get("relation") in INVERSE and "relation" in known) or \
            {"position", "position2"} <= known
        if said and seen("color", "shape", "color2", "shape2"):
            where = relation(a, b)
            answer, variant = RELATION_ANSWERS[where]
            out.append(_question("relation", f"where is the {a['color']} {a['shape']} relative to the "
                                             f"{b['color']} {b['shape']}?", answer, _answers(answer, variant)))
    return out


def reading_corpus(num_lines: int, seed: int = 0, separator: str = "", paired_fraction: float = 0.3,
                   question_fraction: float = 0.5) -> list[str]:
    """Lines for the tiny LLM's pre-training: a caption alone; a caption, a newline, the separator and another
    caption of the same scene (`paired_fraction`); or a caption, a newline, the separator and a question the
    caption answers with its short answer in the VQA template (`question_fraction`). A real LLM continues a
    text that restates what came before it and answers questions about a text it has read; these teach the
    tiny one both, so a soft prompt standing where the first caption stood can steer it. The separator is the
    token that starts every text the LLM reads after a soft prompt (OPT's BOS), so the second part of a line
    begins as the text after a soft prompt does."""
    from app.demo.shapes import described, random_scene

    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        scene = random_scene(rng)
        first, fields = described(scene, rng)
        draw = rng.random()
        if draw < paired_fraction:
            lines.append(f"{first}\n{separator}{described(scene, rng)[0]}")
        elif draw < paired_fraction + question_fraction:
            lines.append(qa_line(first, rng.choice(text_questions(scene, fields)), separator))
        else:
            lines.append(first)
    return lines


def text_questions(scene: dict, fields: set[str]) -> list[dict]:
    """The questions a caption with `fields` (`shapes.caption_fields`) answers about its scene."""
    return scene_questions(scene, known=fields)


def qa_line(context: str, question: dict, separator: str) -> str:
    """A reading-comprehension line for the tiny LLM: the text, the separator the LLM reads between two
    texts (its BOS for OPT-style, its EOS for T5-style), the question in the evaluation's template, the answer."""
    return f"{context}\n{separator}{QA_TEMPLATE.format(question['question'])} {question['answer']}"


# ---------------------------------------------------------------------------------------------
# parsing captions


_COLOR_WORDS = sorted(set(COLORS) | set(BACKGROUNDS), key=len, reverse=True)  # "dark green" before "green"
_PATTERN = re.compile(r"\b(" + "|".join(map(re.escape, [*_COLOR_WORDS, *SHAPES, *SIZES, *POSITIONS, *RELATIONS]))
                      + r")\b")


def caption_attributes(text: str) -> dict[str, list[str]]:
    """The grammar's attribute words in a caption, by kind, in order: {"color": [...], "shape": [...],
    "size": [...], "position": [...], "background": [...], "relation": [...]}. A colour word right before
    "background" (or "image") is the background's."""
    out: dict[str, list[str]] = {k: [] for k in ("color", "shape", "size", "position", "background", "relation")}
    text = " ".join(text.lower().split())
    for match in _PATTERN.finditer(text):
        word = match.group(1)
        after = text[match.end():].lstrip()
        if word in _COLOR_WORDS and (after.startswith("background") or after.startswith("image")):
            out["background"].append(word)
        elif word in COLORS:
            out["color"].append(word)
        elif word in SHAPES:
            out["shape"].append(word)
        elif word in SIZES:
            out["size"].append(word)
        elif word in POSITIONS:
            out["position"].append(word)
        elif word in RELATIONS:
            out["relation"].append(word)
    return out


def scene_attributes(scene: dict) -> dict[str, set[str]]:
    """What is true of a scene, by the kinds `caption_attributes` returns."""
    objects = scene["objects"]
    truth = {k: {o[k] for o in objects} for k in ("color", "shape", "size", "position")}
    truth["background"] = {scene["background"]}
    truth["relation"] = {"next to"} | ({relation(*objects), INVERSE[relation(*objects)]} if len(objects) == 2 else set())
    if len(objects) < 2:
        truth["relation"] = set()
    return truth


def attribute_accuracy(pairs: Iterable[tuple[str, dict]]) -> dict[str, dict[str, float]]:
    """For (generated caption, scene) pairs, per attribute kind: `true` = the share of the attribute words
    named that are true of the scene, `named` = the share of scenes whose caption names that kind at all,
    `words` = how many words were counted."""
    right, total, named, scenes = Counter(), Counter(), Counter(), 0
    for text, scene in pairs:
        scenes += 1
        said, truth = caption_attributes(text), scene_attributes(scene)
        for kind, words in said.items():
            named[kind] += bool(words)
            total[kind] += len(words)
            right[kind] += sum(w in truth[kind] for w in words)
    return {kind: {"true": round(right[kind] / total[kind], 3) if total[kind] else None,
                   "named": round(named[kind] / scenes, 3) if scenes else None, "words": total[kind]}
            for kind in ("color", "shape", "size", "position", "background", "relation")}


def sample_questions(scenes: Iterable[dict], seed: int = 0, per_scene: Optional[int] = None) -> list[list[dict]]:
    """`scene_questions` of each scene; `per_scene`: at most that many of them, drawn with `seed`."""
    rng = random.Random(seed)
    out = []
    for scene in scenes:
        questions = scene_questions(scene)
        if per_scene is not None and len(questions) > per_scene:
            questions = rng.sample(questions, per_scene)
        out.append(questions)
    return out


def vqa_files(scenes: list[dict], split: str, per_scene: Optional[int] = 3, seed: int = 0,
              captions: Optional[list[list[str]]] = None) -> tuple[dict, dict]:
    """(questions, annotations) in the VQAv2 JSON layout for pictures whose image id is their index in
    `scenes`: at most `per_scene` questions per picture (drawn with `seed`), ten answers each, the kind as
    `answer_type` (so the metrics come per kind) and `question_type`. `captions`: the pictures' reference
    captions; each annotation then also names the one that says the answer (`oracle_caption`), for the
    text-only oracle."""
    from app.demo.shapes import caption_fields

    questions, annotations = [], []
    for image_id, asked in enumerate(sample_questions(scenes, seed, per_scene)):
        for k, q in enumerate(asked):
            qid = image_id * 100 + k
            questions.append({"image_id": image_id, "question": q["question"], "question_id": qid})
            ann = {"question_id": qid, "image_id": image_id, "question_type": q["kind"], "answer_type": q["kind"],
                   "multiple_choice_answer": q["answer"],
                   "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                               for i, a in enumerate(q["answers"])]}
            if captions is not None:
                ann["oracle_caption"] = oracle_caption(scenes[image_id], q, captions[image_id], caption_fields)
            annotations.append(ann)
    info = {"description": f"questions about the demo world's {split} pictures", "version": "1"}
    return ({"info": info, "task_type": "Open-Ended", "data_type": "demo", "data_subtype": split,
             "questions": questions},
            {"info": info, "data_type": "demo", "data_subtype": split, "annotations": annotations})


def oracle_caption(scene: dict, question: dict, references: list[str], fields_of, seed: int = 0) -> str:
    """A true caption of the scene that says the answer: the first reference caption that does (by its
    template's fields), else one the grammar writes for the scene (the first of up to 100 seeded draws that
    does), else the first reference."""
    from app.demo.shapes import described

    def answers(fields) -> bool:
        return fields is not None and any(q["question"] == question["question"] for q in text_questions(scene, fields))

    for text in references:
        if answers(fields_of(text)):
            return text
    rng = random.Random(f"{seed}/{question['question']}")
    for _ in range(100):
        text, fields = described(scene, rng)
        if answers(fields):
            return text
    return references[0]
