"""The training run's metric writer against a real MLflow store: reports go through in order, and a report
the store refuses (not an outage: holding it could never help) is dropped and named, not held forever in
front of the others. The outage itself (a real `mlflow server` killed and restarted) is in test_stage0_job."""

from __future__ import annotations

import os

from app import tracking


def test_reports_go_through_and_a_refused_one_is_dropped_not_held(mlflow_uri):
    client = tracking.client(mlflow_uri)
    run_id = client.create_run(client.create_experiment("held")).info.run_id
    said: list[str] = []
    held = tracking.HeldMetrics(mlflow_uri, run_id, say=said.append)
    for step in (5, 10):
        assert held.log(step, {"loss": 1.0 / step, "note": "not a number"}, tags={"checkpoint_uri": f"c{step}"})
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(5, 0.2), (10, 0.1)]
    assert client.get_run(run_id).data.tags["checkpoint_uri"] == "c10" and not said
    assert held.log(10, {}, tags={"checkpoint_uri": "c10b"})  # a tag alone (the checkpoint after its step's metrics)
    assert client.get_run(run_id).data.tags["checkpoint_uri"] == "c10b" and len(client.get_metric_history(run_id, "loss")) == 2
    assert not {k for k in tracking.HeldMetrics.SHORT_RETRIES if k in os.environ}  # set only around each call

    gone = tracking.HeldMetrics(mlflow_uri, "0" * 32, say=said.append)  # a run the store does not have
    assert gone.log(15, {"loss": 0.5}) and not gone.held
    gone.close(wait_s=0)
    assert said[0].startswith("MLflow refused the reports of steps 15-15")
    assert said[1].startswith("MLflow did not take the reports of 1 step(s) (15-15)")
