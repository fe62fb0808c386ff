"""Frozen-feature cache: the cache job on real Flickr8k shards (resumable, no duplicate rows after an
interruption), cached and live losses agree, a cache made with other frozen models is refused by name,
and stage 1 trains from a cache on S3 (moto)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from app.config import load_config

from conftest import FLICKR, ROOT, bad_samples, mlflow_store, photo, stage_args, write_tar

STAGE1 = ROOT / "configs" / "tiny" / "stage1.yaml"
STAGE2 = ROOT / "configs" / "tiny" / "stage2.yaml"


def cache_config(tmp_path, tiny_models, tiny_vision, pformer_checkpoint, *, out, train, extra=(), config=STAGE1):
    mlflow_uri = mlflow_store(tmp_path / "mlflow.db")
    items = stage_args(tmp_path, tiny_models, tiny_vision, mlflow_uri, **{
        "data.train": train, "init_from.pformer": pformer_checkpoint["opt"], "cache.out": out})
    return load_config(config, items + list(extra))


def run_job(cfg_args: list[str], capsys) -> tuple[int, str]:
    from jobs import cache_features

    code = cache_features.main(cfg_args)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def job_args(tmp_path, tiny_models, tiny_vision, pformer_checkpoint, *, out, train, extra=(), config=STAGE1) -> list[str]:
    mlflow_uri = mlflow_store(tmp_path / "mlflow.db")
    items = stage_args(tmp_path, tiny_models, tiny_vision, mlflow_uri, **{
        "data.train": train, "init_from.pformer": pformer_checkpoint["opt"], "cache.out": out})
    return ["--config", str(config), *items, *extra]


def part_rows(out) -> list[dict]:
    return [row for path in sorted((out / "parts").glob("*.parquet")) for row in pq.read_table(path).to_pylist()]


# ---------------------------------------------------------------------------------------------
# the job


def test_cache_job_writes_resumes_and_recomputes_nothing(ray_session, pformer_checkpoint, flickr_shards, tiny_models,
                                                         tiny_vision, tmp_path, capsys):
    shards = tmp_path / "shards"
    shutil.copytree(flickr_shards, shards)  # 48 photos x 5 captions = 240 samples in 3 shards
    write_tar(shards / "shard-bad.tar", bad_samples())  # 6 good + 3 convertible + 5 unusable
    out = tmp_path / "cache"
    args = job_args(tmp_path, tiny_models, tiny_vision, pformer_checkpoint, out=str(out), train=str(shards),
                    extra=["cache.dtype=float16", "cache.rows_per_block=32"])

    # An interrupted run: two shards finished, and a part of a third written before the crash.
    code, printed = run_job(["--max-shards", "2", *args], capsys)
    assert code == 0, printed
    assert len(list((out / "_done").glob("*.json"))) == 2 and not (out / "manifest.json").exists()
    assert "2/4 shard(s) done; run again to finish" in printed
    finished = {p: p.stat().st_mtime_ns for p in (out / "parts").glob("*.parquet")}
    done_stems = {p.stem for p in (out / "_done").glob("*.json")}
    from app.cache import shard_stem

    pending = next(s for s in sorted(str(p) for p in shards.glob("*.tar")) if shard_stem(s) not in done_stems)
    planted = out / "parts" / f"{shard_stem(pending)}-0000000.parquet"
    pq.write_table(pq.read_table(next(iter(finished))).slice(0, 5), planted)

    # The restart finishes the rest: the crashed shard's part is redone, nothing is duplicated.
    code, printed = run_job(["--summary", str(tmp_path / "summary.json"), *args], capsys)
    assert code == 0, printed
    assert "1 unfinished part(s) removed" in printed and "finished: 249 rows" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert json.loads((tmp_path / "summary.json").read_text()) == {"finished": True, **manifest}
    assert manifest["rows"] == 240 + 9 and manifest["shards"] == 4
    assert manifest["skipped"] == {"corrupt_image": 2, "no_caption": 1, "empty_caption": 1, "no_image": 1}
    rows = part_rows(out)
    keys = [(r["shard"], r["key"]) for r in rows]
    assert len(rows) == 249 and len(set(keys)) == 249
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())  # finished shards were not recomputed
    # What a row holds: the cleaned captions, float16 features of the tower's shape, one P-Former vector each.
    identity = manifest["identity"]
    assert identity["kind"] == "features" and identity["dtype"] == "float16" and identity["store"] == "sentence"
    assert identity["transform"]["image_size"] == 32 and len(identity["vision"]["sha256"]) == 64
    assert identity["pformer"]["uri"] == pformer_checkpoint["opt"]
    shapes = manifest["shapes"]
    assert shapes["features"] == [17, 32] and shapes["sentences"] == [64]  # 4x4 patches + CLS, width 32; BERT 64
    first = rows[0]
    assert len(first["features"]) == 17 * 32 * 2 and len(first["sentences"]) == len(first["captions"])

    # A third run has nothing to do.
    code, printed = run_job(args, capsys)
    assert code == 0 and "0 to do now" in printed
    assert len(part_rows(out)) == 249


# ---------------------------------------------------------------------------------------------
# cached == live


def eval_rows(tmp_path, count=8) -> list[dict]:
    from app.data.sources import iter_tar_samples

    captions = json.loads((FLICKR / "captions.json").read_text())
    names = sorted(captions)[:count]
    path = write_tar(tmp_path / "eq.tar", [(f"k{i}", {"jpg": photo(i), "json": json.dumps(
        {"captions": captions[n][:2]}).encode()}) for i, n in enumerate(names)])
    with open(path, "rb") as f:
        return [{**row, "index": i} for i, row in enumerate(iter_tar_samples(f, path))]


@pytest.mark.parametrize("kind, dtype", [("features", "float32"), ("features", "bfloat16"), ("prompts", "float16")])
def test_cached_and_live_losses_agree(kind, dtype, pformer_checkpoint, tiny_models, tiny_vision, tmp_path):
    """Stage-1 and stage-2 losses from the cache equal the live ones on the same samples (eval transforms,
    first caption), exactly for float32 and within 16-bit rounding otherwise."""
    from app.cache import INPUT_SCHEMA, CacheEncoder, prepare_cache_batch
    from app.data.feature_cache import decode_cached, preprocess_cached_batch
    from app.losses import stage_losses
    from app.data.captions import CaptionSpec
    from app.data.samples import preprocess_image_batch
    from app.data.media import MediaSpec
    from app.models.composites import LLMPretrain, Stage2Weights
    from app.models.llm import FrozenLLM
    from app.data.captions import trim_padding
    from app.stages import get_stage

    rows = eval_rows(tmp_path)
    out = tmp_path / "cache"
    (out / "parts").mkdir(parents=True)
    cfg = cache_config(tmp_path, tiny_models, tiny_vision, pformer_checkpoint, out=str(out), train="unused",
                       extra=[f"cache.kind={kind}", f"cache.dtype={dtype}", "cache.batch_size=3"])
    table = pa.Table.from_pylist(rows, schema=INPUT_SCHEMA)
    meta = CacheEncoder(cfg, None, use_gpu=False)(prepare_cache_batch(
        table, kind=kind, image_size=32, num_frames=None, max_chars=1000))
    part = pq.read_table(out / meta["part"][0])
    assert part.num_rows == 8 and part.schema.metadata[b"dtype"].decode() == dtype
    shapes = json.loads(part.schema.metadata[b"shapes"])

    spec = CaptionSpec(qformer=tiny_models["bert"], pformer=f"{pformer_checkpoint['opt']}/pformer",
                       llm=tiny_models["opt"], max_txt_len=cfg.data.max_txt_len)
    no_pformer = CaptionSpec(qformer=spec.qformer, llm=spec.llm, max_txt_len=spec.max_txt_len)
    live = preprocess_image_batch(table, media=MediaSpec(size=32, train=False), captions=spec)
    if kind == "features":
        cached = preprocess_cached_batch(part, train=False, captions=no_pformer, dtype=dtype, shapes=shapes)
        assert "pixels" not in cached and "pformer_ids" not in cached
    else:
        cached = preprocess_image_batch(part, media=MediaSpec(size=32, train=False), captions=no_pformer,
                                        cached=dict(column="sentences", dtype=dtype, shape=shapes["sentences"]))
        assert np.array_equal(cached["pixels"], live["pixels"])  # prompt caches keep the images

    def to_torch(batch):
        return decode_cached(trim_padding({k: torch.from_numpy(np.ascontiguousarray(v)).long() if v.dtype == np.int32
                                           else torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}))

    live, cached = to_torch(live), to_torch(cached)
    assert torch.equal(live["qformer_ids"], cached["qformer_ids"])  # the same captions, in the same order
    torch.manual_seed(0)
    stage1 = get_stage("qformer").build_model(cfg).eval()
    with torch.no_grad():  # a trained ln_vision: the cache holds the tokens before it, so it stays valid
        stage1.qformer.ln_vision.weight.uniform_(0.5, 1.5)
        stage1.qformer.ln_vision.bias.uniform_(-0.5, 0.5)
    stage2 = LLMPretrain(stage1.vision, stage1.qformer, FrozenLLM.from_pretrained(tiny_models["opt"]), stage1.pformer,
                         Stage2Weights()).eval()
    tolerance = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-2}[dtype]
    for model in (stage1, stage2):
        torch.manual_seed(1)  # ITM draws its negatives: the same draws on both sides
        from_live = stage_losses(model, live)
        torch.manual_seed(1)
        from_cache = stage_losses(model, cached)
        assert set(from_live) == set(from_cache) and "align_loss" in from_live
        for name, value in from_live.items():
            assert torch.allclose(value, from_cache[name], rtol=tolerance, atol=tolerance), (
                type(model).__name__, name, float(value), float(from_cache[name]))


# ---------------------------------------------------------------------------------------------
# refusals and training from the cache


def test_a_cache_of_other_models_is_refused_by_name(ray_session, pformer_checkpoint, flickr_shards, tiny_models, tiny_vision,
                                                    tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from app import storage
    from app.data.feature_cache import CacheError
    from app.stages import get_stage
    from app.train.checkpoint import file_table

    out = tmp_path / "cache"
    code, printed = run_job(job_args(tmp_path, tiny_models, tiny_vision, pformer_checkpoint, out=str(out), train=str(flickr_shards)),
                            capsys)
    assert code == 0, printed

    def check(*extra):
        cfg = cache_config(tmp_path, tiny_models, tiny_vision, pformer_checkpoint, out=str(out), train=str(flickr_shards),
                           extra=[f"data.train_features={out}", *extra])
        return get_stage("qformer").validate(cfg, storage.S3Options())

    assert check().data.train_features == str(out)  # the same models: accepted
    with pytest.raises(CacheError, match=r"image encoder: the cache was made with .*blip2.* this run's model.vision is .*clip"):
        check(f"model.vision={tiny_vision['clip']}")
    with pytest.raises(CacheError, match=r"transform: the cache has image_size=32, this run needs 48"):
        check("data.image_size=48")
    # The cache keeps the tokens before the tower's final LayerNorm (a trainable ln_vision follows).
    with pytest.raises(CacheError, match=r"transform: the cache has tokens=\"before the tower's final LayerNorm\", "
                                         r"this run needs \"after the tower's frozen final LayerNorm\""):
        check("model.train_ln_vision=false")
    with pytest.raises(CacheError, match=r"captions: the cache holds captions normalised with data.caption_style='blip', "
                                         r"this run uses data.caption_style='raw'"):
        check("data.caption_style=raw")
    # A P-Former with one weight changed (same architecture, same path layout): refused by its weights.
    other = tmp_path / "other-pformer"
    shutil.copytree(pformer_checkpoint["opt"], other)
    weights = load_file(other / "model.safetensors")
    name = next(k for k in sorted(weights) if k.endswith("llm_proj.weight"))
    weights[name] = weights[name] + 0.01
    save_file(weights, other / "model.safetensors")
    manifest = json.loads((other / "manifest.json").read_text())  # a complete checkpoint of those weights
    manifest["files"] = file_table(other)
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=r"P-Former: the cache was made with .* this run's init_from.pformer is .*other-pformer"):
        check(f"init_from.pformer={other}")
    with pytest.raises(CacheError, match=r"no feature cache at"):
        check(f"data.train_features={tmp_path / 'nothing'}")
    # Writing into a cache made with other models is refused too (nothing is mixed).
    code, printed = run_job(job_args(tmp_path, tiny_models, tiny_vision, pformer_checkpoint, out=str(out), train=str(flickr_shards),
                                     extra=[f"model.vision={tiny_vision['clip']}"]), capsys)
    assert code == 2 and "holds a cache made differently (image encoder" in printed


def test_stage1_trains_from_a_cache_on_s3(ray_session, pformer_checkpoint, flickr_shards, tiny_models, tiny_vision, tmp_path,
                                          s3_endpoint, s3_bucket, capsys):
    from mlflow.tracking import MlflowClient

    from app.train.launcher import run_stage

    s3 = ["storage.s3_endpoint=" + s3_endpoint, "storage.s3_region=us-east-1"]
    uri = f"s3://{s3_bucket}/cache/flickr"
    code, printed = run_job(job_args(tmp_path, tiny_models, tiny_vision, pformer_checkpoint, out=uri, train=str(flickr_shards),
                                     extra=s3), capsys)
    assert code == 0 and "finished: 240 rows" in printed, printed
    mlflow_uri = mlflow_store(tmp_path / "mlflow.db")
    cfg = load_config(STAGE1, stage_args(tmp_path, tiny_models, tiny_vision, mlflow_uri, **{
        "data.train": "null", "data.train_features": uri, "init_from.pformer": pformer_checkpoint["opt"],
        "train.max_steps": 60, "train.epochs": 10, "train.log_every_steps": 15, "train.checkpoint_every_steps": 60,
        "run.name": "from-cache"}) + s3)
    summary = run_stage(cfg)
    client = MlflowClient(tracking_uri=mlflow_uri)
    for key in ("itc_loss", "itg_loss", "align_loss", "loss"):
        curve = [m.value for m in sorted(client.get_metric_history(summary["mlflow_run_id"], key), key=lambda m: m.step)]
        assert len(curve) == 4 and curve[-1] < curve[0], (key, curve)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["data.train_features"] == uri
    assert summary["data"]["rows_kept"] >= 60 * 16


def test_stage1_trains_from_a_prompt_cache(ray_session, pformer_checkpoint, flickr_shards, tiny_models, tiny_vision, tmp_path,
                                           capsys):
    """kind=prompts: the images are still decoded and augmented in training; only the P-Former's outputs come
    from the cache (no P-Former forward)."""
    from app.train.launcher import run_stage

    out = tmp_path / "prompts"
    code, printed = run_job(job_args(tmp_path, tiny_models, tiny_vision, pformer_checkpoint, out=str(out), train=str(flickr_shards),
                                     extra=["cache.kind=prompts", "cache.dtype=float16"]), capsys)
    assert code == 0 and "finished: 240 rows" in printed, printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["identity"]["kind"] == "prompts" and "vision" not in manifest["identity"]
    assert "image" in pq.read_table(out / manifest["parts"][0]).column_names
    mlflow_uri = mlflow_store(tmp_path / "mlflow.db")
    cfg = load_config(STAGE1, stage_args(tmp_path, tiny_models, tiny_vision, mlflow_uri, **{
        "data.train": "null", "data.train_features": str(out), "init_from.pformer": pformer_checkpoint["opt"],
        "train.max_steps": 20, "train.log_every_steps": 10, "train.checkpoint_every_steps": 20,
        "run.name": "from-prompts"}))
    summary = run_stage(cfg)
    assert summary["step"] == 20 and summary["data"]["rows_kept"] >= 20 * 16
    assert summary["metrics"]["align_loss"] > 0
