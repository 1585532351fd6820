"""MLflow helpers: the default local store, one parent run per flow run, a nested run per stage.

Everything goes through `MlflowClient` with explicit run ids (no fluent active-run state), so stages
running in other threads or on Ray workers log to the right run.
"""

from __future__ import annotations

import fcntl
import math
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alignpipe import secrets
from alignpipe.config.pipeline import PipelineConfig
from alignpipe.registry import local_store

TAG_FLOW_RUN = "prefect.flow_run_id"
TAG_PIPELINE = "alignpipe.pipeline"
TAG_STAGE = "alignpipe.stage"
TAG_CONTENT_KEY = "alignpipe.content_key"
_SCHEMA_READY: set[str] = set()   # SQLite stores this process has seen with MLflow's tables in place
_SCHEMA_GUARD = threading.Lock()


def tracking_uri(cfg: PipelineConfig) -> str:
    """The configured URI, or a SQLite file inside the project's workdir."""
    if cfg.tracking.mlflow_uri:
        return cfg.tracking.mlflow_uri
    Path(cfg.workdir).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{Path(cfg.workdir) / 'mlflow.db'}"


def client_for(uri: str):
    """A client on `uri` (credentials and all: the URI is used as given, only what gets recorded is redacted)."""
    from mlflow.tracking import MlflowClient

    if secrets.redact_uri(uri) != uri:
        # MLflow prints "View run ... at: <tracking URI>/#/..." on every finished run of a server store, password
        # included. Set for the rest of the process, never put back: a per-call toggle would race across threads.
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    if uri.startswith("sqlite:///") and uri not in _SCHEMA_READY:
        _create_schema_once(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _create_schema_once(uri: str) -> None:
    """Build MLflow's tables in a new SQLite file under a lock beside it, once per process.

    MLflow's tracking and registry stores each create and migrate missing tables on first use, without a lock:
    two pipelines starting on the same new file both migrate it and one fails ("table ... already exists",
    "database is locked"). Under the lock the first one creates them and the other finds them.
    """
    path = local_store(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _SCHEMA_GUARD, open(path.parent / f"{path.name}.init.lock", "a") as handle:
        if uri in _SCHEMA_READY:
            return
        fcntl.flock(handle, fcntl.LOCK_EX)  # blocking: a migration takes seconds, and nothing else can proceed
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # builds the tracking store already
            client.search_experiments(max_results=1)        # the tracking store: its tables, the default experiment
            client.search_registered_models(max_results=1)  # the registry store: its tables
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
        _SCHEMA_READY.add(uri)


def ensure_experiment(cfg: PipelineConfig) -> str:
    """Experiment id; local stores keep artifacts in <workdir>/mlartifacts rather than the CWD."""
    client = client_for(tracking_uri(cfg))
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        return exp.experiment_id
    location = None
    if not cfg.tracking.mlflow_uri or cfg.tracking.mlflow_uri.startswith("sqlite:"):
        location = (Path(cfg.workdir) / "mlartifacts").resolve().as_uri()
    try:
        return client.create_experiment(cfg.tracking.experiment, artifact_location=location)
    except Exception:  # created concurrently by another pipeline
        return client.get_experiment_by_name(cfg.tracking.experiment).experiment_id


def start_run(uri: str, experiment_id: str, name: str, tags: dict[str, str], parent_id: str | None = None) -> str:
    tags = {"mlflow.runName": name, **{k: secrets.redact(str(v)) for k, v in tags.items()}}
    if parent_id:
        tags["mlflow.parentRunId"] = parent_id
    return client_for(uri).create_run(experiment_id, tags=tags, run_name=name).info.run_id


@contextmanager
def stage_run(uri: str, parent_id: str, stage: str, content_key: str):
    """A nested run for one stage; FAILED if the block raises, FINISHED otherwise."""
    client = client_for(uri)
    parent = client.get_run(parent_id)
    tags = {TAG_STAGE: stage, TAG_CONTENT_KEY: content_key,
            TAG_FLOW_RUN: parent.data.tags.get(TAG_FLOW_RUN, ""), TAG_PIPELINE: parent.data.tags.get(TAG_PIPELINE, "")}
    run_id = start_run(uri, parent.info.experiment_id, stage, tags, parent_id=parent_id)
    try:
        yield run_id
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if is_number(v)]
    if batch:
        client_for(uri).log_batch(run_id, metrics=batch)


def log_params(uri: str, run_id: str, params: dict[str, Any], prefix: str = "") -> None:
    """Log a nested dict as flat `a.b.c` params (MLflow caps values at 6000 chars), credentials masked."""
    from mlflow.entities import Param

    flat = _flatten(params, prefix)
    items = [Param(k, secrets.redact(str(v))[:6000]) for k, v in flat.items()]
    client = client_for(uri)
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def log_figure(uri: str, run_id: str, fig, artifact_file: str) -> None:
    client_for(uri).log_figure(run_id, fig, artifact_file)


def log_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    client_for(uri).log_text(run_id, text, artifact_file)


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client_for(uri).get_metric_history(run_id, key)]


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(_flatten(value, name))
        else:
            out[name] = value
    return out


def is_number(v: Any) -> bool:
    """A real, finite number (bools, NaN and infinities are not metrics)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@contextmanager
def parent_run(cfg: PipelineConfig, flow_run_id: str, tags: dict[str, str]):
    """The MLflow parent run of one flow run: (tracking URI, experiment id, run id)."""
    uri = tracking_uri(cfg)
    experiment_id = ensure_experiment(cfg)
    run_id = start_run(uri, experiment_id, f"{cfg.name}-{flow_run_id[:8]}",
                       {TAG_FLOW_RUN: flow_run_id, TAG_PIPELINE: cfg.name, **tags})
    client = client_for(uri)
    try:
        yield uri, experiment_id, run_id
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
