"""How a cluster runs the jobs, on this machine: `ray job submit` to a head started with `ray start` (token
auth) and a second node joined to it, one training worker on each; the second node lost mid-run (its
processes SIGKILLed, as when a spot instance is taken back) and a new one joined in its place, as the
autoscaler does on AWS. The cluster is separate processes that the test starts and stops itself; the test
session's own Ray instance is left alone."""

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import ROOT, coco_subset, free_ports, mlflow_store, processes_using

RAY = str(Path(sys.executable).parent / "ray")



def stage0_overrides(tmp_path: Path, tiny_models: dict, mlflow_uri: str, name: str) -> list[str]:
    return [f"run.name={name}", f"run.storage_path={tmp_path / 'ckpt'}", f"mlflow.tracking_uri={mlflow_uri}",
            f"data.text={coco_subset()}", f"model.pformer={tiny_models['bert']}", f"model.llm={tiny_models['opt']}",
            "train.max_steps=40", "train.log_every_steps=10", "train.checkpoint_every_steps=10",
            "train.batch_size_per_worker=8", "train.warmup_steps=1", "train.max_failures=1"]


def start_node(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    with log.open("w") as out:  # the child keeps its own descriptor
        return subprocess.Popen([RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
                                 *args], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop_node(node: subprocess.Popen) -> None:
    """SIGTERM to the blocking `ray start`, which takes its node's processes down."""
    if node.poll() is None:
        node.send_signal(signal.SIGTERM)
    try:
        node.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(node.pid, signal.SIGKILL)
        node.wait(timeout=30)


def node_ports() -> list[str]:
    agent_http, agent_grpc, runtime_env, metrics, node_manager, object_manager = free_ports(6)
    return [f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
            f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}"]


@pytest.fixture
def ray_cluster(tmp_path):
    """A two-node cluster on 127.0.0.1 with token auth, as `ray up` makes one: `ray start --head` and a
    second `ray start --address` (another raylet, as a worker machine runs), on free ports and one temp dir;
    both stopped at the end."""
    temp_dir = tempfile.mkdtemp(prefix="rayhead", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    gcs, dashboard = free_ports(2)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
           # a lost node is declared dead after ~3 s of silence (default ~15 s)
           "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
           "RAY_health_check_failure_threshold": "3"}
    env.pop("RAY_ADDRESS", None)
    head = start_node(["--head", f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                       f"--dashboard-port={dashboard}", "--num-cpus=3", f"--temp-dir={temp_dir}", *node_ports()],
                      env, tmp_path / "ray-head.log")
    nodes = [head]
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_until(lambda: subprocess.run([RAY, "job", "list", "--address", address], env=env,
                                          capture_output=True).returncode == 0, nodes, tmp_path / "ray-head.log")
        def join(name: str) -> subprocess.Popen:
            nodes.append(start_node([f"--address=127.0.0.1:{gcs}", "--num-cpus=3", f"--temp-dir={temp_dir}",
                                     *node_ports()], env, tmp_path / f"ray-{name}.log"))
            return nodes[-1]

        join("worker")
        wait_until(lambda: alive_nodes(address, env) == 2, nodes, tmp_path / "ray-worker.log")
        yield {"env": env, "address": address, "temp_dir": temp_dir, "nodes": nodes, "join": join}
    finally:
        for node in reversed(nodes):
            stop_node(node)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children, ...), however they set their process group."""
    rows = [line.split() for line in subprocess.run(["ps", "-eo", "pid,ppid"], capture_output=True,
                                                    text=True).stdout.splitlines()[1:]]
    children: dict[int, list[int]] = {}
    for child, parent in ((int(a), int(b)) for a, b in rows):
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive_nodes(address: str, env: dict) -> int:
    """How many nodes the head's state API lists as alive; 0 while it cannot answer yet."""
    listed = subprocess.run([RAY, "list", "nodes", "--address", address, "--format", "json"], env=env,
                            capture_output=True, text=True)
    try:
        nodes = json.loads(listed.stdout) if listed.returncode == 0 else []
    except ValueError:  # the dashboard answers before its state API is ready
        return 0
    return sum(isinstance(n, dict) and n.get("state") == "ALIVE" for n in nodes) if isinstance(nodes, list) else 0


def wait_until(condition, nodes: list[subprocess.Popen], log: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not condition():
        if any(n.poll() is not None for n in nodes) or time.time() > deadline:
            raise AssertionError(f"the Ray cluster did not come up: {log.read_text()[-3000:]}")
        time.sleep(2)


@pytest.mark.slow
def test_ray_job_submit_trains_across_two_nodes_with_token_auth_and_survives_losing_one(ray_cluster, tmp_path,
                                                                                         tiny_models):
    """`ray job submit` to the head runs a stage with one training worker on each node (STRICT_SPREAD
    places them on different nodes or not at all); without the token the job API refuses. Once the run's
    first checkpoint is on disk, every process of the second node is SIGKILLed and a new node joins: the
    worker group (train.max_failures=1) waits for it, resumes from the newest complete checkpoint and
    finishes, with each step once in MLflow."""
    from mlflow.tracking import MlflowClient

    mlflow_uri = mlflow_store(tmp_path / "mlflow.db")
    env = ray_cluster["env"]
    anonymous = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    anonymous["RAY_AUTH_MODE"] = "disabled"
    refused = subprocess.run([RAY, "job", "list", "--address", ray_cluster["address"]], env=anonymous,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    log = tmp_path / "submit.log"
    with log.open("w") as out:
        submit = subprocess.Popen(
            [RAY, "job", "submit", "--address", ray_cluster["address"], "--working-dir", str(ROOT), "--",
             "python", "-m", "jobs.pretrain_pformer", "--config", "configs/tiny/stage0.yaml",
             "--summary", str(tmp_path / "summary.json"),
             *stage0_overrides(tmp_path, tiny_models, mlflow_uri, "submitted"),
             "scaling.num_workers=2", "scaling.placement_strategy=STRICT_SPREAD"],
            env=env, stdout=out, stderr=subprocess.STDOUT)
    first = tmp_path / "ckpt" / "submitted" / "checkpoint_00000010" / "manifest.json"
    deadline = time.time() + 400
    while not first.exists():
        assert submit.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    lost = ray_cluster["nodes"][1]
    doomed = descendants(lost.pid)  # the raylet, its training worker, Ray Data tasks: all the node runs
    os.killpg(lost.pid, signal.SIGKILL)
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    lost.wait(timeout=30)
    ray_cluster["join"]("replacement")
    assert submit.wait(timeout=600) == 0, log.read_text()[-4000:]
    text = log.read_text()
    assert "succeeded" in text
    resumed = int(text.split("resuming from step ", 1)[1].split()[0]) if "resuming from step " in text else -1
    assert 10 <= resumed < 40, text[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["step"] == 40
    checkpoint = Path(summary["checkpoint"])
    assert checkpoint.is_dir() and checkpoint.parent.parent == tmp_path / "ckpt"
    assert (checkpoint / "manifest.json").exists()
    client = MlflowClient(tracking_uri=mlflow_uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "submitted" and "lm_loss" in run.data.metrics
    assert run.data.params["scaling.num_workers"] == "2"
    assert run.data.params["scaling.placement_strategy"] == "STRICT_SPREAD"
    assert [m.step for m in sorted(client.get_metric_history(run.info.run_id, "lm_loss"), key=lambda m: m.step)] \
        == [10, 20, 30, 40]
    # Stopping the nodes takes down every process they started (their command lines name the temp dir).
    for node in reversed(ray_cluster["nodes"]):
        stop_node(node)
    deadline = time.time() + 30
    while processes_using(ray_cluster["temp_dir"]) and time.time() < deadline:
        time.sleep(1)
    assert processes_using(ray_cluster["temp_dir"]) == []
