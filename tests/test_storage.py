"""The s3:// model/checkpoint cache against a real S3 endpoint (moto on 127.0.0.1)."""

import boto3

from app import storage


def test_cached_download_follows_rewritten_objects(s3_endpoint, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("PFORMER_MODEL_CACHE", str(tmp_path / "cache"))
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    options = storage.S3Options(s3_endpoint, "us-east-1")
    uri = f"s3://{s3_bucket}/run/checkpoint_00000010"
    s3.put_object(Bucket=s3_bucket, Key="run/checkpoint_00000010/model.safetensors", Body=b"first weights")
    s3.put_object(Bucket=s3_bucket, Key="run/checkpoint_00000010/optimizer.pt", Body=b"x" * 1000)
    s3.put_object(Bucket=s3_bucket, Key="run/checkpoint_00000010/qformer/config.json", Body=b"{}")

    first = storage.local_model(uri, options, only=("model.safetensors", "qformer"))
    assert open(f"{first}/model.safetensors", "rb").read() == b"first weights"
    assert open(f"{first}/qformer/config.json", "rb").read() == b"{}"
    assert not (tmp_path / "cache" / first / "optimizer.pt").exists()  # only what was asked for
    assert storage.local_model(uri, options, only=("model.safetensors", "qformer")) == first  # cached

    # The same URI rewritten (a run relaunched from scratch under the same name): fetched again.
    s3.put_object(Bucket=s3_bucket, Key="run/checkpoint_00000010/model.safetensors", Body=b"second weights!")
    second = storage.local_model(uri, options, only=("model.safetensors", "qformer"))
    assert second != first and open(f"{second}/model.safetensors", "rb").read() == b"second weights!"
    whole = storage.local_model(uri, options)
    assert open(f"{whole}/optimizer.pt", "rb").read() == b"x" * 1000
