"""`alignpipe up | status | env | down` start and stop a real local stack (PostgreSQL, Prefect, S3, MLflow, 2-node
Ray)."""

import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
import pytest
from alignpipe.cli import stack
from testlib import REPO

pytestmark = pytest.mark.slow


def _cli(*args, timeout=400):
    return subprocess.run([sys.executable, "-m", "alignpipe.cli.main", *args], check=False, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, env={**os.environ, "COLUMNS": "200"})


def _cwd(pid: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:  # gone, or a kernel thread
        return None


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.read().decode()


def test_up_status_env_down(tmp_path, monkeypatch):
    from testlib import stack_workdir

    workdir = stack_workdir() / "work"  # outside pytest's temp root (see testlib.stack_workdir)
    # as on a fresh machine: no Ray token yet (`ray start` alone refuses to start without one)
    token = tmp_path / "home" / ".ray" / "auth_token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    try:
        up = _cli("up", "--workdir", str(workdir))
        assert up.returncode == 0, up.stdout + up.stderr
        assert len(token.read_text()) == 64 and token.stat().st_mode & 0o077 == 0  # made for it, private
        state = stack.load(workdir)
        names = [s.name for s in state.services]
        assert names == ["postgres", "s3", "prefect", "mlflow", "ray-head", "ray-worker"]
        assert all(s.url.startswith(("http://127.0.0.1:", "127.0.0.1:", "postgresql://127.0.0.1:"))
                   for s in state.services)
        by = {s.name: s for s in state.services}
        assert _get(f"{by['prefect'].url}/api/health")[0] == 200
        assert _get(f"{by['mlflow'].url}/health")[0] == 200
        assert _get(f"{by['s3'].url}/")[0] == 200  # S3's ListBuckets
        assert stack._ray_nodes(by["ray-head"].port) == 2  # head + the separately started worker node

        status = _cli("status", "--workdir", str(workdir))
        assert status.returncode == 0 and status.stdout.count("running") == 6, status.stdout
        env = _cli("env", "--workdir", str(workdir))
        exports = dict(line.removeprefix("export ").split("=", 1) for line in env.stdout.splitlines())
        assert exports["PREFECT_API_URL"] == f"{by['prefect'].url}/api"
        assert exports["MLFLOW_TRACKING_URI"] == by["mlflow"].url
        assert exports["RAY_ADDRESS"] == f"127.0.0.1:{by['ray-head'].port}"
        assert exports["AWS_ENDPOINT_URL"] == by["s3"].url and exports["ALIGNPIPE_STORAGE_PATH"] == stack.STORAGE_PATH
        assert exports["ALIGNPIPE_REGISTRY_LOCK_URL"].endswith(f"@127.0.0.1:{by['postgres'].port}/mlflow")
        assert exports["PREFECT_API_URL"] in up.stdout  # `up` prints the exports too

        again = _cli("up", "--workdir", str(workdir))
        assert again.returncode == 1 and "already running" in again.stderr
    finally:
        down = _cli("down", "--workdir", str(workdir))
    assert down.returncode == 0 and "ray-worker" in down.stdout, down.stdout + down.stderr
    assert not stack.state_file(workdir).exists()
    for svc in state.services:  # every process of every service's session is gone, Ray workers included
        assert stack._session_pids(svc.pid) == [], svc.name
    data = (workdir / "stack" / "postgres").resolve()  # and every PostgreSQL process (each works from its data folder)
    assert not [pid for pid in psutil.pids() if _cwd(pid) == data]
    assert "shut down" in (workdir / "stack" / "logs" / "postgres.log").read_text().splitlines()[-1]  # cleanly
    assert _cli("status", "--workdir", str(workdir)).returncode == 1
    shutil.rmtree(workdir.parent)


def test_env_without_stack_says_how_to_start_one(tmp_path):
    result = _cli("env", "--workdir", str(tmp_path))
    assert result.returncode == 1 and "alignpipe up" in result.stderr and "Traceback" not in result.stderr


def test_deploy_without_a_server_says_how_to_get_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    result = subprocess.run([sys.executable, "-m", "alignpipe.cli.main", "deploy"], check=False, capture_output=True,
                            text=True, timeout=300, cwd=REPO, env={**env, "PREFECT_HOME": str(tmp_path)})
    assert result.returncode == 1 and "PREFECT_API_URL" in result.stderr and "alignpipe up" in result.stderr
