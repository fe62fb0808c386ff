"""Tune sweeps (space files, checks, a real sweep on Ray) and cluster.yaml against Ray's own schema."""

import copy
import json
from pathlib import Path

import pytest
import yaml

from app.config import ConfigError
from app.sweep import (check_pipeline_space, check_stage_space, load_space, num_trials, param_space, parse_space)

from conftest import ROOT, STAGE1_CONFIG, stage_args

SPACES = ROOT / "tune_spaces"


# ---------------------------------------------------------------------------------------------
# cluster.yaml


def validate_cluster_config(config: dict) -> None:
    """What Ray's tests run on its example cluster YAMLs: fill the defaults, then check the schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_cluster_yaml_passes_rays_schema_and_misspelled_keys_fail():
    import jsonschema

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_cluster_config(config)
    # What the file promises: GPU worker types of 4 and 8 GPUs and a CPU type, all scaling from zero.
    types = config["available_node_types"]
    assert config["head_node_type"] == "head" and types["head"]["resources"] == {"CPU": 0}
    assert {"g5.12xlarge", "p4d.24xlarge"} <= {t["node_config"]["InstanceType"] for t in types.values()}
    assert all(t["min_workers"] == 0 for name, t in types.items() if name != "head")
    assert config["docker"]["image"].startswith("rayproject/ray:2.60.0-py311-gpu")
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in start and "mlflow server" in start

    misspelled_top = copy.deepcopy(config)
    misspelled_top["idle_timeout_minute"] = misspelled_top.pop("idle_timeout_minutes")
    with pytest.raises(jsonschema.ValidationError, match="idle_timeout_minute"):
        validate_cluster_config(misspelled_top)
    misspelled_node = copy.deepcopy(config)
    misspelled_node["available_node_types"]["gpu_4x"]["max_worker"] = 2
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_cluster_config(misspelled_node)


# ---------------------------------------------------------------------------------------------
# space files and their checks


def test_space_file_kinds_map_onto_tune():
    dims = parse_space({"loss.align_weight": {"grid": [0, 10, 100]}, "train.lr": {"loguniform": [1e-5, 1e-3]},
                        "model.num_query_tokens": {"choice": [8, 16]}, "train.max_steps": {"randint": [1, 3]}})
    space = param_space(dims)
    assert space["loss.align_weight"] == {"grid_search": [0, 10, 100]}
    assert space["model.num_query_tokens"].categories == [8, 16]
    assert (space["train.lr"].lower, space["train.lr"].upper) == (1e-5, 1e-3)
    assert (space["train.max_steps"].lower, space["train.max_steps"].upper) == (1, 4)  # both ends included
    assert num_trials(dims, num_samples=2) == 6


@pytest.mark.parametrize("raw, message", [
    ({"loss.align_weight": {"grid": []}}, "empty grid"),
    ({"loss.align_weight": {"grid": [1, 1]}}, "lists a value twice"),
    ({"loss.align_weight": [0, 10]}, "expected exactly one of grid, choice"),
    ({"loss.align_weight": {"grid": [0], "choice": [1]}}, "expected exactly one of"),
    ({"loss.align_weight": {"range": [0, 1]}}, "expected exactly one of"),
    ({"train.lr": {"uniform": [1e-3, 1e-4]}}, r"low < high"),
    ({"train.lr": {"loguniform": [0, 1e-3]}}, "0 < low"),
    ({"train.max_steps": {"randint": [1.5, 3]}}, "randint takes integers"),
    ({}, "non-empty mapping"),
])
def test_malformed_space_files_are_refused(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_space(raw, "space.yaml")


def test_space_keys_and_values_are_checked_against_the_stage_before_any_trial(tmp_path):
    raw = yaml.safe_load(STAGE1_CONFIG.read_text())
    with pytest.raises(ConfigError, match=r"unknown config key 'loss.align_wieght' \(did you mean 'loss.align_weight'"):
        check_stage_space(parse_space({"loss.align_wieght": {"grid": [0, 10]}}), raw, [])
    with pytest.raises(ConfigError, match=r"'loss.align_weight' = -1: .*greater than or equal to 0"):
        check_stage_space(parse_space({"loss.align_weight": {"grid": [10, -1]}}), raw, [])
    stage0 = yaml.safe_load((ROOT / "configs" / "tiny" / "stage0.yaml").read_text())
    with pytest.raises(ConfigError, match="stage 'pformer' does not use 'loss.align_weight'"):
        check_stage_space(parse_space({"loss.align_weight": {"grid": [0, 10]}}), stage0, [])
    with pytest.raises(ConfigError, match="stage 'qformer' does not use 'loss.contrastive_weight'"):
        check_stage_space(parse_space({"loss.contrastive_weight": {"grid": [0, 1]}}), raw, [])
    # The prompt length of stages 1-2 is fixed by the P-Former they align to: refused, pointing at pipeline sweeps.
    with pytest.raises(ConfigError, match="model.num_query_tokens' cannot vary in a stage-1 sweep .*init_from.pformer"):
        check_stage_space(parse_space({"model.num_query_tokens": {"grid": [4, 8]}}), raw, [])
    check_stage_space(parse_space({"model.num_query_tokens": {"grid": [4, 8]}}), raw,
                      ["init_from.pformer=null", "loss.align_weight=0"])  # plain BLIP-2: any prompt length
    with pytest.raises(ConfigError, match="cannot be swept"):
        check_stage_space(parse_space({"run.name": {"choice": ["a", "b"]}}), raw, [])
    # A stage trial reports to Tune through a Ray Train callback, which local mode would never call.
    with pytest.raises(ConfigError, match="scaling.num_workers=0: a stage sweep's trials report through Ray Train"):
        check_stage_space(parse_space({"loss.align_weight": {"grid": [0, 10]}}), raw, ["scaling.num_workers=0"])
    # Pipeline sweeps use the pipeline's keys, checked the same way.
    with pytest.raises(ConfigError, match="stage 'pformer' \\(stage0\\) does not use 'loss.itc_weight'"):
        check_pipeline_space(parse_space({"stage0.loss.itc_weight": {"grid": [0, 1]}}), str(ROOT / "configs" / "demo.yaml"), [])
    with pytest.raises(ConfigError, match=r"unknown config key 'stage1.loss.align_wait' \(did you mean 'stage1.loss.align_weight'"):
        check_pipeline_space(parse_space({"stage1.loss.align_wait": {"grid": [0, 1]}}), str(ROOT / "configs" / "demo.yaml"), [])


def test_shipped_space_files_fit_the_configs_they_name():
    stage_configs = {"align_weight.yaml": "stage1_opt2.7b.yaml", "align_weight_lr.yaml": "stage2_opt2.7b.yaml",
                     "stage0_contrastive.yaml": "stage0_opt2.7b.yaml"}
    assert {p.name for p in SPACES.glob("*.yaml")} == {*stage_configs, "pipeline_prompt_length.yaml"}
    for space, config in stage_configs.items():
        text = (SPACES / space).read_text()
        assert f"configs/{config}" in text, space
        check_stage_space(load_space(SPACES / space), yaml.safe_load((ROOT / "configs" / config).read_text()), [])
    check_pipeline_space(load_space(SPACES / "pipeline_prompt_length.yaml"), str(ROOT / "configs" / "demo.yaml"), [])


# ---------------------------------------------------------------------------------------------
# a real sweep


@pytest.mark.slow
def test_align_weight_sweep_on_ray_with_asha_logs_a_parent_and_a_child_per_trial(
        ray_session, pformer_checkpoint, tmp_path, tiny_models, tiny_vision, mlflow_uri, flickr_shards):
    from mlflow.tracking import MlflowClient

    from jobs import sweep

    space = tmp_path / "space.yaml"
    space.write_text("loss.align_weight:\n  grid: [0, 100]\n")
    args = stage_args(tmp_path, tiny_models, tiny_vision, mlflow_uri, **{
        "init_from.pformer": pformer_checkpoint["opt"], "data.train": str(flickr_shards),
        "train.max_steps": 8, "train.log_every_steps": 2, "train.checkpoint_every_steps": 8,
        "train.batch_size_per_worker": 8, "train.warmup_steps": 1, "scaling.num_workers": 1})
    summary_path = tmp_path / "sweep.json"
    code = sweep.main(["--config", str(STAGE1_CONFIG), "--space", str(space), "--scheduler", "asha",
                       "--name", "align-sweep", "--out", str(tmp_path / "out"), "--summary", str(summary_path), *args])
    assert code == 0
    summary = json.loads(summary_path.read_text())
    assert summary["metric"] == "itc_loss" and summary["mode"] == "min"
    trials = summary["trials"]
    assert len(trials) == 2 and {t["params"]["loss.align_weight"] for t in trials} == {0, 100}
    assert all(t["status"] in ("DONE", "STOPPED") for t in trials)
    # ASHA may stop weak trials at its rungs (steps 2, 4 and 8: the top rung can be the last step, before the
    # trial's run has ended); the best is chosen among trials that finished.
    finished = [t for t in trials if t["status"] == "DONE"]
    assert finished and all(t["steps"] == 8 for t in finished)
    assert all(2 <= t["steps"] <= 8 for t in trials if t["status"] == "STOPPED")
    best = summary["best"]
    assert best["status"] == "DONE" and best["metrics"]["itc_loss"] == min(t["metrics"]["itc_loss"] for t in finished)
    assert Path(best["checkpoint"]).is_dir() and (Path(best["checkpoint"]) / "manifest.json").exists()

    client = MlflowClient(tracking_uri=mlflow_uri)
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["stage"] == "sweep"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"sweep.md", "sweep.json", "sweep.png"}
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 2
    assert sorted(float(run.data.params["loss.align_weight"]) for run in children) == [0.0, 100.0]
    # Finished trials end their run; runs of trials ASHA stopped are marked KILLED by the sweep.
    status = {t["trial_id"]: t["status"] for t in trials}
    for run in children:
        trial = run.info.run_name.rsplit("-", 1)[1]
        assert run.info.status == ("FINISHED" if status[trial] == "DONE" else "KILLED"), run.info.run_name
        if status[trial] == "DONE":
            assert "itc_loss" in run.data.metrics
            if float(run.data.params["loss.align_weight"]) > 0:
                assert "align_loss" in run.data.metrics
    with (tmp_path / "out" / "sweep.png").open("rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
