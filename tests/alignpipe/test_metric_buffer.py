"""MetricBuffer against real MLflow stores: order and steps kept, outages ridden out, refusals and crashes loud."""

import subprocess
import sys
import time

import pytest

from alignpipe import metric_buffer, tracking
from alignpipe.metric_buffer import MetricBuffer, MetricsNotWritten
from testlib import REPO


def _run(uri: str) -> str:
    client = tracking.client_for(uri)
    return client.create_run(client.create_experiment(f"buffer-{time.time_ns()}")).info.run_id


def _history(uri: str, run_id: str, key: str):
    return sorted((m.step, m.value, m.timestamp) for m in tracking.client_for(uri).get_metric_history(run_id, key))


def test_every_point_arrives_with_its_step_in_order(mlflow_uri, tmp_path):
    run_id = _run(mlflow_uri)
    buffer = MetricBuffer(mlflow_uri, run_id, spool=tmp_path / "spool.jsonl")
    for step in range(1, 1201):  # 2,400 points: more than one MLflow batch (1,000)
        buffer.log({"loss": 1.0 / step, "lr": 0.1, "note": "not a number", "nan": float("nan")}, step=step)
    buffer.drain(timeout=120)
    loss = _history(mlflow_uri, run_id, "loss")
    assert [s for s, _, _ in loss] == list(range(1, 1201))
    assert all(v == pytest.approx(1.0 / s) for s, v, _ in loss)
    stamps = [t for _, _, t in loss]
    assert stamps == sorted(stamps)                               # stamped when logged, not when written
    assert len(_history(mlflow_uri, run_id, "lr")) == 1200
    assert _history(mlflow_uri, run_id, "nan") == []
    assert not (tmp_path / "spool.jsonl").exists()                # drained: nothing left to replay


def test_points_refused_by_the_store_fail_loudly(mlflow_uri):
    run_id = _run(mlflow_uri)
    tracking.client_for(mlflow_uri).delete_run(run_id)  # a deleted run takes no metrics: retrying cannot help
    buffer = MetricBuffer(mlflow_uri, run_id)
    buffer.log({"loss": 1.0}, step=1)
    with pytest.raises(MetricsNotWritten, match="refused"):
        buffer.drain(timeout=30)


@pytest.mark.slow
def test_server_outage_loses_nothing_and_a_timeout_names_what_is_left(mlflow_server, monkeypatch):
    for key, value in metric_buffer.HTTP_ENV.items():  # as in a Ray worker: one short try per request
        monkeypatch.setenv(key, value)
    uri = mlflow_server.url
    run_id = _run(uri)
    buffer = MetricBuffer(uri, run_id)
    for step in (1, 2, 3):
        buffer.log({"loss": float(step), "lr": 0.1}, step=step)
    buffer.drain(timeout=60)

    mlflow_server.kill()
    down = int(time.time() * 1000)
    for step in (4, 5, 6):
        buffer.log({"loss": float(step), "lr": 0.1}, step=step)  # returns: the points wait in the queue
    with pytest.raises(MetricsNotWritten, match=r"6 metric points .* not written"):
        buffer.drain(timeout=3)
    assert buffer.pending == 6                                    # a timed-out drain drops nothing
    mlflow_server.start()
    up = int(time.time() * 1000)
    buffer.drain(timeout=60)

    loss = _history(uri, run_id, "loss")
    assert [(s, v) for s, v, _ in loss] == [(s, float(s)) for s in range(1, 7)]
    assert all(down <= t < up for s, _, t in loss if s >= 4)      # their original time, not the time written


def test_a_killed_writer_leaves_a_spool_the_next_one_sends(mlflow_uri, tmp_path):
    run_id = _run(mlflow_uri)
    spool = tmp_path / "spool.jsonl"
    # A writer whose server is unreachable (nothing listens on the port) is SIGKILLed with points queued.
    from alignpipe.cli.stack import free_port

    code = (
        "import os, signal\n"
        "from pathlib import Path\n"
        "from alignpipe.metric_buffer import MetricBuffer\n"
        f"b = MetricBuffer('http://127.0.0.1:{free_port()}', {run_id!r}, spool=Path({str(spool)!r}))\n"
        "for step in range(1, 6):\n"
        "    b.log({'loss': float(step)}, step=step)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert len(spool.read_text().splitlines()) == 5

    MetricBuffer(mlflow_uri, run_id, spool=spool).drain(timeout=60)  # the restarted worker's buffer
    assert [(s, v) for s, v, _ in _history(mlflow_uri, run_id, "loss")] == [(s, float(s)) for s in range(1, 6)]
    assert not spool.exists()
