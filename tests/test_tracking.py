"""The training run's metric writer against a real MLflow store: reports go through in order, and a report
the store refuses (not an outage: holding it could never help) is dropped and named, not held forever in
front of the others; a report the server wrote but whose answer was lost is resent and kept once. The outage
itself (a real `mlflow server` killed and restarted mid-run) is in test_stage0_job."""

from __future__ import annotations

import os

import pytest

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


class AnswerLosingProxy:
    """A TCP relay in front of a tracking server that, once `lose_next` is set, passes the next request on,
    waits for the server's answer (the server has written it) and hangs up without giving it; after that it
    hangs up on every connection until `restore()`: a server that dies between its write and its answer."""

    def __init__(self, upstream_port: int):
        import socket
        import threading

        self.upstream_port, self.mode = upstream_port, "up"
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self.serve, daemon=True).start()

    def lose_next(self):
        self.mode = "lose"

    def restore(self):
        self.mode = "up"

    def serve(self):
        import threading

        while True:
            conn, _ = self.listener.accept()
            threading.Thread(target=self.relay, args=(conn,), daemon=True).start()

    def relay(self, conn):
        import socket
        import threading

        if self.mode == "down":
            conn.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        if self.mode == "lose":
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(65536)
            head, body = request.split(b"\r\n\r\n", 1)
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            while len(body) < length:
                body += conn.recv(65536)
            upstream.sendall(head + b"\r\n\r\n" + body)
            assert upstream.recv(65536)  # the server answered: the request is written
            self.mode = "down"
            upstream.close()
            conn.close()
            return

        def pump(source, sink):
            try:
                while data := source.recv(65536):
                    sink.sendall(data)
            except OSError:
                pass
            finally:
                for sock in (source, sink):
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=pump, args=(upstream, conn), daemon=True).start()
        pump(conn, upstream)


@pytest.mark.integration
def test_a_report_whose_answer_was_lost_is_in_the_history_once(tmp_path):
    """The server writes a report and dies before answering: the writer holds the report and sends it again
    with the next one; the run's history has that step once (a resent report is the same metric)."""
    from conftest import free_ports, start_mlflow_server

    port, = free_ports()
    server = start_mlflow_server(tmp_path / "server.db", port, tmp_path / "server.log")
    try:
        direct = tracking.client(f"http://127.0.0.1:{port}")
        run_id = direct.create_run(direct.create_experiment("lost")).info.run_id
        proxy = AnswerLosingProxy(port)
        said: list[str] = []
        held = tracking.HeldMetrics(f"http://127.0.0.1:{proxy.port}", run_id, say=said.append)
        proxy.lose_next()
        assert not held.log(5, {"loss": 0.5}) and [step for step, *_ in held.held] == [5]
        assert [m.step for m in direct.get_metric_history(run_id, "loss")] == [5]  # written, answer lost
        proxy.restore()
        assert held.log(10, {"loss": 0.25}) and not held.held
        assert [(m.step, m.value) for m in direct.get_metric_history(run_id, "loss")] == [(5, 0.5), (10, 0.25)]
        assert said[0].startswith(f"MLflow at http://127.0.0.1:{proxy.port} does not answer at step 5")
        assert said[1] == "MLflow answers again: sent 2 report(s) held since step 5"
    finally:
        os.killpg(server.pid, 9)
        server.wait()


def test_the_last_logged_step_counts_the_validation_before_training(mlflow_uri):
    """What a restarted worker reads to skip what its run already logged: nothing (-1), the step-0 validation
    alone (0: not logged again), or the last training report."""
    client = tracking.client(mlflow_uri)
    run_id = client.create_run(client.create_experiment("restarts")).info.run_id
    assert tracking.last_logged_step(mlflow_uri, run_id) == -1
    held = tracking.HeldMetrics(mlflow_uri, run_id, say=print)
    assert held.log(0, {"val_loss": 3.0, "val_lm_loss": 3.0})
    assert tracking.last_logged_step(mlflow_uri, run_id) == 0
    assert held.log(5, {"loss": 2.0}) and held.log(10, {"loss": 1.5, "val_loss": 1.6})
    assert tracking.last_logged_step(mlflow_uri, run_id) == 10
