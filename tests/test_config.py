"""Config loading: paper defaults, dotted overrides, and errors that name the key."""

from pathlib import Path

import pytest

from app.config import Config, ConfigError, build_config, load_config, parse_override

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_papers_stage0_run():
    cfg = Config()
    assert cfg.model.num_query_tokens == 32 and cfg.data.max_txt_len == 32
    assert cfg.model.pformer == "bert-base-uncased" and cfg.model.llm == "facebook/opt-2.7b"
    assert (cfg.train.lr, cfg.train.min_lr, cfg.train.warmup_lr) == (1e-4, 1e-5, 1e-6)
    assert cfg.train.warmup_steps == 2000 and cfg.train.weight_decay == 0.05
    assert cfg.train.batch_size_per_worker == 128 and cfg.train.epochs == 5
    assert (cfg.loss.lm_weight, cfg.loss.contrastive_weight) == (1.0, 1.0)
    assert cfg.loss.vocab_weight is None  # the reference's choice per LLM kind (1 decoder-only, 0 T5)
    assert cfg.loss.label_smoothing == 0.1 and cfg.loss.mask_prob == 0.25 and cfg.loss.contrastive_views == 1
    assert cfg.model.temp_init == 0.07 and cfg.model.contrastive_dim == 256


def test_required_keys_exist():
    flat = Config().flat()
    for key in ("run.name", "run.storage_path", "mlflow.tracking_uri", "mlflow.experiment",
                "scaling.num_workers", "scaling.use_gpu", "train.max_steps", "train.batch_size_per_worker",
                "data.text", "model.num_query_tokens", "model.llm", "data.text_column"):
        assert key in flat


def test_overrides_are_typed_and_apply():
    cfg = build_config({"train": {"max_steps": 5}},
                       ["train.max_steps=7", "train.lr=3e-4", "scaling.use_gpu=false", "train.betas=[0.9, 0.98]",
                        "run.name=my-run", "model.num_query_tokens=16"])
    assert cfg.train.max_steps == 7 and cfg.train.lr == 3e-4 and cfg.scaling.use_gpu is False
    assert cfg.train.betas == (0.9, 0.98) and cfg.run.name == "my-run" and cfg.model.num_query_tokens == 16
    assert parse_override("data.text=s3://b/x=y") == ("data.text", "s3://b/x=y")


@pytest.mark.parametrize("raw, overrides, message", [
    ({"train": {"max_step": 5}}, [], "unknown config key 'train.max_step' (did you mean 'train.max_steps'?)"),
    ({"trian": {}}, [], "unknown config key 'trian' (did you mean 'train'?)"),
    ({}, ["model.num_query_token=4"], "unknown config key 'model.num_query_token'"),
    ({}, ["train.max_steps=abc"], "train.max_steps: Input should be a valid integer"),
    ({}, ["train.max_steps=-3"], "train.max_steps: Input should be greater than 0"),
    ({}, ["scaling.num_workers=-1"], "scaling.num_workers: Input should be greater than or equal to 0"),
    ({}, ["scaling.num_workers=0", "train.max_failures=2"], "train.max_failures=2: Ray Train's local mode"),
    ({}, ["scaling.worker_resources={GPU: 1}"], "scaling.worker_resources: set CPU and GPU with"),
    ({}, ["scaling.worker_resources={gpu_4x: 0}"], "scaling.worker_resources.gpu_4x: Input should be greater than 0"),
    ({}, ["loss.contrastive_views=3"], "loss.contrastive_views"),
    ({}, ["train.min_lr=1e-2"], "train.min_lr (0.01) must not exceed train.lr"),
    ({}, ["train=5"], "'train' is a section"),
    ({}, ["train.max_steps.x=5"], "'train.max_steps' is a value, not a section"),
    ({}, ["noequals"], "not of the form dotted.key=value"),
    ({"train": 5}, [], "train: expected a mapping"),
])
def test_bad_configs_name_the_key(raw, overrides, message):
    with pytest.raises(ConfigError) as err:
        build_config(raw, overrides)
    assert message in str(err.value)


def test_config_files_load(tmp_path):
    from app.pipeline import load_pipeline_config

    assert load_pipeline_config(ROOT / "configs" / "demo.yaml").pipeline.arms == ["pformer", "blip2"]
    for path in [*ROOT.glob("configs/*.yaml"), *ROOT.glob("configs/tiny/*.yaml")]:
        if path.name == "demo.yaml":
            continue  # a pipeline config (stages in sections), checked above
        cfg = load_config(path)
        stem = path.stem.removeprefix("video_")
        expected = {"stage0": "pformer", "stage1": "qformer", "stage2": "llm"}.get(stem.split("_")[0], "pformer")
        assert cfg.stage == expected, path
        if path.stem.startswith("video_") and expected != "pformer":
            assert cfg.model.num_frames and "clip" in cfg.model.vision, path  # another tower family, by config
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  llm: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_stage_keys_and_paper_defaults():
    cfg = load_config(ROOT / "configs" / "stage1_opt2.7b.yaml", ["init_from.pformer=s3://b/ckpt", "loss.align_weight=null"])
    assert cfg.loss.align_weight == 10  # the paper's weight for the stage, resolved when the config is built
    assert load_config(None, ["stage=llm"]).loss.align_weight == 100
    assert load_config(None, ["stage=llm", "loss.align_weight=0"]).loss.align_weight == 0
    assert cfg.model.vision == "Salesforce/blip2-opt-2.7b" and cfg.model.num_query_tokens == 32
    assert (cfg.train.lr, cfg.train.min_lr, cfg.train.warmup_steps, cfg.train.weight_decay) == (1e-4, 1e-5, 5000, 0.05)
    assert load_config(ROOT / "configs" / "stage2_opt2.7b.yaml").train.warmup_steps == 2000
    with pytest.raises(ConfigError, match=r"unknown config key 'init_from.pformr' \(did you mean 'init_from.pformer'\?\)"):
        load_config(None, ["init_from.pformr=x"])
    with pytest.raises(ConfigError, match="loss.align_weight"):
        load_config(None, ["loss.align_weight=-1"])
    with pytest.raises(ConfigError, match="data.max_skipped_fraction"):
        load_config(None, ["data.max_skipped_fraction=1.5"])


def test_mlflow_tracking_uri_defaults_to_the_environment(monkeypatch):
    # A cluster's head exports MLFLOW_TRACKING_URI (cluster.yaml); a config that names a URI keeps its own.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.5:5000")
    assert build_config({}).mlflow.tracking_uri == "http://10.0.0.5:5000"
    assert build_config({"mlflow": {"tracking_uri": "sqlite:///x.db"}}).mlflow.tracking_uri == "sqlite:///x.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert build_config({}).mlflow.tracking_uri == "sqlite:///mlflow.db"


def test_data_num_frames_is_read_as_model_num_frames_with_a_message(caplog, tmp_path):
    """Configs and checkpoints written before num_frames moved under model (it is the Q-Former's) still load."""
    import logging

    old = tmp_path / "old.yaml"
    old.write_text("stage: qformer\ndata:\n  num_frames: 4\nmodel:\n  frame_pooling: mean\n")
    with caplog.at_level(logging.WARNING, logger="app.config"):
        cfg = load_config(old)
    assert cfg.model.num_frames == 4 and "num_frames" not in cfg.data.model_dump()
    assert any("data.num_frames is deprecated" in r.getMessage() for r in caplog.records)
    assert load_config(None, ["stage=qformer", "data.num_frames=8"]).model.num_frames == 8
    old.write_text("stage: qformer\ndata:\n  num_frames: 4\nmodel:\n  num_frames: 8\n")
    with pytest.raises(ConfigError, match=r"data.num_frames \(4\) and model.num_frames \(8\) disagree"):
        load_config(old)


def test_a_local_driver_drops_only_the_cleaners_no_dashboard_warning():
    """Ray Train's placement-group cleaner warns every second when the state API (the dashboard) is absent, as
    it is in local instances; the driver's log deduplicator drops those lines and keeps every other."""
    from ray._private import ray_logging

    from app.train.launcher import CLEANER_WARNING, skip_driver_lines

    skip_driver_lines(CLEANER_WARNING)
    skip_driver_lines(CLEANER_WARNING)  # once is enough: a second call does not grow the pattern
    assert ray_logging.stderr_deduplicator.skip_re.pattern.split("|").count(CLEANER_WARNING) == 1
    lines = ["Failed to query Ray Train Controller actor state. State API may be temporarily unavailable. "
             "Continuing to monitor.", "[qformer] step 10/60 loss 4.1"]
    batches = ray_logging.stderr_deduplicator.deduplicate({"ip": "127.0.0.1", "pid": 7, "lines": lines})
    # (The deduplicator is the process's own: it may hand back lines it held from earlier Ray jobs' workers.)
    assert [line for batch in batches if batch["pid"] == 7 for line in batch["lines"]] == lines[1:]
