"""The data-scaling measurement: the driver's grid and resume bookkeeping, the nested picture subsets
(`data.train_pictures`) on real shards, training on exactly N pictures (counted by the image ids the
stage-1 training stream carries), and a held-out test set whose scenes appear in neither the training
nor the validation pictures. A grid cell through the pipeline (a given stage-0 checkpoint, a picture subset)
is the second half of tests/test_pipeline.py::test_demo_pipeline_then_real_shards_by_overrides_reusing_the_assets_and_stage0."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter

import pytest

from app.config import ConfigError, load_config
from app.data.sources import first_pictures, image_id_number, iter_tar_samples, picture_name

from conftest import FLICKR, ROOT, mlflow_store, photo, stage_args, write_tar

SPEC = importlib.util.spec_from_file_location("data_scaling", ROOT / "bench" / "data_scaling.py")
data_scaling = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(data_scaling)


# ---------------------------------------------------------------------------------------------
# the grid and its resume


def test_the_grid_has_every_arm_size_and_seed_once_seed_by_seed():
    grid = data_scaling.plan("opt", data_scaling.PICTURES, data_scaling.SEEDS)
    assert len(grid) == 5 * 2 * 3
    assert len({r["key"] for r in grid}) == len(grid)
    assert {(r["arm"], r["pictures"], r["seed"]) for r in grid} == {
        (a, n, s) for a in ("pformer", "blip2") for n in (125, 250, 500, 1000, 2000) for s in (0, 1, 2)}
    seeds = [r["seed"] for r in grid]
    assert seeds == sorted(seeds)  # whole curves for the first seeds when a grid is stopped


def _finished(llm, arm, n, seed, cider):
    return {"llm": llm, "arm": arm, "pictures": n, "seed": seed, "status": "finished",
            "metrics": {"CIDEr": cider, "Bleu_4": 0.1, "METEOR": 0.2, "ROUGE_L": 0.3},
            "random_baseline": {"CIDEr": 0.4 + seed / 100}, "stage2": {"val_lm_loss_start": 1.0, "val_lm_loss_end": 0.7},
            "seconds": 10.0}


def test_a_restart_skips_finished_runs_and_retries_failed_ones(tmp_path, capsys):
    out = tmp_path / "scaling.json"
    results = data_scaling.load_results(out)
    grid = data_scaling.plan("opt", [125, 250], [0])
    results["runs"][grid[0]["key"]] = _finished("opt", grid[0]["arm"], 125, 0, 1.0)
    results["runs"][grid[1]["key"]] = {"status": "failed", "error": "OSError: disk full"}
    data_scaling.save_results(out, results)
    again = data_scaling.load_results(out)
    assert [r["key"] for r in data_scaling.pending(grid, again)] == [r["key"] for r in grid[1:]]

    # The driver itself: with every run of the grid finished it trains nothing (and says so).
    for run in grid:
        again["runs"][run["key"]] = _finished("opt", run["arm"], run["pictures"], 0, 1.0)
    data_scaling.save_results(out, again)
    code = data_scaling.main(["--out", str(out), "--pictures", "125", "250", "--seeds", "0",
                              "--storage", str(tmp_path / "ckpt")])
    printed = capsys.readouterr().out
    assert code == 0
    assert "4 runs in the grid, 4 finished, 0 to run" in printed
    assert not (tmp_path / "ckpt").exists()
    assert out.with_suffix(".png").stat().st_size > 0 and "| opt | blip2 | 125 | 1 |" in out.with_suffix(".md").read_text()


def test_summary_pairs_seeds_calls_a_difference_real_only_beyond_both_spreads_and_finds_the_gap():
    runs = {}
    cider = {  # (arm, N) -> CIDEr per seed
        ("pformer", 125): (0.90, 0.92, 0.94), ("blip2", 125): (0.70, 0.72, 0.74),  # real: +0.2, sds 0.02
        ("pformer", 2000): (1.00, 1.30, 0.70), ("blip2", 2000): (0.95, 1.00, 1.05),  # noise: +0.0, sd 0.3
    }
    for (arm, n), values in cider.items():
        for seed, value in enumerate(values):
            runs[data_scaling.run_key("opt", arm, n, seed)] = _finished("opt", arm, n, seed, value)
    summary = data_scaling.summarise({"runs": runs, "stage0": {}, "failures": []})
    diffs = {d["pictures"]: d for d in summary["differences"]}
    assert diffs[125]["mean"] == pytest.approx(0.2) and diffs[125]["real"] and diffs[125]["same_sign"]
    assert not diffs[2000]["real"] and not diffs[2000]["same_sign"]
    # blip2 at N = 2000 has mean 1.0; pformer reaches it first at N = 2000 (mean 1.0), not at 125 (0.92).
    assert summary["gap"]["opt"] == 2000
    assert summary["random_CIDEr"] == (pytest.approx(0.40), pytest.approx(0.42))
    assert data_scaling.largest_difference({"runs": runs}) == 125


# ---------------------------------------------------------------------------------------------
# the picture subsets


def _two_caption_shards(tmp_path, pictures: int = 9, per_shard: int = 4):
    """WebDataset shards of real Flickr8k photos, two samples (captions) per picture sharing an image_id,
    `per_shard` pictures per shard, as jobs.make_shards writes them; the first shard has one unusable
    sample that must not count as a picture."""
    captions = json.loads((FLICKR / "captions.json").read_text())
    names = sorted(captions)
    samples = []
    for i in range(pictures):
        for c in range(2):
            meta = {"captions": [captions[names[i]][c]], "image_id": names[i]}
            samples.append((f"{i:04d}_{c}", {"jpg": photo(i), "json": json.dumps(meta).encode()}))
    samples.insert(1, ("0000_x", {"txt": b"a caption without its image"}))
    root = tmp_path / "shards"
    root.mkdir()
    chunk = 2 * per_shard
    bounds = [(0, chunk + 1)] + [(s + 1, s + chunk + 1) for s in range(chunk, len(samples), chunk)]
    for k, (lo, hi) in enumerate(bounds):
        write_tar(root / f"shard-{k:03d}.tar", samples[lo:hi])
    return root, names[:pictures]


def test_picture_subsets_are_nested_first_in_file_order_and_read_only_the_shards_they_need(tmp_path):
    root, names = _two_caption_shards(tmp_path)
    subsets = {n: first_pictures(str(root), n) for n in (1, 4, 5, 9)}
    for n, subset in subsets.items():
        assert subset.pictures == frozenset(names[:n])
        assert subset.samples == 2 * n
    assert subsets[1].pictures < subsets[4].pictures < subsets[5].pictures < subsets[9].pictures
    files = {n: [p for _, paths in s.by_format for p in paths] for n, s in subsets.items()}
    assert [len(files[n]) for n in (1, 4, 5, 9)] == [1, 1, 2, 3] and subsets[9].shards_total == 3
    assert "the first 5 pictures (10 samples)" in subsets[5].describe()
    with pytest.raises(ValueError, match="data.train_pictures is 10 but the 3 shard file.s. .* hold 9 usable pictures"):
        first_pictures(str(root), 10)


def test_parquet_subsets_name_pictures_by_key_and_read_only_theirs(ray_session, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from app.data.sources import read_image_text

    captions = json.loads((FLICKR / "captions.json").read_text())
    names = sorted(captions)[:6]
    for part, chunk in enumerate((names[:3], names[3:])):
        pq.write_table(pa.table({"key": chunk, "image": [(FLICKR / "images" / n).read_bytes() for n in chunk],
                                 "caption": [captions[n][0] for n in chunk]}), tmp_path / f"part-{part}.parquet")
    subset = first_pictures(str(tmp_path), 4)
    assert subset.samples == 4 and len(subset.by_format[0][1]) == 2
    rows = read_image_text(str(tmp_path), subset=subset).take_all()
    assert sorted(r["key"] for r in rows) == names[:4]
    pq.write_table(pa.table({"image": [b"x"], "caption": ["c"]}), tmp_path / "part-2.parquet")
    with pytest.raises(ValueError, match="neither a 'key' nor an 'image_id' column"):
        first_pictures(str(tmp_path), 7)


def test_stage1_trains_on_exactly_the_first_n_pictures(ray_session, flickr_shards, tiny_models, tiny_vision, tmp_path,
                                                      capsys):
    """The training stream stage 1 hands to Ray Train, read to its end: every image id it carries is one of
    the first N pictures of the real Flickr8k shards, each with all 5 of its captions."""
    from app import storage
    from app.stages import get_stage

    expected = []
    for path in sorted(flickr_shards.glob("*.tar")):
        with open(path, "rb") as f:
            for row in iter_tar_samples(f, str(path)):
                if picture_name(row) not in expected:
                    expected.append(picture_name(row))
    n = 20
    items = stage_args(tmp_path, tiny_models, tiny_vision, mlflow_store(tmp_path / "mlflow.db"), **{
        "data.train": str(flickr_shards), "data.train_pictures": n, "loss.align_weight": 0,
        "loss.itc_same_image_positives": "true"})
    cfg = load_config(ROOT / "configs" / "tiny" / "stage1.yaml", items)
    stage = get_stage("qformer")
    cfg = stage.validate(cfg, storage.S3Options())
    train = stage.datasets(cfg, None, storage.S3Options())["train"]
    seen = Counter(int(i) for batch in train.iter_batches(batch_size=64, batch_format="numpy") for i in batch["image_id"])
    assert set(seen) == {image_id_number({"image_id": name}) for name in expected[:n]}
    assert sorted(seen.values()) == [5] * n  # every caption of each picture, none of any other
    assert f"data.train_pictures={n}: training on the first {n} pictures ({5 * n} samples)" in capsys.readouterr().out

    too_many = load_config(ROOT / "configs" / "tiny" / "stage1.yaml", [*items, "data.train_pictures=49"])
    with pytest.raises(ConfigError, match="data.train_pictures is 49 but .* hold 48 usable pictures"):
        stage.validate(too_many, storage.S3Options())
    cached = load_config(ROOT / "configs" / "tiny" / "stage1.yaml", [*items, f"data.train_features={tmp_path}"])
    with pytest.raises(ConfigError, match="a feature cache .* is read whole"):
        stage.picture_subset(cached, storage.S3Options())


# ---------------------------------------------------------------------------------------------
# the held-out test pictures


def test_test_scenes_are_new_and_the_exclusion_sees_the_drawn_pictures():
    from app.demo.shapes import image_text_pairs, novel_scene_captions, scene_captions, scene_key

    # scene_captions replays the drawing's random stream: the same captions as the pictures drawn.
    assert [texts for _, texts in image_text_pairs(20, seed=0)] == [texts for _, texts in scene_captions(20, seed=0)]
    train = [scene_key(s) for s, _ in scene_captions(2000, seed=0)]
    val = [scene_key(s) for s, _ in scene_captions(200, seed=1)]
    exclude = set(train) | set(val)
    test, dropped = novel_scene_captions(500, exclude, captions_per_image=5, seed=1000)
    keys = [scene_key(s) for s, _ in test]
    assert len(keys) == len(set(keys)) == 500 and not set(keys) & exclude
    assert all(len(texts) == 5 for _, texts in test)
    assert dropped["seen_in_train_or_val"] > 0  # the grammar repeats scenes: the deduplication does work
    # Replaying the seed gives every draw: the kept ones plus the dropped ones.
    again, dropped_again = novel_scene_captions(500, exclude, captions_per_image=5, seed=1000)
    assert [scene_key(s) for s, _ in again] == keys and dropped_again == dropped
    assert len(set(val) - set(train)) < len(set(val))  # validation shares scenes with training; test does not


def test_the_demo_t5_tokenizer_keeps_the_grammar_s_words_whole():
    """On the scene grammar (few distinct words) the unigram trainer alone left 87 pieces and spelled
    "picture" letter by letter; the tiny T5 then saw six words of a caption. Rich text keeps unigram."""
    from app.demo.shapes import corpus
    from app.models.tiny import train_llm_tokenizer

    from conftest import coco_captions

    tok = train_llm_tokenizer(corpus(5000), 500, "t5")
    text = "the picture shows one green circle at the top left"
    assert tok.tokenize(text) == ["▁" + word for word in text.split()]
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    assert tok(text).input_ids[-1] == tok.eos_token_id
    rich = train_llm_tokenizer(coco_captions(5000), 1000, "t5")
    assert type(rich.backend_tokenizer.model).__name__ == "Unigram" and len(rich) == 1000
