"""A flow process killed during SFT, started again: finished stages come from the cache, SFT resumes mid-way."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignpipe import tracking
from alignpipe.flows.pipeline import alignpipe_pipeline
from testlib import PIPELINES, REPO

pytestmark = pytest.mark.slow

STEPS, SAVE = 40, 5  # the kill lands at the second checkpoint (step 10), well before the end


def _checkpoints(workdir: Path) -> list[Path]:
    return sorted(p for p in (workdir / "ray_results").glob("sft-*/checkpoint_*") if p.is_dir())


def test_killed_run_resumes_sft_from_its_last_checkpoint(prefect_harness, ray_local, tiny_model, mlflow_uri,
                                                        tmp_path):
    workdir = tmp_path / "work"
    overrides = {"workdir": str(workdir), "model.name": tiny_model, "tracking.mlflow_uri": mlflow_uri,
                 "sft.max_steps": STEPS, "sft.save_steps": SAVE, "sft.eval_steps": STEPS,
                 "align.method": "none", "quantize.method": "none"}  # what follows SFT is not under test here
    cmd = [sys.executable, "-m", "alignpipe.cli.main", "run", "smoke", "--config", str(PIPELINES)]
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={value}"]
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}  # the harness's API: no temporary server
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:  # kill the whole process group (the flow and its Ray) once SFT has saved a checkpoint
        deadline = time.monotonic() + 600  # (two folders: the first is then complete and registered by Ray)
        while len(_checkpoints(workdir)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(_checkpoints(workdir)) >= 2, "the first run ended or timed out before SFT saved checkpoints"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    summary = alignpipe_pipeline(pipeline="smoke", overrides=overrides, config_file=str(PIPELINES))
    status = {s["stage"]: s["status"] for s in summary["stages"]}
    assert status["validate"] == "cached"                       # finished before the kill: not repeated
    assert status["sft"] == "done"

    client = tracking.client_for(mlflow_uri)
    parent = client.get_run(summary["mlflow_run_id"])
    [sft_run] = client.search_runs([parent.info.experiment_id],
                                   f"tags.mlflow.parentRunId = '{parent.info.run_id}' and "
                                   f"tags.`{tracking.TAG_STAGE}` = 'sft'")
    steps = sorted(step for step, _ in tracking.metric_history(mlflow_uri, sft_run.info.run_id, "loss"))
    first = steps[0]
    assert first > SAVE and (first - 1) % SAVE == 0, steps[:5]   # restarted right after a saved checkpoint
    assert steps[-1] == STEPS and sft_run.data.metrics["final/global_step"] == STEPS
    versions = client.search_model_versions(f"name = '{summary['registered']['model_name']}'")
    assert len(versions) == 1                                  # the killed run registered nothing
