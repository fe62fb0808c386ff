"""Evaluation and inference on tiny trained models and real Flickr8k photos: captioning (Ray Data batch
inference, COCO-protocol scores, MLflow run and artifacts), VQA scoring rules, retrieval recall, the
caption command and the export to transformers' Blip2ForConditionalGeneration."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from app.evaluation.retrieval import recall_at_k
from app.evaluation.vqa import normalize_answer, score_vqa, vqa_accuracy

from conftest import FLICKR, ROOT, credential_leaks

# ---------------------------------------------------------------------------------------------
# VQA scoring: the official normalisation, rule by rule, and the 10 leave-one-out subsets


@pytest.mark.parametrize("raw, normalised", [
    ("Yes", "yes"),                          # case
    ("two", "2"), ("None", "0"),             # number words
    ("a dog", "dog"), ("The Red Car", "red car"), ("an apple", "apple"),  # articles
    ("dont", "don't"), ("isnt", "isn't"), ("couldnt've", "couldn't've"), ("couldn'tve", "couldn't've"),  # contractions
    ("yes!", "yes"), ("left side?", "left side"), ("t-shirt", "t shirt"),  # punctuation -> removed / space
    ("1,000", "1000"),                       # comma between digits: punctuation removed, not spaced
    ("end.", "end"), ("3.5", "3.5"),         # periods, except before a digit
    ("  red\tand\nblue ", "red and blue"),  # whitespace
    ("its", "its"), ("well", "well"),        # ordinary words are not contractions
])
def test_vqa_answer_normalisation(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_vqa_accuracy_averages_the_ten_leave_one_out_subsets():
    # 3 of 10 humans said "2": leaving out one of them leaves 2 matches (2/3), leaving out another leaves 3 (1).
    assert vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert vqa_accuracy("2", ["2"] * 2 + ["x"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert vqa_accuracy("2", ["2"] * 4 + ["x"] * 6) == 1.0
    assert vqa_accuracy("A dog.", ["dog"] * 10) == 1.0  # normalised on both sides
    assert vqa_accuracy("cat", ["dog"] * 10) == 0.0
    truth = {"1": {"answers": ["yes"] * 10, "answer_type": "yes/no"},
             "2": {"answers": ["2"] * 3 + ["3"] * 7, "answer_type": "number"},
             "3": {"answers": ["red"] * 10, "answer_type": "other"}}
    metrics, per_question = score_vqa({"1": "Yes", "2": "two", "3": "blue"}, truth)
    assert per_question == pytest.approx({"1": 1.0, "2": 0.9, "3": 0.0})
    assert metrics["vqa_accuracy"] == pytest.approx(100 * 1.9 / 3, abs=0.01)
    assert metrics["vqa_accuracy_yes_no"] == 100 and metrics["vqa_accuracy_number"] == 90
    exact, _ = score_vqa({"a": "The Table", "b": "chair"}, {"a": {"answers": ["table"]}, "b": {"answers": ["bed"]}},
                         metric="exact")
    assert exact["exact_match"] == 50


# ---------------------------------------------------------------------------------------------
# retrieval recall on constructed scores with a known answer


def test_recall_at_k_known_answers():
    # 4 images with 2 captions each; identity-like features: every caption scores highest with its image.
    owner = [0, 0, 1, 1, 2, 2, 3, 3]
    feats_i = np.eye(4)
    feats_t = np.eye(4)[owner]
    sims = feats_i @ feats_t.T
    out = recall_at_k(sims, sims.T, owner, ks=(1, 5, 10))
    assert out["txt_r1"] == out["img_r1"] == 100 and out["r_mean"] == 100
    # Reverse every ranking: the right answer always comes last.
    worst = recall_at_k(-sims, -sims.T, owner, ks=(1, 2, 3, 4))
    assert worst["img_r1"] == worst["img_r3"] == 0 and worst["img_r4"] == 100
    assert worst["txt_r1"] == 0  # the two own captions are ranks 7 and 8 of 8
    # Images 0 and 1 swap features: each ranks the other's 2 captions first and its own next (ranks 3-4);
    # their 4 captions each rank the wrong image first and their own second.
    swapped = sims[[1, 0, 2, 3]]
    half = recall_at_k(swapped, swapped.T, owner, ks=(1, 2, 3))
    assert half["txt_r1"] == half["txt_r2"] == 50 and half["txt_r3"] == 100
    assert half["img_r1"] == 50 and half["img_r2"] == 100


# ---------------------------------------------------------------------------------------------
# captioning end to end: Ray Data actor pool, COCO scores, MLflow child run, artifacts, a bad image


def eval_folder(tmp_path, count: int = 10, broken: bool = True):
    """A folder of real Flickr8k photos + captions.json, with one unreadable 'photo' listed too."""
    captions = json.loads((FLICKR / "captions.json").read_text())
    names = sorted(captions)[:count]
    folder = tmp_path / "photos"
    folder.mkdir()
    listing = {}
    for name in names:
        shutil.copy(FLICKR / "images" / name, folder / name)
        listing[name] = captions[name]
    if broken:
        (folder / "broken.jpg").write_bytes((FLICKR / "images" / names[0]).read_bytes()[:300])
        listing["broken.jpg"] = ["a photo cut off after 300 bytes"]
    (tmp_path / "captions.json").write_text(json.dumps(listing))
    return folder, tmp_path / "captions.json", names


def test_caption_evaluation_end_to_end(ray_session, chains, tmp_path, capsys):
    from PIL import Image

    from jobs import evaluate

    chain = chains["opt"]
    folder, listing, names = eval_folder(tmp_path)
    code = evaluate.main(["--task", "caption", "--checkpoint", chain["stage2"]["checkpoint"], "--images", str(folder),
                          "--captions", str(listing), "--out", str(tmp_path / "out"), "--num-beams", "3",
                          "--max-new-tokens", "12", "--min-new-tokens", "2", "--num-actors", "2",
                          "--summary", str(tmp_path / "summary.json")])
    printed = capsys.readouterr().out
    assert code == 0, printed
    summary = json.loads((tmp_path / "summary.json").read_text())
    # The COCO results file: one caption per readable photo, keyed by file name.
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert sorted(r["image_id"] for r in results) == names
    assert all(isinstance(r["caption"], str) and r["caption"] for r in results)
    # The unreadable photo was skipped and reported with its file and reason, not raised.
    assert summary["images_skipped"] == 1
    assert summary["skipped"][0]["id"] == "broken.jpg" and summary["skipped"][0]["reason"].startswith("corrupt_image")
    assert "broken.jpg" in printed and "skipped 1 unreadable image" in printed
    # pycocoevalcap metrics against each photo's 5 references, per image too.
    metrics = summary["metrics"]
    assert set(metrics) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE"}
    assert 0 < metrics["Bleu_1"] <= 1 and metrics["SPICE"] is None
    per_image = json.loads((tmp_path / "out" / "per_image.json").read_text())
    assert set(per_image) == set(names) and all(len(v["references"]) == 5 for v in per_image.values())
    # The grid picture is a valid PNG of the sampled images.
    with Image.open(tmp_path / "out" / "samples.png") as img:
        img.verify()
    with Image.open(tmp_path / "out" / "samples.png") as img:
        assert img.format == "PNG" and img.width > 400 and img.height > 400
    # MLflow: a finished child run of the stage-2 training run, with the metrics and the artifacts.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=chain["mlflow_uri"])
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == chain["stage2"]["mlflow_run_id"]
    assert run.data.metrics["CIDEr"] == pytest.approx(metrics["CIDEr"])
    assert run.data.metrics["images_skipped"] == 1 and "SPICE" not in run.data.metrics
    assert run.data.params["eval_caption.num_beams"] == "3"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results.json", "per_image.json", "samples.png", "metrics.json"} <= artifacts


def test_batched_generation_matches_one_image_at_a_time(chains):
    """Rows with prompts of different lengths share a batch (padding on the left of the soft prompt):
    each row must get exactly the text it gets alone."""
    import torch

    from app.data.transforms import decode_image, transform_image
    from app.evaluation.model import GenerationOptions, TrainedBLIP2

    model = TrainedBLIP2.from_checkpoint(chains["opt"]["stage2"]["checkpoint"], device="cpu")
    names = sorted(os.listdir(FLICKR / "images"))[:3]
    pixels = torch.from_numpy(np.stack([transform_image(decode_image((FLICKR / "images" / n).read_bytes())[0],
                                                        model.image_size, train=False) for n in names]))
    prompts = ["Question: what is in the picture? Short answer:", "a photo of", ""]
    options = GenerationOptions(num_beams=1, max_new_tokens=8, min_new_tokens=1)
    batched = model.generate_ids(pixels, prompts, options)
    for i in range(3):
        alone = model.generate_ids(pixels[i:i + 1], prompts[i:i + 1], options)[0]
        row = batched[i][: len(alone)]
        assert torch.equal(row, alone), (i, row, alone)
        assert (batched[i][len(alone):] == model.llm_tokenizer.pad_token_id).all()


def test_vqa_end_to_end_in_the_vqav2_layout(ray_session, chains, tmp_path):
    from app.evaluation.inference import InferenceSettings
    from app.evaluation.tasks import EvalRun, EvalSource, evaluate_vqa

    chain = chains["opt"]
    photos = sorted(os.listdir(FLICKR / "images"))[:4]
    folder = tmp_path / "val2014"
    folder.mkdir()
    questions, annotations = [], []
    for i, name in enumerate(photos, start=1):
        shutil.copy(FLICKR / "images" / name, folder / f"COCO_val2014_{i:012d}.jpg")
        for j, (question, answer, kind) in enumerate([("is there a person?", "yes", "yes/no"),
                                                      ("how many dogs are there?", "one", "number")]):
            qid = i * 10 + j
            questions.append({"image_id": i, "question": question, "question_id": qid})
            annotations.append({"question_id": qid, "image_id": i, "answer_type": kind,
                                "answers": [{"answer": answer, "answer_id": k} for k in range(10)]})
    (tmp_path / "q.json").write_text(json.dumps({"questions": questions}))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": annotations}))
    run = EvalRun(checkpoint=chain["stage2"]["checkpoint"], out_dir=str(tmp_path / "out"),
                  settings=InferenceSettings(batch_size=4, num_actors=1))
    summary = evaluate_vqa(run, EvalSource(questions=str(tmp_path / "q.json"), annotations=str(tmp_path / "a.json"),
                                           images=str(folder)))
    assert summary["metric"] == "vqa" and summary["metrics"]["questions"] == 8
    per_question = json.loads((tmp_path / "out" / "per_question.json").read_text())
    assert len(per_question) == 8
    for entry in per_question.values():  # each accuracy is what the official rule gives for that prediction
        assert entry["accuracy"] == vqa_accuracy(entry["prediction"], entry["answers"])
    expected = 100 * sum(e["accuracy"] for e in per_question.values()) / 8
    assert summary["metrics"]["vqa_accuracy"] == pytest.approx(expected, abs=0.01)
    assert {"vqa_accuracy_yes_no", "vqa_accuracy_number"} <= set(summary["metrics"])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert sorted(r["question_id"] for r in results) == sorted(q["question_id"] for q in questions)


def test_the_demo_s_vqa_files_score_through_jobs_evaluate(ray_session, chains, tmp_path):
    """The VQAv2-format questions the demo writes about its drawn pictures, scored by `jobs.evaluate --task vqa`
    as a user runs it on VQAv2 (the image pattern of the drawn files): every question answered, each accuracy
    the official rule's for its prediction, one metric per question kind."""
    from app.demo.assets import _write_images, write_vqa
    from app.demo.shapes import scene_captions
    from jobs import evaluate

    drawn = scene_captions(4, captions_per_image=2, seed=7)
    _write_images(tmp_path / "images" / "val", drawn)
    paths = write_vqa(tmp_path, "val", [s for s, _ in drawn], [c for _, c in drawn], seed=0)
    code = evaluate.main(["--task", "vqa", "--checkpoint", chains["opt"]["stage2"]["checkpoint"],
                          "--questions", paths["vqa_val_questions"], "--annotations", paths["vqa_val_annotations"],
                          "--images", paths["vqa_val_images"], "--image-pattern", "{image_id:06d}.png",
                          "--out", str(tmp_path / "out"), "--summary", str(tmp_path / "summary.json"), "--no-mlflow",
                          "--num-actors", "1"])
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    asked = json.loads(Path(paths["vqa_val_annotations"]).read_text())["annotations"]
    assert summary["metrics"]["questions"] == len(asked) == 12 and summary["images_skipped"] == 0
    per_question = json.loads((tmp_path / "out" / "per_question.json").read_text())
    for entry in per_question.values():
        assert entry["accuracy"] == vqa_accuracy(entry["prediction"], entry["answers"])
    kinds = {a["answer_type"] for a in asked}
    assert {f"vqa_accuracy_{kind}" for kind in kinds} <= set(summary["metrics"])


def test_retrieval_end_to_end_on_a_stage1_checkpoint(ray_session, chains, tmp_path):
    from app.evaluation.inference import InferenceSettings
    from app.evaluation.tasks import EvalRun, EvalSource, evaluate_retrieval_task

    chain = chains["opt"]
    folder, listing, names = eval_folder(tmp_path, count=8, broken=False)
    run = EvalRun(checkpoint=chain["stage1"]["checkpoint"], out_dir=str(tmp_path / "out"),
                  settings=InferenceSettings(batch_size=8, num_actors=1))
    summary = evaluate_retrieval_task(run, EvalSource(images=str(folder), captions=str(listing)), k=4)
    assert summary["images"] == 8 and summary["texts"] == 40
    for scores in (summary["metrics"], summary["itc_only"]):
        assert {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"} <= set(scores)
        assert all(0 <= v <= 100 for v in scores.values())
        assert scores["img_r10"] == 100  # only 8 images: every caption's image is within the top 10
    from mlflow.tracking import MlflowClient

    run_data = MlflowClient(tracking_uri=chain["mlflow_uri"]).get_run(summary["mlflow_run_id"])
    assert run_data.data.tags["mlflow.parentRunId"] == chain["stage1"]["mlflow_run_id"]
    assert run_data.data.metrics["img_r1"] == summary["metrics"]["img_r1"]


# ---------------------------------------------------------------------------------------------
# the caption command


def _caption(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "jobs.caption", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "RAY_ADDRESS": ""})


def test_caption_command_on_one_jpeg_and_bad_checkpoints(chains, pformer_checkpoint, tmp_path, capsys):
    from jobs import caption

    photo = FLICKR / "images" / sorted(os.listdir(FLICKR / "images"))[0]
    done = _caption("--checkpoint", chains["opt"]["stage2"]["checkpoint"], photo, "--num-beams", "2",
                    "--max-new-tokens", "10")
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(done.stdout.strip().splitlines()) == 1 and done.stdout.strip()
    # A run folder works too (its latest checkpoint).
    run_folder = os.path.dirname(chains["opt"]["stage2"]["checkpoint"])
    again = _caption("--checkpoint", run_folder, photo, "--num-beams", "2", "--max-new-tokens", "10")
    assert again.returncode == 0 and again.stdout == done.stdout

    # Bad input: exit 2 with one line (in this process, through the same harness).
    (tmp_path / "not.jpg").write_bytes(b"<html>404</html>")
    for checkpoint, image, message in (
            (tmp_path / "no-such-run", photo, "no such checkpoint or run folder"),
            (pformer_checkpoint["opt"], photo,
             "is a stage 0 (P-Former) checkpoint; captioning needs a stage 2 (Q-Former + LLM) checkpoint"),
            (chains["opt"]["stage2"]["checkpoint"], tmp_path / "not.jpg", "not a readable image")):
        assert caption.main(["--checkpoint", str(checkpoint), str(image)]) == 2
        assert message in capsys.readouterr().err


def test_caption_command_on_a_folder_writes_jsonl(ray_session, chains, tmp_path, capsys):
    from jobs import caption

    folder, _, names = eval_folder(tmp_path, count=5)
    out = tmp_path / "captions.jsonl"
    code = caption.main(["--checkpoint", chains["opt"]["stage2"]["checkpoint"], str(folder), "--out", str(out),
                         "--num-beams", "2", "--max-new-tokens", "10", "--num-actors", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == names and all(r["caption"] for r in rows)
    assert "skipped 1 unreadable image" in captured.err and "broken.jpg" in captured.err


# ---------------------------------------------------------------------------------------------
# export to transformers' Blip2ForConditionalGeneration


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_export_round_trip_generates_the_same_ids(chains, kind, tmp_path, capfd):
    import torch
    from PIL import Image
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    from app import storage
    from app.data.transforms import decode_image, transform_image
    from app.evaluation.model import GenerationOptions, TrainedBLIP2
    from jobs import export

    chain = chains[kind]
    s3 = ["--s3-endpoint", chain["s3_endpoint"], "--s3-region", "us-east-1"] if chain["s3_endpoint"] else []
    checkpoint = chain["stage2"]["checkpoint"]  # the T5 one lives on S3
    register = ["--register", "pformer-blip2-tiny", "--summary", str(tmp_path / "export.json")] if kind == "opt" else []
    assert export.main(["--checkpoint", checkpoint, "--out", str(tmp_path / "hf"), *s3, *register]) == 0
    if register:  # logged to the stage-2 training run and registered as a model version
        from mlflow.tracking import MlflowClient

        info = json.loads((tmp_path / "export.json").read_text())
        client = MlflowClient(tracking_uri=chain["mlflow_uri"])
        assert info["mlflow_run_id"] == chain["stage2"]["mlflow_run_id"]
        logged = {a.path for a in client.list_artifacts(info["mlflow_run_id"], "hf_model")}
        assert {f"hf_model/{name}" for name in ("config.json", "generation_config.json", "model.safetensors",
                                                "processor_config.json", "tokenizer.json")} <= logged
        version = client.get_model_version("pformer-blip2-tiny", str(info["version"]))
        assert version.run_id == chain["stage2"]["mlflow_run_id"] and version.source.endswith("hf_model")

    hf = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    processor = Blip2Processor.from_pretrained(tmp_path / "hf")
    ours = TrainedBLIP2.from_checkpoint(checkpoint, storage.S3Options(chain["s3_endpoint"], "us-east-1"), device="cpu")
    names = sorted(os.listdir(FLICKR / "images"))[:2]
    photos = [decode_image((FLICKR / "images" / n).read_bytes())[0] for n in names]
    pixels = torch.from_numpy(np.stack([transform_image(p, ours.image_size, train=False) for p in photos]))
    inputs = processor(images=[Image.fromarray(p.numpy()) for p in pixels], text=[ours.prompt] * 2,
                       return_tensors="pt")
    options = GenerationOptions(num_beams=1, max_new_tokens=12, min_new_tokens=2)
    expected = ours.generate_ids(pixels, [ours.prompt] * 2, options)
    with torch.no_grad():
        got = hf.generate(**inputs, num_beams=1, max_new_tokens=12, min_new_tokens=2)
    if not ours.llm.is_encoder_decoder:
        got = got[:, inputs.input_ids.shape[1]:]  # decoder-only: the prompt ids come back first
    width = max(got.shape[1], expected.shape[1])
    pad = ours.llm_tokenizer.pad_token_id

    def padded(t):
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=pad)

    assert torch.equal(padded(got), padded(expected)), (got, expected)
    # BLIP-2's trained ln_vision is the exported tower's post_layernorm.
    for name in ("weight", "bias"):
        assert torch.equal(getattr(hf.vision_model.post_layernorm, name), getattr(ours.qformer.ln_vision, name))
    # The LLM's generation defaults travel with the model: the project's stop ids and BLIP-2's lengths.
    defaults = hf.language_model.generation_config
    assert list(np.atleast_1d(defaults.eos_token_id)) == ours.stop_token_ids()
    assert (defaults.max_new_tokens, defaults.min_new_tokens) == (30, 8)

    if kind == "t5":  # stages 1-2 on S3 and the export, with marker credentials in every process's environment
        import ray

        mlflow_db = Path(chain["mlflow_uri"].removeprefix("sqlite:///"))
        session = Path(ray._private.worker.global_worker.node.get_session_dir_path())
        leaks = credential_leaks(folders=[mlflow_db.parent, tmp_path, session / "logs"],
                                 texts={"output": "".join(capfd.readouterr())}, s3_endpoint=chain["s3_endpoint"])
        assert not leaks, leaks[:10]


def test_export_refuses_a_stage1_checkpoint(chains, tmp_path):
    done = subprocess.run([sys.executable, "-m", "jobs.export", "--checkpoint", chains["opt"]["stage1"]["checkpoint"],
                           "--out", tmp_path / "x"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "is a stage 1 (Q-Former) checkpoint; export to Blip2ForConditionalGeneration needs a stage 2" in done.stderr
