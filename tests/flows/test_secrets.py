"""No credential leaves the environment: a real smoke flow with planted secrets, then a search of everything it wrote.

Secrets go into the env vars people really set (HF_TOKEN, MLFLOW_TRACKING_PASSWORD, AWS_SECRET_ACCESS_KEY, ...),
into the tracking URI's password (an MLflow server backed by a temporary SQLite store, so the URI with
`user:password@` is really used) and into a free-text config value. The flow must succeed with them, and none
may appear in MLflow (runs, models, artifacts, the raw database), the workdir (Prefect result cache, Ray
storage, summaries), stdout/stderr or the Prefect flow-run logs.
"""

from __future__ import annotations

import base64
import secrets as pysecrets
import signal
import sys
from pathlib import Path

import pytest

from alignpipe import ray_runner, tracking
from cli import stack
from flows.pipeline import alignpipe_pipeline
from testlib import PIPELINES

pytestmark = pytest.mark.slow

SECRET_ENV = ("HF_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "AWS_SECRET_ACCESS_KEY",
              "AWS_SESSION_TOKEN", "PREFECT_API_KEY", "WANDB_API_KEY", "OPENAI_API_KEY", "DATABRICKS_TOKEN",
              "ACME_SERVICE_SECRET")


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on 127.0.0.1 over a temporary SQLite store: (URL, database file, artifact root)."""
    root = tmp_path / "server"
    (root / "mlartifacts").mkdir(parents=True)
    port = stack.free_port()
    svc = stack._start("mlflow", [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                                  f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
                                  str(root / "mlartifacts"), "--host", stack.HOST, "--port", str(port),
                                  "--workers", "1"],
                       port, f"http://{stack.HOST}:{port}", root / "logs", {})
    try:
        stack._wait(svc, stack._http_ok(f"{svc.url}/health"), timeout=240)
        yield svc.url, root / "mlflow.db", root / "mlartifacts"
    finally:
        stack._signal(stack._session_pids(svc.pid), signal.SIGKILL)
        stack._reap(svc.pid)


def _mlflow_texts(client) -> list[str]:
    """Every param, tag, metric name, dataset source and description in the store, as strings."""
    from mlflow.entities import ViewType

    out = []
    experiments = client.search_experiments(view_type=ViewType.ALL)
    for exp in experiments:
        out += [exp.name, exp.artifact_location, *map(str, exp.tags.items())]
    ids = [e.experiment_id for e in experiments]
    for run in client.search_runs(ids, run_view_type=ViewType.ALL):
        out += [*map(str, run.data.params.items()), *map(str, run.data.tags.items()), *run.data.metrics]
        out += [str(d.dataset) for d in (run.inputs.dataset_inputs if run.inputs else [])]
    for model in client.search_logged_models(ids):
        out += [*map(str, model.params.items()), *map(str, model.tags.items()), model.name]
    for rm in client.search_registered_models():
        out += [rm.description or "", *map(str, rm.tags.items()), *map(str, rm.aliases.items())]
        for mv in client.search_model_versions(f"name = '{rm.name}'"):
            out += [mv.description or "", mv.source or "", *map(str, mv.tags.items())]
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _flow_run_logs(flow_run_id: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # logs are shipped in the background; send what is queued before reading
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]


def test_no_planted_secret_reaches_any_log(prefect_harness, tiny_model, mlflow_server, tmp_path, monkeypatch, capfd):
    url, db_file, artifact_root = mlflow_server
    planted = {name: f"plant{name.lower()[:6]}{pysecrets.token_hex(12)}" for name in SECRET_ENV}
    for name, value in planted.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")  # MLflow sends basic auth with the env password
    uri_password = f"uripw{pysecrets.token_hex(12)}"
    secret_uri = url.replace("http://", f"http://alice:{uri_password}@")
    # Ray workers inherit the environment of the Ray instance: start a fresh one that sees the secrets.
    ray_runner.shutdown()
    try:
        summary = alignpipe_pipeline(
            pipeline="smoke", config_file=str(PIPELINES),
            overrides={"workdir": str(tmp_path / "work"), "model.name": tiny_model, "tracking.mlflow_uri": secret_uri,
                       "description": f"smoke run; support key {planted['ACME_SERVICE_SECRET']}"})
        logs = _flow_run_logs(summary["flow_run_id"])
    finally:
        ray_runner.shutdown()  # later tests get a Ray without the planted environment
    out, err = capfd.readouterr()

    needles = {**planted, "tracking URI password": uri_password,
               "basic-auth header": base64.b64encode(f"alice:{planted['MLFLOW_TRACKING_PASSWORD']}".encode()).decode()}
    client = tracking.client_for(url)
    texts = {"mlflow store": "\n".join(_mlflow_texts(client)), "stdout": out, "stderr": err,
             "prefect flow-run logs": "\n".join(logs)}
    blobs = {"mlflow sqlite file": db_file.read_bytes(), **_files(artifact_root), **_files(tmp_path / "work")}
    # The search covered what it claims to: a registered model, artifacts, Ray storage, cache, logs, output.
    # (log_prints sends the stages' prints to the Prefect logs; stdout carries the Ray workers' output)
    assert summary["registered"] and any("registered smoke-model version" in m for m in logs)
    assert "RayTrainWorker" in out
    assert any("/ray_results/" in p for p in blobs) and any("/cache/" in p for p in blobs)
    assert any(p.endswith("model_card.md") for p in blobs) and any("stage sft: running" in m for m in logs)

    found = [(what, where) for what, value in needles.items() for where, text in texts.items() if value in text]
    found += [(what, where) for what, value in needles.items() for where, blob in blobs.items()
              if value.encode() in blob]
    assert not found, f"planted secrets found (secret, where): {found}"

    # Still recorded, with the password masked: where the store is, and the free-text field.
    params = client.get_run(summary["mlflow_run_id"]).data.params
    assert params["tracking.mlflow_uri"] == url.replace("http://", "http://alice:***@")
    assert params["description"] == "smoke run; support key ***"
    assert summary["mlflow_ui"].startswith(f"mlflow ui --backend-store-uri {url.replace('http://', 'http://alice:***@')}")
