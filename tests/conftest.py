"""Shared fixtures: the tiny model, a temporary MLflow store, local Ray, Prefect's test harness."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry heartbeat from the test harness
# `make test` runs two xdist workers on two cores: idle OpenMP threads sleep instead of spinning on a core
# the other worker needs (set before torch loads; Ray workers inherit it)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# ... and with one pytest worker per core, torch in each (and in what it starts: CLI runs, Ray tasks) keeps to one
# thread unless told otherwise, so the workers together run no more busy threads than cores (not measured on its
# own: with smoke's 1-CPU settings the suite went 18:02 -> 16:38). Ray training workers still get their
# configured `cpus_per_worker` threads.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) >= (os.cpu_count() or 1):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("RAY_ADDRESS", None)

from testlib import PIPELINES


def pytest_collection_modifyitems(config, items):
    """End-to-end (`slow`) tests first: xdist hands tests out in this order as workers free up, so the minutes-long
    ones start early and the many short ones fill in at the end, instead of one long test running alone last."""
    # test_pipeline's end-to-end test restarts Ray (it plants an environment): before any other test starts one
    first = "tests/flows/test_pipeline.py::test_smoke_flow_end_to_end"
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None, not item.nodeid.startswith(first)))


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(models_dir) -> str:
    """Folder of a ~10 MB random Llama with SmolLM2's real tokenizer and chat template."""
    from alignpipe.config import TINY_MODEL
    from alignpipe.models import resolve_model

    return resolve_model(TINY_MODEL, models_dir)


@pytest.fixture(scope="session")
def mlflow_schema(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store with every table and migration in place, built once per session by MLflow
    itself: building one costs 1-2 s of migrations, and dozens of tests each start from an empty store."""
    from alignpipe import tracking

    path = tmp_path_factory.mktemp("mlflow-schema") / "mlflow.db"
    tracking.client_for(f"sqlite:///{path}")
    return path


@pytest.fixture
def mlflow_uri(tmp_path, mlflow_schema) -> str:
    """A fresh, empty SQLite store for one test (a copy of the session's empty one)."""
    shutil.copyfile(mlflow_schema, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from alignpipe.config.compute import ComputeConfig
    from alignpipe.ray_runner import ensure_ray

    ensure_ray(ComputeConfig())  # the pipeline's own in-process start-up
    yield ray
    ray.shutdown()


@pytest.fixture
def progress_board(ray_local, monkeypatch):
    """A progress board of this test's own (alignpipe.progress), started as `ensure_ray` starts one; its name."""
    import time

    from alignpipe import progress

    name = f"test-board-{time.monotonic_ns()}"
    monkeypatch.setenv(progress.BOARD_ENV, name)
    progress.start_board()
    yield name
    progress.clear_board()  # its last handle goes, and Ray ends the actor


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def smoke_cfg(tmp_path, tiny_model, mlflow_uri):
    """The shipped `smoke` pipeline, pointed at a temporary workdir and MLflow store and the tiny model."""
    from alignpipe.config import load_pipeline

    return load_pipeline(
        PIPELINES, "smoke", {"workdir": str(tmp_path / "work"), "model.name": tiny_model,
                             "tracking.mlflow_uri": mlflow_uri},
    )


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory):
    """`alignpipe up`'s stack (PostgreSQL, Prefect, S3 and MLflow servers, Ray head + worker) in a temp workdir; always
    torn down. Tests using it (or `offbox`, which builds on it) share one pytest worker, so one stack serves them all:
    mark them `pytest.mark.xdist_group("stack")`."""
    from alignpipe.cli import stack
    from testlib import stack_workdir

    workdir = stack_workdir()
    try:
        yield stack.up(workdir, on_wait=lambda what: print(f"waiting for {what}"))
    finally:
        stack.down(workdir, grace=2)  # Ray's nodes sit out SIGTERM for over 20 s; nothing here needs them drained
        shutil.rmtree(workdir, ignore_errors=True)



@pytest.fixture(scope="session")
def offbox(tmp_path_factory, request):
    """Nodes that share nothing, all on 127.0.0.1 (tests/offbox.py): a 0-CPU Ray head and a Ray worker node with the
    `offbox` resource in its own mount namespace that cannot read the workdir, data/, pytest's temp folders or /tmp,
    using `local_stack`'s S3 server (a bucket of their own) and MLflow server. Its Ray nodes are always torn down.

    Tests using it share one pytest worker with the stack's: mark them `pytest.mark.xdist_group("stack")`. Drive
    the cluster from a subprocess (`offbox.driver_env()`): a process joins one Ray only, and `ray_local` may hold
    this one's.
    """
    from offbox import namespace_problem, running
    from testlib import REPO

    if problem := namespace_problem():
        pytest.skip(problem)
    local_stack = request.getfixturevalue("local_stack")  # only once the nodes can start: no stack for a skip
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # every xdist worker's temp folders, the tiny model's among them
    with running(tmp_path_factory.mktemp("offbox"), [REPO / "data", base, Path("/tmp")], local_stack) as box:
        yield box


@pytest.fixture
def mlflow_server(tmp_path):
    """A running MLflow server (SQLite store in tmp) the test may kill and restart; always stopped at the end."""
    from testlib import MlflowServer

    server = MlflowServer(tmp_path / "mlflow-server")
    server.start()
    try:
        yield server
    finally:
        server.kill()
