"""The smoke pipeline on a Ray node that shares no disk with the driver, storage on a real S3 server.

The `offbox` fixture's worker node cannot read the driver's workdir, data/, /tmp or the tiny model (tests/test_offbox.py
checks that); it is the only node with CPUs and the `offbox` resource every heavy stage asks for. The run is killed
mid-SFT (its training worker process, on that node) and must resume from the checkpoint Ray Train keeps in S3, then
go on to a registered model that loads, in a fresh process, from the MLflow server whose artifacts live in S3.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

from alignpipe import tracking
from alignpipe.cli import stack
from testlib import PIPELINES

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("stack")]

STEPS, SAVE = 40, 4  # enough steps that training still runs when the first checkpoint lands in S3


def _overrides(offbox, workdir, tiny_model) -> list[str]:
    sets = {**offbox.overrides, "workdir": str(workdir), "model.name": tiny_model, "sft.max_steps": STEPS,
            "sft.save_steps": SAVE, "sft.eval_steps": SAVE, "sft.eval_fraction": 0.0,
            "tracking.experiment": "offbox-smoke", "tracking.registered_model": "offbox-model",
            "evaluate.compare_base": False}  # no base models: what is checked is where outputs live and the resume
    return [arg for k, v in sets.items() for arg in ("--set", f"{k}={json.dumps(v) if isinstance(v, dict) else v}")]


def _checkpointed_step(s3, bucket: str) -> int:
    """The step of the last checkpoint Ray Train registered for SFT, read from its snapshot in the bucket."""
    listing = s3.list_objects_v2(Bucket=bucket, Prefix="pipelines/ray_results/sft-")
    for obj in listing.get("Contents", []):
        if obj["Key"].endswith("checkpoint_manager_snapshot.json"):
            try:
                latest = json.loads(s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
            except (ValueError, s3.exceptions.NoSuchKey):  # being rewritten
                return 0
            latest = latest.get("latest_checkpoint_result")
            return int(latest["metrics"].get("step", 0)) if latest else 0
    return 0


def _training_workers(offbox) -> list[int]:
    pids = []
    for pid in offbox.namespace_pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"RayTrainWorker" in f.read():
                    pids.append(pid)
        except OSError:  # ended while we looked
            continue
    return pids


def test_smoke_on_a_node_sharing_nothing_resumes_from_s3_after_a_kill_and_registers(offbox, tiny_model):
    workdir = offbox.workdir / "smoke"  # the driver's; the worker node sees an empty tmpfs there
    log = (offbox.root / "smoke-run.log").open("w+")
    cmd = [sys.executable, "-m", "alignpipe.cli.main", "run", "smoke", "--config", str(PIPELINES),
           *_overrides(offbox, workdir, tiny_model)]
    proc = subprocess.Popen(cmd, env={**offbox.driver_env(), "PREFECT_API_URL": ""}, stdout=log,
                            stderr=subprocess.STDOUT)
    s3 = offbox.s3_client()
    try:
        deadline = time.monotonic() + 300
        while (step := _checkpointed_step(s3, offbox.bucket)) == 0 and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert step > 0, f"no SFT checkpoint reached S3 before the run ended:\n{_tail(log)}"
        workers = _training_workers(offbox)
        assert len(workers) == 1, f"expected one training worker on the isolated node, found {workers}"
        killed_at = int(time.time() * 1000)
        os.kill(workers[0], signal.SIGKILL)
        assert proc.wait(timeout=600) == 0, _tail(log)
    finally:
        if proc.poll() is None:
            proc.kill()

    [summary_file] = (workdir / "runs").glob("*.json")
    summary = json.loads(summary_file.read_text())
    version = summary["registered"]["version"]
    keys = _keys(s3, offbox.bucket)
    for stage in ("validate", "sft", "align", "quantize", "evaluate"):  # every stage's outputs live in the bucket
        assert any(k.startswith(f"pipelines/stages/{stage}/") for k in keys), stage
    assert any(k.startswith("pipelines/models/") for k in keys)  # the driver's tiny model, published for the node
    client = MlflowClient(offbox.mlflow_url)
    experiment = client.get_experiment_by_name("offbox-smoke").experiment_id
    # the registered weights: in the stack's bucket, where the (stack's) MLflow server keeps its artifacts
    assert any(k.endswith(".safetensors") for k in _keys(s3, stack.S3_BUCKET, f"mlflow/{experiment}/"))

    # Resumed, not restarted: the steps logged after the kill start right after a checkpoint, each step once.
    [sft] = client.search_runs([experiment],
                               f"tags.mlflow.parentRunId = '{summary['mlflow_run_id']}' "
                               f"and tags.`{tracking.TAG_STAGE}` = 'sft'")
    after = [m.step for m in sorted(client.get_metric_history(sft.info.run_id, "loss"), key=lambda m: m.step)
             if m.timestamp > killed_at]
    resumed_from = after[0] - 1
    assert resumed_from >= step and resumed_from % SAVE == 0, (step, after[:3])
    assert after == list(range(resumed_from + 1, STEPS + 1))

    # The registered model loads in a fresh process that has no AWS credentials: MLflow's server serves the artifacts.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    probe = subprocess.run(
        [sys.executable, "-c", "import mlflow, sys; m = mlflow.pyfunc.load_model(sys.argv[1]); "
                               "print(m.predict(['Ana Lima is 34 and lives in Porto.'])[0])",
         f"models:/offbox-model/{version}"],
        env={**env, "MLFLOW_TRACKING_URI": offbox.mlflow_url}, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]


def _keys(s3, bucket: str, prefix: str = "") -> list[str]:
    return [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", [])]


def _tail(log, n: int = 6000) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-n:]
