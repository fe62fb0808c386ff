"""The ways a cluster runs the jobs, on this machine: `ray job submit` to a head started with `ray start`
(token auth), and one training run across two Ray nodes. Both clusters are separate processes that
these tests start and stop themselves; the test session's own Ray instance is left alone."""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import ROOT, coco_subset, mlflow_store, processes_using

STAGE0 = ROOT / "configs" / "tiny" / "stage0.yaml"
RAY = str(Path(sys.executable).parent / "ray")


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def stage0_overrides(tmp_path: Path, tiny_models: dict, mlflow_uri: str, name: str) -> list[str]:
    return [f"run.name={name}", f"run.storage_path={tmp_path / 'ckpt'}", f"mlflow.tracking_uri={mlflow_uri}",
            f"data.text={coco_subset()}", f"model.pformer={tiny_models['bert']}", f"model.llm={tiny_models['opt']}",
            "train.max_steps=6", "train.log_every_steps=3", "train.checkpoint_every_steps=6",
            "train.batch_size_per_worker=8", "train.warmup_steps=1"]


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head --block` on 127.0.0.1 with token auth, on free ports and its own temp dir; stopped
    (SIGTERM to the blocking `ray start`, which takes its processes down) at the end."""
    temp_dir = tempfile.mkdtemp(prefix="rayhead", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    gcs, dashboard, agent_http, agent_grpc, runtime_env, metrics, node_manager, object_manager = free_ports(8)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    log = (tmp_path / "ray-head.log").open("w")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
         f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
         "--num-cpus=4", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 180
        while True:
            probe = subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True, text=True)
            if probe.returncode == 0:
                break
            if head.poll() is not None or time.time() > deadline:
                raise AssertionError(f"ray head did not come up: {(tmp_path / 'ray-head.log').read_text()[-3000:]}")
            time.sleep(2)
        yield {"env": env, "address": address, "temp_dir": temp_dir, "process": head}
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        log.close()


@pytest.mark.slow
def test_ray_job_submit_runs_a_stage_on_a_head_with_token_auth(ray_head, tmp_path, tiny_models):
    from mlflow.tracking import MlflowClient

    mlflow_uri = mlflow_store(tmp_path / "mlflow.db")
    env = ray_head["env"]
    # Without the token the job API refuses.
    anonymous = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    anonymous["RAY_AUTH_MODE"] = "disabled"
    refused = subprocess.run([RAY, "job", "list", "--address", ray_head["address"]], env=anonymous,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    submit = subprocess.run(
        [RAY, "job", "submit", "--address", ray_head["address"], "--working-dir", str(ROOT), "--",
         "python", "-m", "jobs.pretrain_pformer", "--config", "configs/tiny/stage0.yaml",
         "--summary", str(tmp_path / "summary.json"), *stage0_overrides(tmp_path, tiny_models, mlflow_uri, "submitted")],
        env=env, capture_output=True, text=True, timeout=600)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "succeeded" in submit.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    run = MlflowClient(tracking_uri=mlflow_uri).get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "submitted"
    assert "lm_loss" in run.data.metrics and Path(summary["checkpoint"]).is_dir()
    # Stopping the head takes down every process it started (their command lines name its temp dir).
    ray_head["process"].send_signal(signal.SIGTERM)
    ray_head["process"].wait(timeout=90)
    deadline = time.time() + 30
    while processes_using(ray_head["temp_dir"]) and time.time() < deadline:
        time.sleep(1)
    assert processes_using(ray_head["temp_dir"]) == []


@pytest.mark.slow
def test_training_across_two_ray_nodes_one_worker_each(tmp_path, tiny_models):
    from mlflow.tracking import MlflowClient

    mlflow_uri = mlflow_store(tmp_path / "mlflow.db")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "helpers" / "two_nodes.py"), str(STAGE0),
                           *stage0_overrides(tmp_path, tiny_models, mlflow_uri, "two-nodes")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(summary["nodes"]) == 2
    checkpoint = Path(summary["checkpoint"])
    assert checkpoint.is_dir() and checkpoint.parent.parent == tmp_path / "ckpt"
    assert (checkpoint / "manifest.json").exists()
    run = MlflowClient(tracking_uri=mlflow_uri).get_run(summary["mlflow_run_id"])
    assert run.data.params["scaling.num_workers"] == "2"
    assert run.data.params["scaling.placement_strategy"] == "STRICT_SPREAD"
    assert "lm_loss" in run.data.metrics
