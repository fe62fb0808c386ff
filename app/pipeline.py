"""The whole method in one job: stage 0 -> 1 -> 2 -> caption evaluation, for two arms on the same data,
steps and seeds -- P-Former (alignment losses on) and the BLIP-2 baseline (align weight 0, no P-Former).

A pipeline config has a `pipeline` section (see `PipelineSection`), a `common` mapping applied to every
stage (the sections of an ordinary stage config: run, mlflow, scaling, data, model, ...) and `stage0`,
`stage1`, `stage2` mappings with each stage's own deviations; `key=value` overrides use the same
layout (`stage1.train.max_steps=50`, `common.model.num_query_tokens=8`, `pipeline.eval_limit=100`).
The embedded default also has a `demo` section (app.demo.assets.DemoAssets): the generated data and tiny
models that the pipeline job prepares, once, before the stages run.
Every stage config is validated before anything runs.

MLflow: one parent run per invocation; each stage of each arm and each evaluation is a child run. The
parent gets the comparison table (JSON and Markdown) and a plot (training curves of both arms and the
caption metrics). Stage 0 is text-only and does not depend on the arm: it runs once, for the P-Former arm.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import re
import time
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app import storage, tracking
from app.demo import diagnostics as demo_diagnostics
from app.config import (Config, ConfigError, _suggest, build_config, moved_key, parse_override, read_yaml_mapping,
                        set_dotted)
from app.demo.assets import DemoAssets
from app.evaluation.model import CAPTION_OPTIONS, GenerationOptions

logger = logging.getLogger(__name__)

ARMS = ("pformer", "blip2")
STAGE_KEYS = {"stage0": "pformer", "stage1": "qformer", "stage2": "llm"}
TOP_LEVEL = ("pipeline", "common", *STAGE_KEYS, "demo")
TABLE_METRICS = ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
VQA_METRIC = "vqa_accuracy"


class PipelineSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("pipeline", min_length=1, description="Prefix of every run name of an invocation.")
    arms: list[str] = Field(default_factory=lambda: list(ARMS), min_length=1)
    eval_data: Optional[str] = Field(None, description="Caption evaluation shards (default: stage 2's data.val).")
    eval_limit: Optional[int] = Field(None, ge=1, description="Evaluate at most this many images.")
    # Generation: the defaults are GenerationOptions' (BLIP-2's for captioning).
    num_beams: int = Field(CAPTION_OPTIONS.num_beams, ge=1)
    max_new_tokens: int = Field(CAPTION_OPTIONS.max_new_tokens, ge=1)
    min_new_tokens: int = Field(CAPTION_OPTIONS.min_new_tokens, ge=0)
    eval_batch_size: int = Field(32, ge=1)
    random_baseline_seed: int = 0
    vqa_questions: Optional[str] = Field(None, description="Zero-shot VQA after captioning: VQAv2 questions JSON "
                                                            "(with vqa_annotations and vqa_images); unset = no VQA.")
    vqa_annotations: Optional[str] = None
    vqa_images: Optional[str] = Field(None, description="Folder of the VQA pictures, named by vqa_image_pattern.")
    vqa_image_pattern: str = "COCO_val2014_{image_id:012d}.jpg"
    vqa_template: str = "Question: {} Short answer:"
    vqa_limit: Optional[int] = Field(None, ge=1, description="Score at most this many questions.")
    vqa_brackets: bool = Field(True, description="Also score the frozen LLM alone on the questions: blind (the "
                                                 "question only) and, where the annotations carry an "
                                                 "`oracle_caption`, the true caption as text.")
    stage0_checkpoint: Optional[str] = Field(
        None, description="A finished stage-0 checkpoint (or run folder) for the P-Former arm, used in place of "
                          "training one (e.g. one P-Former for many stage-1/2 runs).")


class PipelineFile(BaseModel):
    """The layout of a pipeline YAML and of its overrides: `common` and each stage hold stage-config keys."""

    pipeline: PipelineSection
    common: Config
    stage0: Config
    stage1: Config
    stage2: Config
    demo: DemoAssets


class PipelineConfig(BaseModel):
    pipeline: PipelineSection
    stages: dict[str, dict[str, Any]]  # "stage0" -> raw stage mapping (common merged in), validated below
    demo: Any = None  # app.demo.assets.DemoAssets: generated assets to prepare first (the embedded default only)

    def stage_config(self, key: str, **extra: Any) -> Config:
        raw = copy.deepcopy(self.stages[key])
        raw["stage"] = STAGE_KEYS[key]
        try:
            for dotted, value in extra.items():
                set_dotted(raw, dotted, value)
            return build_config(raw)
        except ConfigError as err:
            raise ConfigError(f"{key}: {err}") from None


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def is_pipeline_config(path: Optional[str]) -> bool:
    """Whether the YAML at `path` is a pipeline config (its sections) rather than a stage config."""
    return bool(path) and any(k in read_yaml_mapping(path) for k in ("pipeline", "common", "stage0", "stage1", "stage2"))


def load_pipeline_config(path: Optional[str], overrides: Optional[list[str]] = None) -> PipelineConfig:
    raw: dict[str, Any] = read_yaml_mapping(path) if path else {}
    for key in raw:
        if key not in TOP_LEVEL:
            raise ConfigError(f"unknown pipeline config key '{key}'{_suggest(key, list(TOP_LEVEL))} "
                              f"(expected {', '.join(TOP_LEVEL)})")
    for item in overrides or []:
        key, value = parse_override(item)
        head, _, rest = key.partition(".")
        if head not in TOP_LEVEL or not rest:
            raise ConfigError(f"override '{item}': keys start with one of {', '.join(TOP_LEVEL)} "
                              f"(e.g. stage1.train.max_steps=50)")
        if head in ("common", *STAGE_KEYS):
            key = f"{head}.{moved_key(rest, prefix=head + '.')}"
        set_dotted(raw, key, value, PipelineFile)
    try:
        section = PipelineSection.model_validate(raw.get("pipeline") or {})
    except ValidationError as err:
        problems = "; ".join(f"pipeline.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"invalid pipeline config: {problems}") from None
    vqa = {k: getattr(section, k) for k in ("vqa_questions", "vqa_annotations", "vqa_images")}
    if any(vqa.values()) and not all(vqa.values()):
        missing = ", ".join(f"pipeline.{k}" for k, v in vqa.items() if not v)
        raise ConfigError(f"zero-shot VQA needs pipeline.vqa_questions, vqa_annotations and vqa_images together "
                          f"({missing} unset)")
    if "{}" not in section.vqa_template:
        raise ConfigError(f"pipeline.vqa_template must contain '{{}}' where the question goes: {section.vqa_template!r}")
    unknown_arms = [a for a in section.arms if a not in ARMS]
    if unknown_arms:
        raise ConfigError(f"pipeline.arms: unknown arm(s) {unknown_arms} (available: {list(ARMS)})")
    demo = None
    if raw.get("demo") is not None:
        try:
            demo = DemoAssets.model_validate(raw["demo"])
        except ValidationError as err:
            problems = "; ".join(f"demo.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
            raise ConfigError(f"invalid pipeline config: {problems}") from None
    config = PipelineConfig(pipeline=section, demo=demo, stages={
        key: _merge(raw.get("common") or {}, raw.get(key) or {}) for key in STAGE_KEYS})
    for key in STAGE_KEYS:  # every stage must be a valid stage config before anything runs
        config.stage_config(key)
    return config


# ---------------------------------------------------------------------------------------------
# running


def random_caption_baseline(rows: list[dict], seed: int = 0) -> dict[str, Optional[float]]:
    """Caption every image with a reference of another, random image: the score of captions that say
    nothing about their image but are fluent and on-topic (the chance level of this metric on this set)."""
    from app.evaluation.captioning import score_captions

    rng = random.Random(seed)
    ids = [r["id"] for r in rows]
    results = []
    for row in rows:
        other = rng.choice([i for i in range(len(rows)) if ids[i] != row["id"]]) if len(rows) > 1 else 0
        results.append({"image_id": row["id"], "caption": rng.choice(rows[other]["references"])})
    metrics, _ = score_captions(results, {r["id"]: r["references"] for r in rows}, spice=False)
    return metrics


def vqa_brackets(p: PipelineSection, stage2_cfg: Config) -> dict[str, dict[str, Any]]:
    """The blind and oracle rows: the frozen LLM of stage 2 on the VQA questions with no picture (the oracle
    only where the annotations carry `oracle_caption`)."""
    from app.evaluation.text_only import text_vqa_brackets

    s3 = storage.S3Options.from_config(stage2_cfg)
    found = text_vqa_brackets(storage.local_model(stage2_cfg.model.llm, s3), storage.read_json(p.vqa_questions, s3),
                              storage.read_json(p.vqa_annotations, s3), p.vqa_template, limit=p.vqa_limit)
    labels = {"blind": "blind LLM (question only)", "oracle": "oracle LLM (true caption as text)"}
    return {labels[name]: metrics for name, metrics in found.items()}


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    client = tracking.client(uri)
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def comparison_plot(path: Path, uri: str, results: dict[str, dict], baseline: dict[str, Optional[float]],
                    eval_label: str = "validation images") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for arm, res in results.items():
        for ax, stage, key in ((axes[0], "stage1", "loss"), (axes[1], "stage2", "lm_loss")):
            curve = _history(uri, res[stage]["mlflow_run_id"], key)
            if curve:
                ax.plot(*zip(*curve), label=arm)
            val = _history(uri, res[stage]["mlflow_run_id"], f"val_{key}")
            if val:
                ax.plot(*zip(*val), linestyle="--", marker="o", markersize=3, label=f"{arm} (val)")
    axes[0].set_title("stage 1: total loss")
    axes[1].set_title("stage 2: LM loss")
    for ax in axes[:2]:
        ax.set_xlabel("step")
        ax.legend()
    names = list(TABLE_METRICS)
    width = 0.8 / (len(results) + 1)
    for i, (arm, res) in enumerate([*results.items(), ("random captions", {"eval": {"metrics": baseline}})]):
        values = [res["eval"]["metrics"].get(n) or 0.0 for n in names]
        axes[2].bar([j + i * width for j in range(len(names))], values, width, label=arm)
    axes[2].set_xticks([j + width * len(results) / 2 for j in range(len(names))], names)
    axes[2].set_title(f"caption metrics ({eval_label})")
    axes[2].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
    return path


def comparison_table(results: dict[str, dict], baseline: dict[str, Optional[float]],
                     extra: Optional[dict[str, dict[str, Any]]] = None) -> list[dict[str, Any]]:
    """One row per arm (caption metrics, VQA accuracy when measured, final losses), the random-caption floor,
    and `extra` rows ({label: metrics}: the caption ceiling, the blind and oracle VQA brackets)."""
    vqa = any("vqa" in res for res in results.values())
    rows = []
    for arm, res in results.items():
        row = {"arm": arm, **{n: res["eval"]["metrics"].get(n) for n in TABLE_METRICS}}
        if vqa:
            row[VQA_METRIC] = res.get("vqa", {}).get("metrics", {}).get(VQA_METRIC)
        row["stage1_loss"] = res["stage1"]["metrics"].get("loss")
        row["stage2_lm_loss"] = res["stage2"]["metrics"].get("lm_loss")
        row["stage2_val_lm_loss"] = res["stage2"]["metrics"].get("val_lm_loss")
        rows.append(row)
    for label, metrics in {"random captions": baseline, **(extra or {})}.items():
        row = {"arm": label, **{n: metrics.get(n) for n in TABLE_METRICS}}
        if vqa:
            row[VQA_METRIC] = metrics.get(VQA_METRIC)
        rows.append({k: row.get(k) for k in rows[0]} if rows else row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0])
    cells = [[("" if r.get(c) is None else f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r[c])) for c in columns]
             for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
             "| " + " | ".join("-" * w for w in widths) + " |"]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |" for row in cells]
    return "\n".join(lines)


def run_pipeline(config: PipelineConfig, out_dir: Optional[str] = None, parent_run_id: Optional[str] = None,
                 params: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Run every stage of every arm and the evaluations; returns the summary. `parent_run_id`: MLflow run
    this invocation's run goes under (a sweep's); `params`: logged on the invocation's run (a trial's)."""
    from app.evaluation.inference import InferenceSettings
    from app.evaluation.tasks import EvalRun, EvalSource, evaluate_captions, evaluate_vqa
    from app.train.launcher import resolve_paths, run_stage

    p = config.pipeline.model_copy()
    for key in ("vqa_questions", "vqa_annotations", "vqa_images"):  # absolute: Ray's tasks read them elsewhere
        value = getattr(p, key)
        if value and not storage.is_s3(value):
            setattr(p, key, storage.resolve(value)[1])
    started = time.time()
    invocation = f"{p.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    base = resolve_paths(config.stage_config("stage0"))
    uri, experiment = base.mlflow.tracking_uri, base.mlflow.experiment
    client = tracking.client(uri)
    parent = tracking.create_run(uri, experiment, invocation, {"stage": "pipeline", "arms": ",".join(p.arms)},
                                 parent_run_id)
    if params:
        from mlflow.entities import Param

        client.log_batch(parent, params=[Param(k, str(v)[:500]) for k, v in sorted(params.items())])
    out = Path(out_dir or Path("outputs") / invocation)
    train_stage0 = "pformer" in p.arms and not p.stage0_checkpoint
    steps = ("stage1", "stage2", "eval", "vqa") if p.vqa_questions else ("stage1", "stage2", "eval")
    plan = (["stage0"] if train_stage0 else []) + [f"{arm}:{s}" for arm in p.arms for s in steps]
    plan += ["brackets"] if p.vqa_questions and p.vqa_brackets else []
    scenes = demo_diagnostics.split_scenes(p.eval_data or config.stage_config("stage2").data.val,
                                           config.demo.root if config.demo is not None else None)
    done = 0

    def progress(label: str) -> None:
        nonlocal done
        done += 1
        print(f"[pipeline] {done}/{len(plan)} {label} ({time.time() - started:.0f} s elapsed)", flush=True)

    status = "FAILED"
    try:
        stage0 = None
        if train_stage0:
            progress("stage 0: P-Former on text")
            stage0 = run_stage(config.stage_config("stage0", **{"run.name": f"{invocation}-stage0"}), parent)
        elif "pformer" in p.arms:
            stage0 = {"stage": "pformer", "checkpoint": p.stage0_checkpoint, "reused": True}
            client.set_tag(parent, "stage0_checkpoint", p.stage0_checkpoint)
        results: dict[str, dict] = {}
        rows_for_baseline: list[dict] = []
        for arm in p.arms:
            aligned = arm == "pformer"
            pformer = stage0["checkpoint"] if aligned else None
            progress(f"{arm}: stage 1 (Q-Former)")
            extra1 = {"run.name": f"{invocation}-{arm}-stage1", "init_from.pformer": pformer}
            if not aligned:
                extra1["loss.align_weight"] = 0
            stage1 = run_stage(config.stage_config("stage1", **extra1), parent)
            progress(f"{arm}: stage 2 (LLM)")
            extra2 = {"run.name": f"{invocation}-{arm}-stage2", "init_from.qformer": stage1["checkpoint"],
                      "init_from.pformer": pformer}
            if not aligned:
                extra2["loss.align_weight"] = 0
            stage2_cfg = config.stage_config("stage2", **extra2)
            stage2 = run_stage(stage2_cfg, parent)
            progress(f"{arm}: caption evaluation")
            eval_data = p.eval_data or stage2_cfg.data.val
            if not eval_data:
                raise ConfigError("pipeline.eval_data: no evaluation shards (and stage2 has no data.val)")
            run = EvalRun(checkpoint=stage2["checkpoint"], out_dir=str(out / arm), parent_run_id=parent,
                          settings=InferenceSettings(batch_size=p.eval_batch_size, num_actors=1),
                          s3=storage.S3Options.from_config(stage2_cfg), grid_size=8, keep_rows=not rows_for_baseline)
            options = GenerationOptions(num_beams=p.num_beams, max_new_tokens=p.max_new_tokens,
                                        min_new_tokens=p.min_new_tokens)
            evaluation = evaluate_captions(run, EvalSource(data=eval_data, limit=p.eval_limit), options, spice=False)
            rows_for_baseline = rows_for_baseline or evaluation.pop("rows", [])
            evaluation.pop("rows", None)
            results[arm] = {"stage1": stage1, "stage2": stage2, "eval": evaluation}
            if scenes is not None:
                evaluation["attributes"] = demo_diagnostics.caption_attributes_report(
                    json.loads((out / arm / "results.json").read_text()), scenes)
            if p.vqa_questions:
                progress(f"{arm}: zero-shot VQA")
                results[arm]["vqa"] = evaluate_vqa(
                    EvalRun(**{**vars(run), "out_dir": str(out / arm / "vqa"), "keep_rows": False}),
                    EvalSource(questions=p.vqa_questions, annotations=p.vqa_annotations, images=p.vqa_images,
                               image_pattern=p.vqa_image_pattern, limit=p.vqa_limit), template=p.vqa_template)
        baseline = random_caption_baseline(rows_for_baseline, p.random_baseline_seed)
        extra = {}
        if scenes is not None:
            extra["grammar captions (ceiling)"] = demo_diagnostics.grammar_ceiling(
                scenes, {r["id"]: r["references"] for r in rows_for_baseline}, p.random_baseline_seed)
        if p.vqa_questions and p.vqa_brackets:
            progress("VQA brackets: the frozen LLM alone, blind and with the true caption")
            extra.update(vqa_brackets(p, stage2_cfg))
        table = comparison_table(results, baseline, extra)
        text = format_table(table)
        out.mkdir(parents=True, exist_ok=True)
        files = [comparison_plot(out / "comparison.png", uri, results, baseline,
                                 f"pictures of {p.eval_data}" if p.eval_data else "validation images")]
        (out / "comparison.md").write_text(text + "\n")
        (out / "comparison.json").write_text(json.dumps(table, indent=2))
        files += [out / "comparison.md", out / "comparison.json"]
        for path in files:
            client.log_artifact(parent, str(path))
        for row in table:
            slug = re.sub(r"[^a-z0-9]+", "_", row["arm"].lower()).strip("_")  # MLflow's metric-name alphabet
            tracking.log_metrics(uri, parent, {f"{slug}_{k}": v for k, v in row.items()
                                               if k != "arm" and isinstance(v, (int, float))}, step=0)
        summary = {"parent_run_id": parent, "tracking_uri": uri, "invocation": invocation,
                   "stage0": stage0, "arms": results, "random_baseline": baseline, "table": table,
                   "seconds": round(time.time() - started, 1), "outputs": str(out)}
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        client.log_artifact(parent, str(out / "summary.json"))
        status = "FINISHED"
    finally:
        tracking.end_run(uri, parent, status)
    print(f"[pipeline] done in {summary['seconds']:.0f} s; comparison (caption metrics on "
          f"{p.eval_data or 'the validation images'}" + (f"; zero-shot VQA accuracy on {p.vqa_questions}" if
                                                        p.vqa_questions else "") + "):")
    print(text)
    print(f"[pipeline] outputs in {out}; browse the runs: {tracking.ui_command(uri, experiment)}")
    return summary
