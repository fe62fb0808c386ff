"""The demo world's instrument on hand-made cases: the caption parser and per-attribute accuracy, the
questions a scene (or a caption) allows and their VQAv2 files, the linear probe of frozen features, and the
grammar's caption ceiling. Pure functions and tiny fits (the ceiling runs pycocoevalcap's Java tokenizer): no Ray."""

import json
import random

import pytest
import torch

from app.demo import probe
from app.demo.questions import (attribute_accuracy, caption_attributes, reading_corpus, scene_questions,
                                text_questions, vqa_files)
from app.demo.shapes import caption_fields, described, random_scene

RED_CIRCLE = {"color": "red", "shape": "circle", "size": "large", "position": "top left"}
BLUE_STAR = {"color": "blue", "shape": "star", "size": "small", "position": "bottom right"}
TWO = {"objects": [RED_CIRCLE, BLUE_STAR], "background": "dark green", "relation": "to the left of"}


def test_the_parser_reads_the_grammar_s_attribute_words():
    said = caption_attributes("a large red circle in the top left and a small blue star on a dark green background")
    assert said == {"color": ["red", "blue"], "shape": ["circle", "star"], "size": ["large", "small"],
                    "position": ["top left"], "background": ["dark green"], "relation": []}
    # A colour before "background" / "image" is the background's; "dark green" is not read as "green".
    assert caption_attributes("a single red star sits in the center of a beige image")["background"] == ["beige"]
    assert caption_attributes("the red circle is to the left of the blue star")["relation"] == ["to the left of"]


def test_attribute_accuracy_counts_true_words_and_named_scenes():
    one = {"objects": [RED_CIRCLE], "background": "gray", "relation": "next to"}
    report = attribute_accuracy([("a large red cross in the bottom left", one),   # shape and position wrong
                                 ("a red circle on a gray background", one)])
    assert report["color"] == {"true": 1.0, "named": 1.0, "words": 2}
    assert report["shape"] == {"true": 0.5, "named": 1.0, "words": 2}
    assert report["position"] == {"true": 0.0, "named": 0.5, "words": 1}
    assert report["size"]["named"] == 0.5 and report["background"]["true"] == 1.0
    assert report["relation"] == {"true": None, "named": 0.0, "words": 0}
    # Relations: true of the geometry either way round, "next to" always.
    assert attribute_accuracy([("the blue star is to the right of the red circle", TWO)])["relation"]["true"] == 1.0
    assert attribute_accuracy([("the blue star is above the red circle", TWO)])["relation"]["true"] == 0.0


def test_caption_fields_recover_the_template_of_every_drawn_caption():
    rng = random.Random(5)
    for _ in range(500):
        scene = random_scene(rng)
        text, fields = described(scene, rng)
        assert caption_fields(text) == fields
    assert caption_fields("the blue square is to the left of the purple triangle") == {
        "color", "shape", "relation", "color2", "shape2"}
    assert caption_fields("a photo of a dog") is None


def test_scene_questions_name_only_unique_objects_and_have_ten_answers():
    asked = {q["question"]: q for q in scene_questions(TWO)}
    assert asked["what color is the circle?"]["answer"] == "red"
    assert asked["what shape is blue?"]["answer"] == "star"
    assert asked["what size is the blue star?"]["answer"] == "small"
    assert asked["where is the red circle?"]["answer"] == "top left"
    assert asked["what color is the background?"]["answer"] == "dark green"
    assert asked["how many shapes are there?"]["answer"] == "two"
    relation = asked["where is the red circle relative to the blue star?"]
    assert relation["answer"] == "left" and relation["answers"].count("to the left") == 3
    assert all(len(q["answers"]) == 10 for q in asked.values())
    twins = {"objects": [RED_CIRCLE, {**BLUE_STAR, "shape": "circle"}], "background": "gray", "relation": "above"}
    texts = [q["question"] for q in scene_questions(twins)]
    assert "what color is the circle?" not in texts and "what shape is red?" in texts


def test_text_questions_ask_only_what_the_caption_says():
    fields = caption_fields("a large red circle in the top left")
    one = {"objects": [RED_CIRCLE], "background": "gray", "relation": "next to"}
    kinds = sorted(q["kind"] for q in text_questions(one, fields))
    assert kinds == ["color", "count", "position", "shape", "size"]  # no background: the caption does not say it
    lines = reading_corpus(200, seed=3, separator="</s>")
    qa = [line for line in lines if "Question:" in line]
    assert qa and all("\n</s>Question: " in line and " Short answer: " in line for line in qa)


def test_the_vqa_files_load_in_the_vqav2_layout_and_a_known_answer_scores(tmp_path):
    from app.evaluation.data import vqa_items
    from app.evaluation.vqa import score_vqa

    scenes = [TWO, {"objects": [RED_CIRCLE], "background": "gray", "relation": "next to"}]
    questions, annotations = vqa_files(scenes, "test", per_scene=None, captions=[
        ["a red circle to the left of a blue star"], ["a red circle on a gray background"]])
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    for i in range(2):
        (tmp_path / f"{i:06d}.png").write_bytes(b"")
    items, truth = vqa_items(questions=str(tmp_path / "q.json"), annotations=str(tmp_path / "a.json"),
                             images=str(tmp_path), template="Question: {} Short answer:", image_pattern="{image_id:06d}.png")
    assert len(items) == len(truth) == len(questions["questions"]) == 11 + 6
    assert items[0]["path"].endswith("000000.png") and items[0]["prompt"].startswith("Question: ")
    right = {a["question_id"]: a["multiple_choice_answer"] for a in annotations["annotations"]}
    metrics, _ = score_vqa({str(q): a for q, a in right.items()}, truth)
    assert metrics["vqa_accuracy"] == 100.0 and metrics["vqa_accuracy_relation"] == 100.0
    relation = next(a for a in annotations["annotations"] if a["answer_type"] == "relation")
    variant, _ = score_vqa({str(relation["question_id"]): "to the left"}, truth)
    assert variant["vqa_accuracy"] == 90.0  # 3 of 10 wrote it so: min(matches / 3, 1) over leave-one-out sets
    wrong, _ = score_vqa({str(q): "purple" for q in right}, truth)
    assert wrong["vqa_accuracy"] == 0.0
    # The oracle caption says the answer where a reference does; else the grammar writes one that does.
    background = next(a for a in annotations["annotations"] if a["image_id"] == 0 and a["answer_type"] == "background")
    assert "dark green" in background["oracle_caption"]


def test_the_linear_probe_reads_a_perfect_feature_and_not_noise():
    scenes = probe.draw_scenes(700, seed=1)
    labels = probe.scene_labels(scenes)
    classes = probe.label_classes()
    # A "perfect tower": each label one-hot (the relation too), then mixed by a fixed random rotation.
    onehot = torch.cat([torch.nn.functional.one_hot(labels[n].clamp(min=0), classes[n]).float() *
                        (labels[n] != probe.IGNORE).float()[:, None] for n in classes], dim=1)
    rotation = torch.linalg.qr(torch.randn(onehot.shape[1], onehot.shape[1], generator=torch.Generator().manual_seed(0)))[0]
    perfect, noise = onehot @ rotation, torch.randn(700, 64, generator=torch.Generator().manual_seed(1))
    fit, test = slice(0, 500), slice(500, 700)

    def read(features):
        per_label = probe.linear_probe(features[fit], {k: v[fit] for k, v in labels.items()}, features[test],
                                       {k: v[test] for k, v in labels.items()}, steps=100)
        return probe.probe_summary(per_label, {k: v[test] for k, v in labels.items()})

    good, bad = read(perfect), read(noise)
    assert all(value >= 0.98 for value in good.values()), good
    assert bad["color"] < 0.4 and bad["shape"] < 0.4 and bad["position"] < 0.3, bad
    assert bad["background"] < 0.5 and bad["background"] < good["background"]


@pytest.mark.integration  # pycocoevalcap's Java tokenizer
def test_the_grammar_ceiling_scores_above_another_picture_s_caption():
    from app.demo.diagnostics import grammar_ceiling
    from app.demo.shapes import scene_captions

    drawn = scene_captions(60, captions_per_image=5, seed=4)
    scenes = {f"{i:06d}": scene for i, (scene, _) in enumerate(drawn)}
    references = {f"{i:06d}": texts for i, (_, texts) in enumerate(drawn)}
    ceiling = grammar_ceiling(scenes, references, seed=0)
    shifted = grammar_ceiling({k: scenes[f"{(int(k) + 1) % 60:06d}"] for k in scenes}, references, seed=0)
    assert ceiling["CIDEr"] > 2 * shifted["CIDEr"] > 0
