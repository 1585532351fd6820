"""SIGTERM to a running `alignpipe run`, mid-SFT: every process of the run ends within seconds, and the same pipeline
run again takes the finished stages from the cache and resumes SFT from the checkpoint the first one left.

Both runs write to a file and a pipe, not a terminal: their consoles have the stage lines and none of the workers'
bars or Ray's INFO lines, which their run logs (`<workdir>/runs/<run>/run.log`, in MLflow too) do have."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from testlib import PIPELINES, REPO

from alignpipe import tracking

pytestmark = pytest.mark.slow

STEPS, SAVE = 40, 5   # the signal lands at the second checkpoint (step 10), well before the end
STOP_WITHIN_S = 10     # the run's Ray work: daemons and workers
EXIT_WITHIN_S = 30     # the driver itself, which first releases its stage-key lease and flushes Prefect's events
HIDDEN = ("Loading weights", "Requesting resources", "it/s]")  # workers' bars, Ray Train's INFO: in the run log only


def _checkpoints(workdir: Path) -> list[Path]:
    return sorted(p for p in (workdir / "ray_results").glob("sft-*/checkpoint_*") if p.is_dir())


def _alive(procs: list[psutil.Process]) -> list[str]:
    alive = []
    for p in procs:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{p.pid} {p.name()}")
        except psutil.NoSuchProcess:
            pass
    return alive


def test_sigterm_mid_sft_ends_every_process_of_the_run_and_a_rerun_resumes(prefect_harness, tiny_model, mlflow_uri,
                                                                          tmp_path):
    workdir = tmp_path / "work"
    overrides = {"workdir": str(workdir), "model.name": tiny_model, "tracking.mlflow_uri": mlflow_uri,
                 "sft.max_steps": STEPS, "sft.save_steps": SAVE, "sft.eval_steps": STEPS,
                 # what follows SFT is not under test here: kept short
                 "align.method": "none", "quantize.method": "none", "evaluate.compare_base": False,
                 "evaluate.max_new_tokens": 4, "register.enabled": False}
    cmd = [sys.executable, "-m", "alignpipe.cli.main", "run", "smoke", "--config", str(PIPELINES)]
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={value}"]
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(),  # the harness's API: no temporary server
           "PYTHONUNBUFFERED": "1"}  # what reached the console is in the log when it is read mid-run
    log = tmp_path / "first-run.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300  # two folders: the first is then complete and registered by Ray
        while len(_checkpoints(workdir)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(_checkpoints(workdir)) >= 2, f"no SFT checkpoints before the run ended:\n{log.read_text()[-3000:]}"
        # the console is quiet by default (issue 28): no worker's progress bars, no Ray INFO lines
        console = log.read_text()
        assert "stage sft: running" in console, console[-3000:]
        for noise in HIDDEN:
            assert noise not in console, console[-3000:]
        driver = psutil.Process(proc.pid)
        run_procs = [driver, *driver.children(recursive=True)]  # Ray's daemons and workers, Prefect's server
        assert any(p.name().startswith("ray::RayTrainWorker") for p in run_procs[1:])

        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        while _alive(run_procs[1:]) and time.monotonic() - sent < STOP_WITHIN_S:
            time.sleep(0.1)
        stopped_in = time.monotonic() - sent
        assert not _alive(run_procs[1:]), f"alive {STOP_WITHIN_S} s after SIGTERM: {_alive(run_procs[1:])}"
        assert proc.wait(EXIT_WITHIN_S) == 128 + signal.SIGTERM
        print(f"the run's Ray work ended {stopped_in:.1f} s after SIGTERM, the driver "
              f"{time.monotonic() - sent:.1f} s after it")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    console = log.read_text()
    assert "stage sft: failed after" in console, console[-3000:]  # the stopped stage's event, with its wall time
    [first_log] = (workdir / "runs").glob("*/run.log")
    assert f"run log: {first_log}" in console
    assert all(noise in first_log.read_text() for noise in HIDDEN[:2]), first_log.read_text()[-3000:]

    # the same pipeline again, its stdout a pipe: SFT has the same stage key, so its Ray Train run resumes
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-4000:]
    console = rerun.stdout + rerun.stderr
    for line in ("stage validate: cached in", "stage sft: running", "stage sft: done in", "stage evaluate: done in"):
        assert line in console, console[-4000:]
    for noise in (*HIDDEN, "\x1b[", "\r"):  # no bars, no colour or cursor codes
        assert noise not in console, console[-4000:]
    [summary_file] = (workdir / "runs").glob("*.json")
    summary = json.loads(summary_file.read_text())
    [run_log] = [p for p in (workdir / "runs").glob("*/run.log") if p != first_log]
    assert f"run log: {run_log}" in console
    kept = run_log.read_text()
    assert "stage sft: done in" in kept and "Loading weights" in kept and "Reporting training result" in kept
    status = {s["stage"]: s["status"] for s in summary["stages"]}
    assert status["validate"] == "cached" and status["sft"] == "done"  # finished before the signal: not repeated
    client = tracking.client_for(mlflow_uri)
    parent = client.get_run(summary["mlflow_run_id"])
    [sft_run] = client.search_runs([parent.info.experiment_id],
                                   f"tags.mlflow.parentRunId = '{parent.info.run_id}' and "
                                   f"tags.`{tracking.TAG_STAGE}` = 'sft'")
    steps = sorted(step for step, _ in tracking.metric_history(mlflow_uri, sft_run.info.run_id, "loss"))
    assert steps[0] > SAVE and (steps[0] - 1) % SAVE == 0, steps[:5]   # right after a checkpoint of the first run
    assert steps[-1] == STEPS and sft_run.data.metrics["final/global_step"] == STEPS
    [logged] = client.list_artifacts(parent.info.run_id, "logs")  # the run log, on the pipeline's MLflow run
    assert logged.path == "logs/run.log" and logged.file_size == run_log.stat().st_size
