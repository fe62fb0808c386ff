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


def test_s3_filesystems_keep_their_retry_settings_when_ray_pickles_them():
    """Ray ships filesystems to read tasks and training workers by pickling them; pyarrow's own S3FileSystem
    loses its retry strategy on the way (3 quick attempts on the other side), ours is rebuilt from its options."""
    import pickle

    import pyarrow.fs as pafs
    from ray import cloudpickle

    options = storage.S3Options(endpoint="http://127.0.0.1:9", region="us-east-1", max_attempts=7)
    fs, path = storage.resolve("s3://bucket/key", options)
    assert path == "bucket/key" and isinstance(fs, pafs.S3FileSystem)
    for dumps, loads in ((pickle.dumps, pickle.loads), (cloudpickle.dumps, cloudpickle.loads)):
        copy = loads(dumps(fs))
        assert type(copy) is storage.RetryingS3FileSystem and copy.options == options
    assert storage.S3Options().max_attempts == 11  # storage.s3_max_attempts' default


def test_an_unreachable_s3_endpoint_is_told_from_other_errors():
    """pyarrow's own error for an endpoint that does not answer (a closed port), found through a chain of
    exceptions; a missing key or any other error is not an outage."""
    from conftest import free_ports

    port, = free_ports()
    fs = storage.s3_filesystem(storage.S3Options(endpoint=f"http://127.0.0.1:{port}", max_attempts=1))
    try:
        fs.get_file_info("bucket/key")
    except OSError as err:
        refused = err
    try:
        raise RuntimeError("the worker group failed") from refused
    except RuntimeError as err:
        chained = err
    found = storage.s3_unavailable(chained)
    assert found.startswith("AWS Error NETWORK_CONNECTION during HeadObject operation") and "\n" not in found
    assert storage.s3_unavailable(FileNotFoundError("s3://b/k: no such key")) is None
    assert storage.s3_unavailable(ValueError("AWS Error ACCESS_DENIED during GetObject operation")) is None
