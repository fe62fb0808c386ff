"""Shared fixtures: real data from ../shared/data, tiny models trained on it, one local Ray instance,
a moto S3 server on 127.0.0.1, and a fresh SQLite MLflow store per test.

The suite runs in three tiers (each test gets one marker; `make test`, the CI command, runs all three):

    .venv/bin/python -m pytest -m unit           # make test-fast: tiny models built in memory, golden values,
                                                 # pure functions; no Ray, no files beyond ../shared/data (< 1 min)
    .venv/bin/python -m pytest -m integration    # real Ray, MLflow, moto S3, jobs as subprocesses, a few steps
    .venv/bin/python -m pytest -m slow           # learning curves, stage chains, sweeps, the cluster, resume
    .venv/bin/python -m pytest -m "not slow"     # unit + integration

A test is `slow` when it says so (`@pytest.mark.slow`) or trains through the `stage0` / `chains` fixtures,
`integration` when it says so or uses Ray, the trained tiny models, MLflow or S3 (the fixtures below),
and `unit` otherwise: a new test that starts Ray cannot land in the fast tier by accident.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TIERS = ("unit", "integration", "slow")
SLOW_FIXTURES = {"stage0", "chains"}
INTEGRATION_FIXTURES = {"ray_session", "tiny_models", "tiny_vision", "s3_endpoint", "s3_bucket", "mlflow_uri",
                        "flickr_shards", "pformer_checkpoint"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        marked = [t for t in TIERS if item.get_closest_marker(t)]
        if len(marked) > 1:
            raise pytest.UsageError(f"{item.nodeid} is marked {marked}: one tier per test")
        if marked:
            continue
        fixtures = set(item.fixturenames)
        tier = "slow" if fixtures & SLOW_FIXTURES else "integration" if fixtures & INTEGRATION_FIXTURES else "unit"
        item.add_marker(getattr(pytest.mark, tier))

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PFORMER_SHARED_DATA", ROOT.parent / "shared" / "data"))
COCO_TSV = SHARED_DATA / "text" / "coco_val2014_captions.tsv"

# Fake credentials for the moto endpoint, set before Ray starts so its workers inherit them (and so that no
# test can reach a real account). Each is a marker: found anywhere a run writes, it is a leak
# (test_evaluation's credential check).
CREDENTIAL_MARKERS = {"AWS_ACCESS_KEY_ID": "AKIAMARKERKEY7Q2XW9", "AWS_SECRET_ACCESS_KEY": "marker-secret-4f1d9c7e2b",
                      "AWS_SESSION_TOKEN": "marker-session-token-8e3a6b"}
os.environ.update(CREDENTIAL_MARKERS)
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


def credential_leaks(*, folders=(), texts: dict[str, str] | None = None, s3_endpoint: str | None = None) -> list[str]:
    """Where a credential marker appears: files under `folders`, the named `texts`, every object of every
    bucket at `s3_endpoint`."""
    markers = [m.encode() for m in CREDENTIAL_MARKERS.values()]
    found = [f"{name}: {m.decode()}" for name, text in (texts or {}).items() for m in markers if m in text.encode()]
    for folder in folders:
        for path in Path(folder).rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                found += [f"{path}: {m.decode()}" for m in markers if m in data]
    if s3_endpoint:
        import boto3

        s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
        for bucket in s3.list_buckets()["Buckets"]:
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket["Name"]):
                for obj in page.get("Contents", []):
                    data = s3.get_object(Bucket=bucket["Name"], Key=obj["Key"])["Body"].read()
                    found += [f"s3://{bucket['Name']}/{obj['Key']}: {m.decode()}" for m in markers if m in data]
    return found
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray Train's controller polls its workers every 2 s by default: each test run would wait up to that long at
# its start and at its end. The tests' runs are short, so they poll more often (a Ray setting, not ours).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


COCO_SUBSET_LINES = 30_000
# Runs whose claim is what the loop learns or hands on (curves, chains, caches, subsets, the pipeline) train in
# Ray Train's local mode: the same loop, data pipeline, checkpoints and MLflow history, in the test process,
# without a controller and worker processes that each import torch (`python bench/local_mode.py` on 2 cores: a
# 2-step stage-0 run 18.8 s -> 3.9 s, a 100-step one 38.8 s -> 5.8 s). The worker machinery keeps its own tests:
# two workers, killed workers, S3 checkpoints and outages, the sweep, the two-node cluster.
LOCAL_MODE = "scaling.num_workers=0"


def text_subset(source: Path, lines: int) -> Path:
    """The first `lines` rows of a real caption TSV (header kept), written once to the temp folder."""
    import tempfile

    path = Path(tempfile.gettempdir()) / f"pformer-tests-{source.stem}-{lines}.tsv"
    if not path.exists():
        kept = source.read_text(encoding="utf-8").splitlines(keepends=True)[: lines + 1]
        tmp = path.with_name(f"{path.name}.{os.getpid()}")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(path)
    return path


def coco_subset() -> Path:
    """The first 30,000 captions of the real COCO file: more than any test trains on (800 steps x 32), and a
    seventh of the reading and tokenising that the whole 202k-line file costs a stage-0 run, which streams it
    through Ray Data beside the trainer on the same two cores."""
    return text_subset(COCO_TSV, COCO_SUBSET_LINES)


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

    from app.train.launcher import start_local_ray

    start_local_ray(num_cpus=8)
    yield ray
    ray.shutdown()


_EMPTY_MLFLOW_STORE: list[Path] = []


def mlflow_store(path: Path) -> str:
    """The URI of a SQLite MLflow store at `path`; a new one is a copy of an empty store whose tables MLflow
    created once per test process (creating them is 1-2 s of migrations, paid by about 50 stores a run).
    An existing store is left as it is."""
    import shutil
    import tempfile

    path = Path(path)
    if not path.exists():
        if not _EMPTY_MLFLOW_STORE:
            from mlflow.tracking import MlflowClient

            empty = Path(tempfile.mkdtemp(prefix="pformer-tests-mlflow-")) / "empty.db"
            MlflowClient(tracking_uri=f"sqlite:///{empty}").search_experiments()  # creates the tables
            _EMPTY_MLFLOW_STORE.append(empty)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_EMPTY_MLFLOW_STORE[0], path)
    return f"sqlite:///{path}"


@pytest.fixture
def mlflow_uri(tmp_path) -> str:
    return mlflow_store(tmp_path / "mlflow.db")


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


FLICKR = SHARED_DATA / "flickr8k"
STAGE0_CONFIG = ROOT / "configs" / "tiny" / "stage0.yaml"
# Stage-0 P-Formers trained once per session on real COCO captions; the stage-0 learning test checks their
# curves and the stage-1/2 tests start from them. The tiny T5 needs more steps to use its prompt.
STAGE0_STEPS = {"opt": 200, "t5": 400}
STAGE0_WINDOW = {"opt": 20, "t5": 40}


@pytest.fixture(scope="session")
def tiny_vision(tmp_path_factory) -> dict[str, str]:
    """Tiny random vision towers (Blip2VisionModel and CLIPVisionModel) with image-processor configs."""
    from app.models.tiny import build_tiny_vision

    root = tmp_path_factory.mktemp("vision")
    return {kind: build_tiny_vision(root / kind, kind=kind) for kind in ("blip2", "clip")}


@pytest.fixture(scope="session")
def stage0(ray_session, tiny_models, shared_data, tmp_path_factory) -> dict:
    """{"opt": summary, "t5": summary, "mlflow_uri": ...}: trained lazily, one LLM family at a time."""
    from app.config import load_config
    from app.train.launcher import run_stage

    root = tmp_path_factory.mktemp("stage0")
    uri = mlflow_store(root / "mlflow.db")

    class Lazy(dict):
        def __missing__(self, kind):
            steps, window = STAGE0_STEPS[kind], STAGE0_WINDOW[kind]
            cfg = load_config(STAGE0_CONFIG, [
                f"run.storage_path={root / 'ckpt'}", f"mlflow.tracking_uri={uri}", f"run.name=stage0-{kind}",
                f"model.pformer={tiny_models['bert']}", f"model.llm={tiny_models[kind]}",
                f"data.text={coco_subset()}", "model.num_query_tokens=32",
                f"train.max_steps={steps}", "train.batch_size_per_worker=32", "train.warmup_steps=20",
                f"train.log_every_steps={window}", f"train.checkpoint_every_steps={steps}", LOCAL_MODE])
            self[kind] = run_stage(cfg)
            return self[kind]

    return Lazy(mlflow_uri=uri)


def write_pformer_checkpoint(directory: Path, tiny_models: dict[str, str], kind: str = "opt",
                             num_query_tokens: int = 32) -> str:
    """An untrained P-Former checkpoint for the tiny `kind` LLM, written by the training code's own
    save_checkpoint and save_extras: what stages 1-2, the cache and the sweep take from stage 0."""
    import torch

    from app.config import load_config
    from app.stages import PFormerStage
    from app.train.checkpoint import TrainerState, save_checkpoint
    from app.train.optim import build_optimizer, build_scheduler

    cfg = load_config(STAGE0_CONFIG, [f"model.pformer={tiny_models['bert']}", f"model.llm={tiny_models[kind]}",
                                      f"model.num_query_tokens={num_query_tokens}", "train.max_steps=1"])
    torch.manual_seed(0)
    stage = PFormerStage()
    model = stage.build_model(cfg)
    optimizer = build_optimizer(model.trainable_parameters(), cfg.train.lr, cfg.train.weight_decay, cfg.train.betas)
    save_checkpoint(directory, model=model, optimizer=optimizer, scheduler=build_scheduler(optimizer, cfg.train),
                    scaler=None, state=TrainerState(step=1), config_yaml=cfg.to_yaml(), manifest=stage.manifest(cfg),
                    extras=lambda d: stage.save_extras(model, d, cfg))
    return str(directory)


@pytest.fixture(scope="session")
def pformer_checkpoint(tiny_models, tmp_path_factory) -> dict[str, str]:
    """{"opt": a stage-0 checkpoint}: an untrained P-Former for the tiny OPT (32 prompts), for tests that only
    hand a P-Former on (caches, checks, sweeps, subsets). Seconds, where the trained `stage0` fixture takes
    minutes."""
    return {"opt": write_pformer_checkpoint(tmp_path_factory.mktemp("pformer") / "checkpoint_00000001", tiny_models)}


STAGE1_CONFIG = ROOT / "configs" / "tiny" / "stage1.yaml"
STAGE2_CONFIG = {"opt": ROOT / "configs" / "tiny" / "stage2.yaml", "t5": ROOT / "configs" / "tiny" / "stage2_t5.yaml"}


def stage_args(tmp_path, tiny_models, tiny_vision, mlflow_uri, kind="opt", storage=None, **extra) -> list[str]:
    """Overrides of a tiny stage-1/2 config for the session's models; local mode unless `extra` names workers."""
    items = {"run.storage_path": storage or str(tmp_path / "ckpt"), "mlflow.tracking_uri": mlflow_uri,
             "scaling.num_workers": 0,
             "data.val": "null",  # the tiny configs validate on .demo/ shards; tests name their own
             "model.qformer": tiny_models["bert"], "model.llm": tiny_models[kind], "model.vision": tiny_vision["blip2"],
             "model.num_query_tokens": 32, **extra}
    return [f"{k}={v}" for k, v in items.items()]


CHAIN_STEPS = 60


@pytest.fixture(scope="session")
def chains(stage0, flickr_shards, tiny_models, tiny_vision, s3_endpoint, tmp_path_factory) -> dict:
    """Stage 0 -> 1 -> 2 on real Flickr8k shards, trained lazily per LLM family and shared by the chain tests
    and the evaluation tests: "opt" from local shards to local checkpoints, "t5" from S3 shards to S3
    checkpoints (moto). Each value: {"stage1": summary, "stage2": summary, "mlflow_uri", "s3_endpoint"}."""
    import boto3

    from app.config import load_config
    from app.train.launcher import run_stage

    root = tmp_path_factory.mktemp("chains")

    class Lazy(dict):
        def __missing__(self, kind):
            mlflow_uri = mlflow_store(root / f"mlflow-{kind}.db")
            extra, storage, train_uri = {}, None, str(flickr_shards)
            if kind == "t5":
                bucket = "chain-t5"
                s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
                s3.create_bucket(Bucket=bucket)
                for path in sorted(flickr_shards.iterdir()):
                    s3.upload_file(str(path), bucket, f"flickr/{path.name}")
                storage, train_uri = f"s3://{bucket}/checkpoints", f"s3://{bucket}/flickr"
                extra = {"storage.s3_endpoint": s3_endpoint, "storage.s3_region": "us-east-1"}
            # 60 steps of 16 pass over the 240 samples four times; validation scores 64 of them with eval transforms.
            common = dict(kind=kind, storage=storage, **{
                "data.train": train_uri, "data.val": train_uri, "train.max_steps": CHAIN_STEPS, "train.epochs": 10,
                "train.log_every_steps": CHAIN_STEPS // 4, "train.checkpoint_every_steps": CHAIN_STEPS}, **extra)
            stage1 = run_stage(load_config(STAGE1_CONFIG, stage_args(root, tiny_models, tiny_vision, mlflow_uri, **common, **{
                "run.name": f"s1-{kind}", "init_from.pformer": stage0[kind]["checkpoint"]})))
            run_folder = f"{storage or root / 'ckpt'}/s1-{kind}"  # a run folder: its latest checkpoint is used
            stage2 = run_stage(load_config(STAGE2_CONFIG[kind], stage_args(root, tiny_models, tiny_vision, mlflow_uri, **common, **{
                "run.name": f"s2-{kind}", "init_from.qformer": run_folder})))
            self[kind] = {"stage1": stage1, "stage2": stage2, "mlflow_uri": mlflow_uri,
                          "s3_endpoint": s3_endpoint if kind == "t5" else None, "storage": storage or str(root / "ckpt")}
            return self[kind]

    return Lazy()


def subset_captions(path: Path, count: int, start: int = 0) -> Path:
    """A captions.json listing `count` Flickr8k photos (sorted names from `start`) with their captions."""
    import json

    captions = json.loads((FLICKR / "captions.json").read_text())
    names = sorted(captions)[start:start + count]
    path.write_text(json.dumps({name: captions[name] for name in names}))
    return path


def fail_fast(module: str, args: list, monkeypatch, capsys, *, subprocess_run: bool = False) -> tuple[int, str]:
    """Run a job that must refuse its input before Ray starts: (exit code, stderr). In this process by default
    (its `main`, through the same harness; `init_ray` refuses to run), or as `python -m module` with Ray
    marked as started by its "Started a local Ray instance" line (one case per job takes the real CLI path)."""
    import importlib
    import subprocess
    import sys

    if subprocess_run:
        done = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True,
                              text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": ""})
        assert "Started a local Ray instance" not in done.stderr + done.stdout
        return done.returncode, done.stderr
    from app.train import launcher

    def refuse(*_args, **_kwargs):
        raise AssertionError(f"{module} started Ray before refusing its input")

    monkeypatch.setattr(launcher, "init_ray", refuse)
    code = importlib.import_module(module).main(list(map(str, args)))
    return code, capsys.readouterr().err


def processes_using(*markers: str) -> list[str]:
    """`pid args` of this machine's processes whose command line names any of `markers` (Ray process titles
    name their actor, e.g. ray::RayTrainWorker; a Ray head's processes name its temp dir)."""
    import subprocess

    out = subprocess.run(["ps", "-eww", "-o", "pid,args"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in out if any(m in line for m in markers) and "ps -eww" not in line]


def free_ports(count: int = 1) -> list[int]:
    """Ports free on 127.0.0.1 now (bound together, so distinct), for servers the tests start themselves."""
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def start_mlflow_server(store: Path, port: int, log: Path):
    """A real tracking server (`mlflow server`, one worker, no job runner) on 127.0.0.1:`port`, answering;
    in a session of its own, so that os.killpg stops it with its workers."""
    import subprocess
    import sys
    import time
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{store}",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            cwd=store.parent, stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)


def make_shards_cli(*args: str, timeout: int = 300):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "jobs.make_shards", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def flickr_shards(shared_data, tmp_path_factory) -> Path:
    """WebDataset shards (one sample per caption) of 48 real Flickr8k photos, written by jobs.make_shards."""
    root = tmp_path_factory.mktemp("flickr")
    out = root / "shards"
    done = make_shards_cli("--images", FLICKR / "images", "--captions", subset_captions(root / "captions.json", 48),
                           "--out", out, "--shard-size", "80")
    assert done.returncode == 0, done.stderr[-3000:]
    return out


# ---------------------------------------------------------------------------------------------
# bad image-text samples, made from real photos


def photo(index: int = 0) -> bytes:
    return sorted((FLICKR / "images").iterdir())[index].read_bytes()


def encoded(image, fmt: str) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_tar(path, samples: list[tuple[str, dict[str, bytes]]]) -> str:
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def bad_samples(num_good: int = 6) -> list[tuple[str, dict[str, bytes]]]:
    """Good Flickr8k samples plus one of each problem (8 bad, 3 convertible); keys sort in this order."""
    import io
    import json

    from PIL import Image

    rgb = Image.open(io.BytesIO(photo(1))).convert("RGB")
    captions = json.loads((FLICKR / "captions.json").read_text())
    names = sorted(captions)
    samples = [(f"a{i:02d}", {"jpg": photo(i), "txt": captions[names[i]][0].encode()}) for i in range(num_good)]
    samples += [
        ("b_truncated", {"jpg": photo(2)[: len(photo(2)) // 2], "txt": b"a truncated photo"}),
        ("c_no_caption", {"jpg": photo(3)}),
        ("d_empty_caption", {"jpg": photo(4), "txt": b"  \t "}),
        ("e_cmyk", {"jpg": encoded(rgb.convert("CMYK"), "JPEG"), "txt": b"a cmyk photo"}),
        ("f_gray", {"jpg": encoded(rgb.convert("L"), "JPEG"), "txt": b"a grayscale photo"}),
        ("g_alpha", {"png": encoded(rgb.convert("RGBA"), "PNG"), "json": json.dumps({"caption": "a png"}).encode()}),
        ("h_not_an_image", {"jpg": b"<html>404</html>", "txt": b"an error page"}),
        ("i_no_image", {"txt": b"a caption without its image"}),
    ]
    return samples
