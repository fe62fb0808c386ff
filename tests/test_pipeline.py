"""The pipeline job: stage 0 -> 1 -> 2 -> caption evaluation for the P-Former arm and the BLIP-2 baseline:
wired to real Flickr8k shards by overrides only (with a given stage-0 checkpoint and a picture subset, as the
data-scaling driver runs it), and the embedded demo run twice (its own stage 0, then the baseline)."""

import json

import pytest

from app.config import ConfigError
from app.pipeline import load_pipeline_config

from conftest import ROOT, coco_subset, write_pformer_checkpoint

DEMO = ROOT / "configs" / "demo.yaml"


def real_data_overrides(tmp_path, tiny_models, tiny_vision, flickr_shards) -> list[str]:
    steps = {"stage0": 6, "stage1": 6, "stage2": 6}
    out = [f"common.run.storage_path={tmp_path / 'ckpt'}", f"common.mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
           f"common.data.text={coco_subset()}", f"common.data.train={flickr_shards}", f"common.data.val={flickr_shards}",
           f"common.model.pformer={tiny_models['bert']}", f"common.model.qformer={tiny_models['bert']}",
           f"common.model.llm={tiny_models['opt']}", f"common.model.vision={tiny_vision['blip2']}",
           "common.model.num_query_tokens=4", "common.train.batch_size_per_worker=8", "common.train.warmup_steps=2",
           "common.train.log_every_steps=3", "common.data.val_max_batches=1",
           "pipeline.eval_limit=6", "pipeline.num_beams=2", "pipeline.max_new_tokens=6", "pipeline.min_new_tokens=1",
           "pipeline.name=wiring"]
    for stage, n in steps.items():
        out += [f"{stage}.train.max_steps={n}", f"{stage}.train.checkpoint_every_steps={n}"]
    return out


def test_bad_pipeline_configs_fail_before_anything_runs():
    with pytest.raises(ConfigError, match=r"unknown config key 'stage1.train.max_stepz' \(did you mean 'stage1.train.max_steps'"):
        load_pipeline_config(DEMO, ["stage1.train.max_stepz=3"])
    with pytest.raises(ConfigError, match="keys start with one of pipeline, common, stage0"):
        load_pipeline_config(DEMO, ["stage9.train.max_steps=3"])
    with pytest.raises(ConfigError, match=r"pipeline.arms: unknown arm\(s\) \['clip'\]"):
        load_pipeline_config(DEMO, ["pipeline.arms=[pformer, clip]"])
    with pytest.raises(ConfigError, match="pipeline.num_beams"):
        load_pipeline_config(DEMO, ["pipeline.num_beams=0"])
    with pytest.raises(ConfigError, match="unknown config key 'demo.num_linez'"):
        load_pipeline_config(DEMO, ["demo.num_linez=3"])
    # Overrides and stage configs share one dotted-key reader, old keys included.
    assert load_pipeline_config(DEMO, ["common.data.num_frames=4"]).stage_config("stage1").model.num_frames == 4
    config = load_pipeline_config(DEMO, ["common.model.num_query_tokens=16"])
    assert {config.stage_config(k).model.num_query_tokens for k in ("stage0", "stage1", "stage2")} == {16}
    assert config.stage_config("stage1").stage == "qformer" and config.stage_config("stage2").loss.align_weight == 100


@pytest.mark.slow
def test_pipeline_on_real_data_by_overrides(ray_session, tmp_path, tiny_models, tiny_vision, flickr_shards):
    """Both arms on real Flickr8k shards, as one cell of the data-scaling driver: a given stage-0 checkpoint
    (no stage-0 run of its own) and `common.data.train_pictures`."""
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from jobs import pipeline

    pformer = write_pformer_checkpoint(tmp_path / "stage0" / "checkpoint_00000001", tiny_models, num_query_tokens=4)
    args = ["--config", str(DEMO), "--out", str(tmp_path / "out"), "--summary", str(tmp_path / "summary.json"),
            *real_data_overrides(tmp_path, tiny_models, tiny_vision, flickr_shards),
            f"pipeline.stage0_checkpoint={pformer}", "common.data.train_pictures=8", "common.data.shuffle_buffer_rows=0"]
    assert pipeline.main(args) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stage0"] == {"stage": "pformer", "checkpoint": pformer, "reused": True}
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["stage0_checkpoint"] == pformer
    # Every stage of every arm and each evaluation is a child run of the one parent, with its metrics.
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_name = {run.info.run_name: run for run in children}
    invocation = summary["invocation"]
    expected = {f"{invocation}-pformer-stage1": "itc_loss", f"{invocation}-pformer-stage2": "lm_loss",
                f"{invocation}-blip2-stage1": "itc_loss", f"{invocation}-blip2-stage2": "lm_loss"}
    for name, metric in expected.items():
        assert metric in by_name[name].data.metrics, name
        assert by_name[name].data.params["data.train_pictures"] == "8", name
    assert sorted(r.data.tags.get("stage") for r in children) == ["evaluate", "evaluate", "llm", "llm", "qformer", "qformer"]
    evals = [run for run in children if run.data.tags.get("stage") == "evaluate"]
    assert all("CIDEr" in run.data.metrics for run in evals)
    # The baseline arm has no alignment term; the P-Former arm has it in both stages.
    assert "align_loss" in by_name[f"{invocation}-pformer-stage1"].data.metrics
    assert "align_loss" in by_name[f"{invocation}-pformer-stage2"].data.metrics
    assert "align_loss" not in by_name[f"{invocation}-blip2-stage1"].data.metrics
    assert "align_loss" not in by_name[f"{invocation}-blip2-stage2"].data.metrics
    # The parent holds the comparison table and the plot.
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"comparison.png", "comparison.md", "comparison.json", "summary.json"} <= artifacts
    with Image.open(tmp_path / "out" / "comparison.png") as img:
        assert img.format == "PNG" and img.width > 600
    table = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert [row["arm"] for row in table] == ["pformer", "blip2", "random captions"]
    for arm in ("pformer", "blip2"):
        assert {"Bleu_4", "METEOR", "ROUGE_L", "CIDEr"} <= set(summary["arms"][arm]["eval"]["metrics"])
    # The random-captions row scores the same references with the captions of other images, with every metric
    # the arms have; the table reports the summary's numbers.
    assert set(summary["random_baseline"]) >= {"Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    assert [table[2][k] for k in ("Bleu_4", "CIDEr")] == [summary["random_baseline"][k] for k in ("Bleu_4", "CIDEr")]
    # Checkpoints chain: each arm's stage 2 started from its own stage 1; only the P-Former arm uses stage 0.
    for arm in ("pformer", "blip2"):
        check_arm_checkpoints(tmp_path / "ckpt", summary, arm, pformer if arm == "pformer" else None)


def check_arm_checkpoints(storage, summary, arm, pformer):
    stage1, stage2 = summary["arms"][arm]["stage1"], summary["arms"][arm]["stage2"]
    for stage in (stage1, stage2):
        manifest = json.loads((storage / stage["run_name"] / stage["checkpoint"].rsplit("/", 1)[1]
                               / "manifest.json").read_text())
        assert manifest["frozen"]["pformer"] == pformer
    assert manifest["init_from"]["qformer"] == stage1["checkpoint"]
    assert manifest["align_weight"] == (100 if pformer else 0)


@pytest.mark.slow
def test_demo_pipeline_twice_reuses_the_generated_assets_and_starts_a_new_parent_run(ray_session, tmp_path,
                                                                                    monkeypatch, capsys):
    """The embedded default as a user runs it, twice: the P-Former arm (with its own stage 0), then the
    baseline arm; the second run finds the generated assets and is a new parent run beside the first."""
    from mlflow.tracking import MlflowClient

    from app.demo.assets import asset_fingerprint
    from jobs import pipeline

    monkeypatch.chdir(tmp_path)  # the demo config's relative paths (.demo/, ./checkpoints, mlflow.db) land here
    smaller = ["demo.num_lines=2000", "demo.num_train_images=40", "demo.num_val_images=6", "demo.vision_steps=5",
               "pipeline.eval_limit=4", "pipeline.num_beams=1", "pipeline.max_new_tokens=4",
               "pipeline.min_new_tokens=1", "common.train.batch_size_per_worker=8", "common.train.warmup_steps=1",
               "common.train.log_every_steps=1", "common.data.val_max_batches=1"]
    for stage in ("stage0", "stage1", "stage2"):
        smaller += [f"{stage}.train.max_steps=2", f"{stage}.train.checkpoint_every_steps=2"]
    summaries, outputs, assets = [], [], []
    for i, arm in enumerate(("pformer", "blip2")):
        assert pipeline.main(["--config", str(DEMO), "--summary", f"summary{i}.json", *smaller,
                              f"pipeline.arms=[{arm}]"]) == 0
        outputs.append(capsys.readouterr().out)
        summaries.append(json.loads((tmp_path / f"summary{i}.json").read_text()))
        assets.append(asset_fingerprint(tmp_path / ".demo"))
    # The first run generated the corpus, shards and tiny models; the second found them and rebuilt nothing.
    assert "[demo] assets ready in .demo" in outputs[0] and "reusing" not in outputs[0]
    assert "[demo] reusing the assets prepared earlier in .demo" in outputs[1]
    assert "drawing" not in outputs[1]
    assert assets[0] == assets[1] and {"models/READY.json", "shards/READY.json"} <= set(assets[0])
    assert (tmp_path / ".demo" / "shards" / "train").is_dir() and (tmp_path / ".demo" / "models" / "opt").is_dir()
    # Each invocation is its own parent run with its own children, in the same experiment.
    first, second = (s["parent_run_id"] for s in summaries)
    assert first != second and summaries[0]["invocation"] != summaries[1]["invocation"]
    client = MlflowClient(tracking_uri=summaries[1]["tracking_uri"])
    assert summaries[0]["tracking_uri"] == summaries[1]["tracking_uri"]
    experiment = client.get_run(first).info.experiment_id
    assert client.get_run(second).info.experiment_id == experiment
    parents = client.search_runs([experiment], filter_string="tags.stage = 'pipeline'")
    assert {run.info.run_id for run in parents} == {first, second}
    for summary, arm in zip(summaries, ("pformer", "blip2")):
        children = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'")
        names = {run.info.run_name: run for run in children}
        stages = [f"{summary['invocation']}-{arm}-stage1", f"{summary['invocation']}-{arm}-stage2"]
        if arm == "pformer":  # the P-Former arm trains its own stage 0 first, and its stages align to it
            stages.append(f"{summary['invocation']}-stage0")
            assert "lm_loss" in names[f"{summary['invocation']}-stage0"].data.metrics
            assert not summary["stage0"].get("reused")
        assert set(names) >= set(stages)
        check_arm_checkpoints(tmp_path / "checkpoints", summary, arm,
                              summary["stage0"]["checkpoint"] if arm == "pformer" else None)
    assert "mlflow ui --backend-store-uri" in outputs[1]
    assert f"then open http://127.0.0.1:5000/#/experiments/{experiment}/runs" in outputs[1]
