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
# A node told to stop waits up to 30 s for its work to drain first; these stop once the test is done with them.
QUICK_STOP = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "2"}



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
           "RAY_health_check_failure_threshold": "3", **QUICK_STOP}
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
        wait_until(lambda: alive_nodes(address, env) == 2 and accepts_jobs(address, env), nodes,
                   tmp_path / "ray-worker.log")
        yield {"env": env, "address": address, "temp_dir": temp_dir, "nodes": nodes, "join": join}
    finally:
        for node in reversed(nodes):
            stop_node(node)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children, ...), however they set their process group."""
    rows = [line.split() for line in subprocess.run(["ps", "-eww", "-o", "pid,ppid"], capture_output=True,
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


def accepts_jobs(address: str, env: dict) -> bool:
    """Whether the head runs jobs yet: its job agent registers a while after the dashboard answers (a submit
    before that fails with "No available agent to submit job")."""
    return subprocess.run([RAY, "job", "submit", "--address", address, "--", "true"], env=env, capture_output=True,
                          timeout=120).returncode == 0


def submit_when_accepted(log: Path, env: dict, args: list[str], timeout: float = 180) -> subprocess.Popen:
    """`ray job submit ...args`, again while the head answers "No available agent to submit job" (its job agent
    registers a while after the dashboard answers); the submit that was accepted, still tailing the job."""
    deadline = time.time() + timeout
    while True:
        with log.open("w") as out:
            submit = subprocess.Popen([RAY, "job", "submit", *args], env=env, stdout=out, stderr=subprocess.STDOUT)
        while submit.poll() is None and "submitted successfully" not in log.read_text():
            time.sleep(0.5)
        if submit.poll() is None or "No available agent" not in log.read_text() or time.time() > deadline:
            return submit
        time.sleep(2)


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


# ---------------------------------------------------------------------------------------------
# the autoscaler, with Ray's fake multi-node provider (nodes are local processes)

FAKE_NODE_PREFIX = "f" * 51  # the fake provider's node ids: this, then the node's number in 5 digits
FAKE_GPUS = {"gpu_4x": 1, "gpu_8x": 2}  # per node of each GPU type, scaled down from 4 and 8


def fake_cluster_config(gcs_address: str) -> dict:
    """`cluster.yaml` for Ray's fake multi-node provider: its node types, counts scaled down (at most 3 of each:
    the provider keeps listing a node whose processes were killed, so a replacement needs room beside it),
    2 CPUs and a small object store per node, fake GPUs beside each GPU type's own resource (fake GPUs cannot
    run CUDA, so a job asks for the type, not for GPUs); the idle timeout cut to 15 s."""
    import yaml

    source = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    types = {"ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}}
    for name, spec in source["available_node_types"].items():
        if name == source["head_node_type"]:
            continue
        gpus = FAKE_GPUS.get(name, 0)
        types[name] = {"resources": {**spec.get("resources", {}), "CPU": 2, **({"GPU": gpus} if gpus else {}),
                                     "object_store_memory": 150 * 2**20},
                       "node_config": {}, "min_workers": spec.get("min_workers", 0),
                       "max_workers": min(spec.get("max_workers", 1), 3)}
    return {"cluster_name": f"fake-{source['cluster_name']}", "max_workers": 5,
            "upscaling_speed": source.get("upscaling_speed", 1.0), "idle_timeout_minutes": 0.25,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": gcs_address},
            "available_node_types": types, "head_node_type": "ray.head.default", "auth": {}, "docker": {},
            "file_mounts": {}, "file_mounts_sync_continuously": False,
            **{key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                                   "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                                   "cluster_synced_files", "rsync_exclude", "rsync_filter")}}


def node_types(address: str, env: dict) -> list[str]:
    """The alive nodes by type (a GPU type by its own resource; "head"; "cpu_data" otherwise), sorted."""
    listed = subprocess.run([RAY, "list", "nodes", "--address", address, "--format", "json", "--detail"], env=env,
                            capture_output=True, text=True)
    try:
        nodes = json.loads(listed.stdout) if listed.returncode == 0 else []
    except ValueError:
        return []
    return sorted(next((t for t in FAKE_GPUS if t in n.get("resources_total", {})),
                       "head" if n.get("is_head_node") else "cpu_data")
                  for n in nodes if isinstance(n, dict) and n.get("state") == "ALIVE")


@pytest.mark.slow
def test_the_autoscaler_starts_the_gpu_type_replaces_a_lost_node_and_removes_idle_ones(tmp_path, tiny_models):
    """cluster.yaml's node types under Ray's fake multi-node provider (`RAY_FAKE_CLUSTER=1`, the head started
    with `--autoscaling-config`, token auth): a stage submitted with `ray job submit` whose two workers need the
    gpu_4x type (STRICT_SPREAD) makes the autoscaler start two such nodes from zero; once the first checkpoint
    is on disk every process of one of them is SIGKILLed; the autoscaler starts a replacement, the run resumes
    from the newest complete checkpoint and finishes, and the idle nodes are removed."""
    import threading

    import yaml
    from mlflow.tracking import MlflowClient

    temp_dir = tempfile.mkdtemp(prefix="rayfake", dir="/tmp")
    gcs, dashboard = free_ports(2)
    ip = subprocess.run([sys.executable, "-c", "import ray._private.services as s; print(s.get_node_ip_address())"],
                        capture_output=True, text=True, check=True).stdout.strip()
    config = tmp_path / "fake-cluster.yaml"
    config.write_text(yaml.safe_dump(fake_cluster_config(f"{ip}:{gcs}")))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
           "RAY_health_check_failure_threshold": "3", **QUICK_STOP}
    env.pop("RAY_ADDRESS", None)
    head = start_node(["--head", f"--port={gcs}", f"--autoscaling-config={config}", "--num-cpus=0",
                       "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                       f"--temp-dir={temp_dir}", *node_ports()], env, tmp_path / "ray-head.log")  # (not the session's)
    address = f"http://127.0.0.1:{dashboard}"
    mlflow_uri = mlflow_store(tmp_path / "mlflow.db")
    seen: list[tuple[float, list[str]]] = []  # (seconds since the submit, alive node types) at each change
    killed: dict[str, object] = {}
    try:
        wait_until(lambda: node_types(address, env) == ["head"], [head], tmp_path / "ray-head.log")
        log = tmp_path / "submit.log"
        started = time.time()
        # The code by PYTHONPATH, not --working-dir: the fake nodes share one session folder, and a
        # replacement node's runtime-env agent replaces the unpacked package under the running workers.
        submit = submit_when_accepted(log, env, [
                 "--address", address, "--runtime-env-json", json.dumps({"env_vars": {"PYTHONPATH": str(ROOT)}}), "--",
                 "python", "-m", "jobs.pretrain_pformer", "--config", str(ROOT / "configs" / "tiny" / "stage0.yaml"),
                 "--summary", str(tmp_path / "summary.json"),
                 *stage0_overrides(tmp_path, tiny_models, mlflow_uri, "autoscaled"), "train.max_steps=100",
                 "scaling.num_workers=2", "scaling.placement_strategy=STRICT_SPREAD", "scaling.use_gpu=false",
                 "scaling.worker_resources={gpu_4x: 1}"])
        run_dir = tmp_path / "ckpt" / "autoscaled"

        def lose_a_node() -> None:
            victim = None
            while victim is None and submit.poll() is None:
                listed = subprocess.run([RAY, "list", "nodes", "--address", address, "--format", "json", "--detail"],
                                        env=env, capture_output=True, text=True)
                gpu_nodes = [n["node_id"] for n in (json.loads(listed.stdout) if listed.returncode == 0 else [])
                             if n.get("state") == "ALIVE" and "gpu_4x" in n.get("resources_total", {})]
                victim = gpu_nodes[0] if len(gpu_nodes) == 2 else None
            while not list(run_dir.glob("checkpoint_*/manifest.json")) and submit.poll() is None:
                time.sleep(0.1)
            own = [int(line.split()[0]) for line in processes_using(victim)]  # its raylet and agents
            doomed = set(own) | {p for pid in own for p in descendants(pid)}  # ... and its workers
            killed.update(node=victim, processes=len(doomed), at=time.time() - started,
                          newest=max(int(p.parent.name.split("_")[1]) for p in run_dir.glob("checkpoint_*/manifest.json")))
            for pid in doomed:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

        killer = threading.Thread(target=lose_a_node, daemon=True)
        killer.start()
        while submit.poll() is None and time.time() - started < 300:
            types = node_types(address, env)
            if not seen or types != seen[-1][1]:
                seen.append((round(time.time() - started, 1), types))
            time.sleep(1)
        assert submit.wait(timeout=30) == 0, log.read_text()[-4000:]
        killer.join(timeout=30)
        idle_since = time.time()
        while node_types(address, env) != ["head"] and time.time() - idle_since < 180:
            time.sleep(2)
        seen.append((round(time.time() - started, 1), node_types(address, env)))
    finally:
        stop_node(head)
        # The provider starts worker nodes as processes of the head's monitor, not to outlive it; should any
        # remain, they go here (on AWS, `ray down` terminates the instances).
        for line in processes_using(temp_dir, FAKE_NODE_PREFIX):
            try:
                os.kill(int(line.split()[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass
    text = log.read_text()
    print(json.dumps({"nodes": seen, "killed": killed}))  # for the record (bench/RESULTS.md)
    # Two gpu_4x nodes started from zero for the job; one lost and replaced; at the end only the head.
    assert seen[0][1] == ["head"] and ["gpu_4x", "gpu_4x", "head"] in [t for _, t in seen], seen
    assert killed.get("processes", 0) >= 3, killed
    assert seen[-1][1] == ["head"], seen
    resumed = int(text.split("resuming from step ", 1)[1].split()[0]) if "resuming from step " in text else -1
    assert killed["newest"] <= resumed < 100, (killed, text[-4000:])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["step"] == 100 and summary["resumed_from_step"] == resumed
    client = MlflowClient(tracking_uri=mlflow_uri)
    assert [m.step for m in sorted(client.get_metric_history(summary["mlflow_run_id"], "lm_loss"),
                                   key=lambda m: m.step)] == list(range(10, 101, 10))
    assert client.get_run(summary["mlflow_run_id"]).data.params["scaling.worker_resources.gpu_4x"] == "1.0"
