"""Caption scoring: the published coco-caption numbers from the real demo results and references."""

import json
import subprocess
import sys

import pytest

from app.evaluation.captioning import EvaluationError, load_references, load_results, score_captions

from conftest import ROOT, SHARED_DATA

COCO_EVAL = SHARED_DATA / "coco_eval"
PUBLISHED = {"Bleu_1": 0.579, "Bleu_2": 0.404, "Bleu_3": 0.279, "Bleu_4": 0.191, "METEOR": 0.195, "ROUGE_L": 0.396,
             "CIDEr": 0.600}


def test_known_answer_through_the_job(tmp_path):
    done = subprocess.run([sys.executable, "-m", "jobs.evaluate", "--task", "caption",
                           "--results", COCO_EVAL / "fakecap_results.json",
                           "--annotations", COCO_EVAL / "fakecap_gts_cocoformat.json",
                           "--summary", tmp_path / "s.json", "--per-image", tmp_path / "per.json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((tmp_path / "s.json").read_text())["metrics"]
    assert {k: round(metrics[k], 3) for k in PUBLISHED} == PUBLISHED
    assert metrics["SPICE"] is None and "SPICE    unavailable" in done.stdout  # no CoreNLP models offline
    assert "Bleu_4   0.191" in done.stdout and "CIDEr    0.600" in done.stdout
    per_image = json.loads((tmp_path / "per.json").read_text())
    assert len(per_image) == 1000
    assert sum(s["CIDEr"] for s in per_image.values()) / 1000 == pytest.approx(metrics["CIDEr"], rel=1e-6)


def test_references_as_a_mapping_and_bad_inputs(tmp_path):
    results = load_results(COCO_EVAL / "fakecap_results.json")
    by_id = load_references(COCO_EVAL / "fakecap_gts.json")  # {image_id: [captions]}, ids as strings
    coco = load_references(COCO_EVAL / "fakecap_gts_cocoformat.json")  # ids as ints
    # score_captions matches results to references by str(image_id), so the two files score alike (the
    # known-answer test above scores the COCO-format one) when they hold the same captions under those keys.
    assert {str(k): v for k, v in by_id.items()} == {str(k): v for k, v in coco.items()}
    assert {str(r["image_id"]) for r in results} <= set(map(str, coco)) and len(coco) == 1000
    (tmp_path / "bad.json").write_text('{"not": "a list"}')
    with pytest.raises(EvaluationError, match="not a COCO results file"):
        load_results(tmp_path / "bad.json")
    with pytest.raises(EvaluationError, match="no result matches a reference image"):
        score_captions([{"image_id": -1, "caption": "a dog"}], coco, spice=False)
