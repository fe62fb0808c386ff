"""Shared fixtures: real data from ../shared/data, tiny models trained on it, one local Ray instance,
a moto S3 server on 127.0.0.1, and a fresh SQLite MLflow store per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PFORMER_SHARED_DATA", ROOT.parent / "shared" / "data"))
COCO_TSV = SHARED_DATA / "text" / "coco_val2014_captions.tsv"

# Fake credentials for the moto endpoint; set before Ray starts so its workers inherit them.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def coco_captions(limit: int | None = None) -> list[str]:
    lines = COCO_TSV.read_text(encoding="utf-8").splitlines()[1:]
    captions = [line.split("\t", 1)[1] for line in lines if "\t" in line]
    return captions[:limit] if limit else captions


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not COCO_TSV.exists():
        pytest.fail(f"real test data not found at {SHARED_DATA} (set PFORMER_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_models(shared_data) -> dict[str, str]:
    """Tiny BERT / OPT / T5 with tokenizers trained on 20k real COCO captions (cached across runs)."""
    from app.models.tiny import prepare_tiny_models

    cache = Path(os.environ.get("PFORMER_TEST_CACHE", Path.home() / ".cache" / "pformer-tests")) / "tiny_models"
    return prepare_tiny_models(cache, coco_captions(20_000))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for every Ray test (8 logical CPUs so Ray Data is not starved)."""
    import ray

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


@pytest.fixture
def mlflow_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP endpoint on loopback (moto server)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    import boto3

    name = "t-" + request.node.name.lower().replace("_", "-")[:50]
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    return name
