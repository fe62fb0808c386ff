"""The pipeline job: stage 0 -> 1 -> 2 -> caption evaluation for the P-Former arm and the BLIP-2 baseline.
The embedded demo runs as a user runs it, then again wired to real Flickr8k shards by overrides only, with
the first run's stage 0 given and a picture subset (one cell of the data-scaling driver)."""

import json
from pathlib import Path

import pytest

from app.config import ConfigError
from app.pipeline import load_pipeline_config

from conftest import LOCAL_MODE, ROOT

DEMO = ROOT / "configs" / "demo.yaml"


def test_bad_pipeline_configs_fail_before_anything_runs():
    with pytest.raises(ConfigError, match=r"unknown config key 'stage1.train.max_stepz' \(did you mean 'stage1.train.max_steps'"):
        load_pipeline_config(DEMO, ["stage1.train.max_stepz=3"])
    with pytest.raises(ConfigError, match="keys start with one of pipeline, common, stage0"):
        load_pipeline_config(DEMO, ["stage9.train.max_steps=3"])
    with pytest.raises(ConfigError, match=r"pipeline.arms: unknown arm\(s\) \['clip'\]"):
        load_pipeline_config(DEMO, ["pipeline.arms=[pformer, clip]"])
    with pytest.raises(ConfigError, match="pipeline.num_beams"):
        load_pipeline_config(DEMO, ["pipeline.num_beams=0"])
    with pytest.raises(ConfigError, match=r"vqa_annotations and vqa_images together \(pipeline.vqa_images unset\)"):
        load_pipeline_config(DEMO, ["pipeline.vqa_images=null"])
    with pytest.raises(ConfigError, match="pipeline.vqa_template must contain"):
        load_pipeline_config(DEMO, ["pipeline.vqa_template=Question"])
    with pytest.raises(ConfigError, match="unknown config key 'demo.num_linez'"):
        load_pipeline_config(DEMO, ["demo.num_linez=3"])
    # Overrides and stage configs share one dotted-key reader, old keys included.
    assert load_pipeline_config(DEMO, ["common.data.num_frames=4"]).stage_config("stage1").model.num_frames == 4
    config = load_pipeline_config(DEMO, ["common.model.num_query_tokens=16"])
    assert {config.stage_config(k).model.num_query_tokens for k in ("stage0", "stage1", "stage2")} == {16}
    assert config.stage_config("stage1").stage == "qformer" and config.stage_config("stage2").loss.align_weight == 100


def check_arm_checkpoints(storage, summary, arm, pformer):
    stage1, stage2 = summary["arms"][arm]["stage1"], summary["arms"][arm]["stage2"]
    for stage in (stage1, stage2):
        manifest = json.loads((storage / stage["run_name"] / stage["checkpoint"].rsplit("/", 1)[1]
                               / "manifest.json").read_text())
        assert manifest["frozen"]["pformer"] == pformer
    assert manifest["init_from"]["qformer"] == stage1["checkpoint"]
    assert manifest["align_weight"] == (100 if pformer else 0)


def stage_children(client, summary) -> dict:
    experiment = client.get_run(summary["parent_run_id"]).info.experiment_id
    children = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'")
    return {run.info.run_name: run for run in children}


@pytest.mark.slow
def test_demo_pipeline_then_real_shards_by_overrides_reusing_the_assets_and_stage0(ray_session, tmp_path, monkeypatch,
                                                                                 capsys, flickr_shards):
    """First the embedded default as a user runs it (both arms, its own stage 0); then the same config on real
    Flickr8k shards by overrides only, as one cell of the data-scaling driver runs it (the first run's stage 0
    given, `common.data.train_pictures`): it finds the generated assets and is a new parent run beside the first."""
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from app.demo.assets import asset_fingerprint
    from jobs import pipeline

    monkeypatch.chdir(tmp_path)  # the demo config's relative paths (.demo/, ./checkpoints, mlflow.db) land here
    smaller = ["demo.num_lines=2000", "demo.num_train_images=40", "demo.num_val_images=6", "demo.vision_steps=5",
               "demo.llm_steps=20", "pipeline.eval_limit=4", "pipeline.num_beams=1", "pipeline.max_new_tokens=4",
               "pipeline.min_new_tokens=1", "common.train.batch_size_per_worker=8", "common.train.warmup_steps=1",
               "common.train.log_every_steps=1", "common.data.val_max_batches=1", f"common.{LOCAL_MODE}"]
    for stage in ("stage0", "stage1", "stage2"):
        smaller += [f"{stage}.train.max_steps=2", f"{stage}.train.checkpoint_every_steps=2"]
    assert pipeline.main(["--config", str(DEMO), "--summary", "demo.json", *smaller]) == 0
    first_out = capsys.readouterr().out
    demo = json.loads((tmp_path / "demo.json").read_text())
    assets = asset_fingerprint(tmp_path / ".demo")
    assert "[demo] assets ready in .demo" in first_out and "reusing" not in first_out
    assert {"models/READY.json", "shards/READY.json"} <= set(assets)
    client = MlflowClient(tracking_uri=demo["tracking_uri"])
    parent = client.get_run(demo["parent_run_id"])
    assert parent.info.status == "FINISHED"
    # Stage 0 once (for the P-Former arm), every stage of every arm and each evaluation: children of one parent.
    names = stage_children(client, demo)
    invocation = demo["invocation"]
    assert not demo["stage0"].get("reused") and "lm_loss" in names[f"{invocation}-stage0"].data.metrics
    for arm in ("pformer", "blip2"):
        assert "itc_loss" in names[f"{invocation}-{arm}-stage1"].data.metrics
        assert "lm_loss" in names[f"{invocation}-{arm}-stage2"].data.metrics
        # The baseline arm has no alignment term; the P-Former arm has it in both stages.
        for stage in ("stage1", "stage2"):
            assert ("align_loss" in names[f"{invocation}-{arm}-{stage}"].data.metrics) == (arm == "pformer")
    tags = sorted(r.data.tags.get("stage") for r in names.values())
    assert tags == ["evaluate"] * 4 + ["llm", "llm", "pformer", "qformer", "qformer"]  # captions and VQA per arm
    evaluations = [r.data.metrics for r in names.values() if r.data.tags.get("stage") == "evaluate"]
    assert sum("CIDEr" in m for m in evaluations) == sum("vqa_accuracy" in m for m in evaluations) == 2
    # The parent holds the comparison table and the plot.
    out = Path(demo["outputs"])
    assert {"comparison.png", "comparison.md", "comparison.json", "summary.json"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}
    with Image.open(out / "comparison.png") as img:
        assert img.format == "PNG" and img.width > 600
    table = json.loads((out / "comparison.json").read_text())
    assert [row["arm"] for row in table] == ["pformer", "blip2", "random captions", "grammar captions (ceiling)",
                                             "blind LLM (question only)", "oracle LLM (true caption as text)"]
    for arm in ("pformer", "blip2"):
        assert {"Bleu_4", "METEOR", "ROUGE_L", "CIDEr"} <= set(demo["arms"][arm]["eval"]["metrics"])
        # Zero-shot VQA on the demo's validation questions (3 per picture), scored per question kind.
        vqa = demo["arms"][arm]["vqa"]["metrics"]
        assert vqa["questions"] == 3 * 6 and table[0 if arm == "pformer" else 1]["vqa_accuracy"] == vqa["vqa_accuracy"]
        assert {"color", "shape"} <= set(demo["arms"][arm]["eval"]["attributes"])
    assert table[3]["CIDEr"] > 0 and table[4]["vqa_accuracy"] is not None and table[4]["CIDEr"] is None
    # The random-captions row scores the same references with the captions of other images, with every metric
    # the arms have; the table reports the summary's numbers.
    assert set(demo["random_baseline"]) >= {"Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    assert [table[2][k] for k in ("Bleu_4", "CIDEr")] == [demo["random_baseline"][k] for k in ("Bleu_4", "CIDEr")]
    # Checkpoints chain: each arm's stage 2 started from its own stage 1; only the P-Former arm uses stage 0.
    for arm in ("pformer", "blip2"):
        check_arm_checkpoints(tmp_path / "checkpoints", demo, arm, demo["stage0"]["checkpoint"] if arm == "pformer" else None)

    # Again, on real shards by overrides, with the first run's stage 0 and the first 8 pictures.
    stage0 = demo["stage0"]["checkpoint"]
    assert pipeline.main(["--config", str(DEMO), "--summary", "cell.json", *smaller, "pipeline.name=cell",
                          f"common.data.train={flickr_shards}", f"common.data.val={flickr_shards}",
                          f"pipeline.stage0_checkpoint={stage0}", "common.data.train_pictures=8",
                          "common.data.shuffle_buffer_rows=0", "pipeline.arms=[pformer]"]) == 0
    second_out = capsys.readouterr().out
    cell = json.loads((tmp_path / "cell.json").read_text())
    # It found the generated corpus, shards and tiny models and rebuilt nothing.
    assert "[demo] reusing the assets prepared earlier in .demo" in second_out and "drawing" not in second_out
    assert asset_fingerprint(tmp_path / ".demo") == assets
    assert cell["stage0"] == {"stage": "pformer", "checkpoint": stage0, "reused": True}
    parent = client.get_run(cell["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["stage0_checkpoint"] == stage0
    names = stage_children(client, cell)
    assert sorted(r.data.tags.get("stage") for r in names.values()) == ["evaluate", "evaluate", "llm", "qformer"]  # no stage 0
    for stage in ("stage1", "stage2"):
        run = names[f"{cell['invocation']}-pformer-{stage}"]
        assert run.data.params["data.train_pictures"] == "8" and run.data.params["data.train"] == str(flickr_shards)
    check_arm_checkpoints(tmp_path / "checkpoints", cell, "pformer", stage0)
    # Each invocation is its own parent run, in the same experiment; the UI command opens its runs table.
    experiment = parent.info.experiment_id
    assert client.get_run(demo["parent_run_id"]).info.experiment_id == experiment
    parents = client.search_runs([experiment], filter_string="tags.stage = 'pipeline'")
    assert {run.info.run_id for run in parents} == {demo["parent_run_id"], cell["parent_run_id"]}
    assert "mlflow ui --backend-store-uri" in second_out
    assert f"then open http://127.0.0.1:5000/#/experiments/{experiment}/runs" in second_out
