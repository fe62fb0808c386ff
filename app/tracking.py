"""MLflow tracking: one run per stage launch, params = flattened resolved config, per-step metrics.

The driver creates (or, when a run name is resumed, reopens) the MLflow run; only rank 0 of the
trainer logs metrics to it, through `HeldMetrics` (reports outlive a tracking-server outage). Nothing here
touches global MLflow state or runs at import time.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger(__name__)

MAX_PARAM_CHARS = 6000
RUN_NAME_TAG = "ray.run_name"
STORAGE_TAG = "ray.storage_path"


def resolve_tracking_uri(uri: str) -> str:
    """Make a relative sqlite path absolute, so Ray workers in other directories hit the same file."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).expanduser().resolve())
    return uri


def client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def default_artifact_location(tracking_uri: str, name: str) -> Optional[str]:
    """For a SQLite store, artifacts go next to the database (`<db dir>/mlruns/<experiment>`), not into
    whatever directory the job happens to run in (MLflow's default, `./mlruns`)."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None  # a tracking server decides (its --default-artifact-root, e.g. s3://)
    return str(Path(tracking_uri[len(prefix):]).parent / "mlruns" / name)


# MLflow 3 opens an experiment on its GenAI "Traces" view unless the experiment says it holds model training.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(tracking_uri: str, name: str) -> str:
    """The experiment's id, created (with its artifacts beside a SQLite store) when it does not exist yet;
    tagged as a model-training experiment so the MLflow UI opens on its runs table."""
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(name)
    if exp is None:
        return c.create_experiment(name, artifact_location=default_artifact_location(tracking_uri, name),
                                   tags=EXPERIMENT_KIND)
    if any(exp.tags.get(k) != v for k, v in EXPERIMENT_KIND.items()):
        for key, value in EXPERIMENT_KIND.items():
            c.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


def create_run(tracking_uri: str, experiment: str, name: str, tags: Optional[dict[str, Any]] = None,
               parent_run_id: Optional[str] = None) -> str:
    """A new run (status RUNNING) in `experiment`, a child of `parent_run_id` when given; returns its id.
    Every run of the project is created here (stages through `start_run`)."""
    all_tags = {k: str(v) for k, v in (tags or {}).items()}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    return client(tracking_uri).create_run(experiment_id(tracking_uri, experiment), run_name=name,
                                           tags=all_tags).info.run_id


def find_run(tracking_uri: str, experiment: str, run_name: str, storage_path: str) -> Optional[str]:
    """The latest MLflow run of a Ray run name (to continue its curves when the run resumes)."""
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = c.search_runs([exp.experiment_id],
                         filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}' and tags.`{STORAGE_TAG}` = '{storage_path}'",
                         order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def start_run(cfg, tags: dict[str, str], parent_run_id: Optional[str] = None,
              resume_run_id: Optional[str] = None) -> str:
    """Create (or reopen) the run, log params, tags and the resolved config. Returns the run id."""
    from mlflow.entities import Param, RunTag

    uri = cfg.mlflow.tracking_uri
    c = client(uri)
    if resume_run_id is not None:
        c.update_run(resume_run_id, status="RUNNING")
        run_id = resume_run_id
    else:
        all_tags = {RUN_NAME_TAG: cfg.run.name, STORAGE_TAG: cfg.run.storage_path, "stage": cfg.stage}
        commit = git_commit()
        if commit:
            all_tags["git_commit"] = commit
        run_id = create_run(uri, cfg.mlflow.experiment, cfg.run.name, all_tags, parent_run_id)
        params = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in sorted(cfg.flat().items())]
        for start in range(0, len(params), 100):
            c.log_batch(run_id, params=params[start:start + 100])
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "config.yaml"
            path.write_text(cfg.to_yaml())
            c.log_artifact(run_id, str(path))
    c.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    return run_id


def log_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
    if batch:
        client(tracking_uri).log_batch(run_id, metrics=batch)


class HeldMetrics:
    """A training run's metric writer that outlives tracking-server outages. Each report (metrics and tags
    of one step) goes to MLflow at once when it answers; when it does not, the report is held and sent,
    oldest first, with the next one that gets through. The outage is said once when it starts and once when
    it ends; `close` retries what is still held for `wait_s` and then names the steps that are missing.

    MLflow's own retries (7, backoff factor 2: minutes per call against a server that is down) would stall
    training at every report; this process's calls retry twice, briefly, and hold the report instead."""

    BATCH_METRICS = 900  # MLflow accepts up to 1000 metrics per log_batch call
    REFUSED = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "PERMISSION_DENIED", "INVALID_STATE",
               "BAD_REQUEST"}
    SHORT_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                     "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}  # unless set: the user's settings win

    def __init__(self, tracking_uri: str, run_id: str, say, max_held: int = 100_000):
        self.tracking_uri, self.run_id, self.say, self.max_held = tracking_uri, run_id, say, max_held
        self.held: list[tuple[int, int, dict[str, float], dict[str, str]]] = []  # step, time (ms), metrics, tags
        self.down_since: Optional[int] = None
        self.dropped: list[int] = []

    def log(self, step: int, metrics: dict[str, Any], tags: Optional[dict[str, Any]] = None) -> bool:
        """Send this report and any held before it; False when MLflow did not answer (the report is held).

        A report keeps the time it was made: resent after a request whose answer was lost (the server wrote it,
        then died), it is the same metric again, which MLflow's SQL store takes once rather than twice."""
        import time

        values = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self.held.append((step, int(time.time() * 1000), values, {k: str(v) for k, v in (tags or {}).items()}))
        if len(self.held) > self.max_held:
            self.dropped.append(self.held.pop(0)[0])
        return self.flush()

    def flush(self) -> bool:
        from mlflow.entities import Metric, RunTag

        sent = 0
        while self.held:
            metrics, tags, count = [], {}, 0
            for step, made, values, step_tags in self.held:
                if metrics and len(metrics) + len(values) > self.BATCH_METRICS:
                    break
                metrics += [Metric(k, v, made, step) for k, v in values.items()]
                tags.update(step_tags)
                count += 1
            unset = {k: v for k, v in self.SHORT_RETRIES.items() if k not in os.environ}
            os.environ.update(unset)  # MLflow reads them at each request
            try:
                client(self.tracking_uri).log_batch(self.run_id, metrics=metrics,
                                                    tags=[RunTag(k, v) for k, v in tags.items()])
            except Exception as err:  # never stop training over tracking
                if getattr(err, "error_code", None) in self.REFUSED:  # the server answered no: holding cannot help
                    steps = [held[0] for held in self.held[:count]]
                    self.say(f"MLflow refused the reports of steps {steps[0]}-{steps[-1]} ({err}); they are dropped")
                    self.dropped += steps
                    del self.held[:count]
                    continue
                if self.down_since is None:
                    self.down_since = self.held[0][0]
                    self.say(f"MLflow at {self.tracking_uri} does not answer at step {self.held[-1][0]} "
                             f"({type(err).__name__}); reports are held and sent when it does")
                return False
            finally:
                for key in unset:
                    os.environ.pop(key, None)
            del self.held[:count]
            sent += count
        if self.down_since is not None:
            self.say(f"MLflow answers again: sent {sent} report(s) held since step {self.down_since}")
            self.down_since = None
        return True

    def close(self, wait_s: float) -> None:
        """Send what is held, retrying for up to `wait_s`; then say which steps did not reach MLflow."""
        import time

        deadline = time.monotonic() + wait_s
        while not self.flush() and time.monotonic() < deadline:
            time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
        missing = self.dropped + [held[0] for held in self.held]
        if missing:
            self.say(f"MLflow did not take the reports of {len(missing)} step(s) ({missing[0]}-{missing[-1]}): "
                     f"they are missing from run {self.run_id}'s history")


def last_step(tracking_uri: str, run_id: str, key: str) -> int:
    """The highest step logged for metric `key` in the run (-1 when it has none)."""
    return max((m.step for m in client(tracking_uri).get_metric_history(run_id, key)), default=-1)


def last_logged_step(tracking_uri: str, run_id: str) -> int:
    """The last step of a training run's history: its last training report (`loss`), 0 when only the
    validation before training (`val_loss` at step 0) got there, -1 when nothing did."""
    last = last_step(tracking_uri, run_id, "loss")
    return last if last >= 0 else min(0, last_step(tracking_uri, run_id, "val_loss"))


def set_tags(tracking_uri: str, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    client(tracking_uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_json_artifact(tracking_uri: str, run_id: str, name: str, payload: Any) -> None:
    import json

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(payload, indent=2, default=str))
        client(tracking_uri).log_artifact(run_id, str(path))


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    mlflow_client = client(tracking_uri)
    if status == "FAILED" and mlflow_client.get_run(run_id).info.status == "KILLED":
        return  # a sweep stopped this run's trial and already marked it KILLED: the interruption is not a failure
    mlflow_client.set_terminated(run_id, status=status)


def ui_command(tracking_uri: str, experiment: Optional[str] = None) -> str:
    """How to browse the runs: the `mlflow ui` command for a local store (its runs table at the URL printed
    after it), or the server's runs table."""
    page = ""
    if experiment:
        exp = client(tracking_uri).get_experiment_by_name(experiment)
        page = f"#/experiments/{exp.experiment_id}/runs" if exp is not None else ""
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {tracking_uri}" + (f"  then open http://127.0.0.1:5000/{page}" if page else "")


