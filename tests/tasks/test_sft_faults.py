"""SFT under faults, with real Ray, MLflow and TRL: a training worker SIGKILLed mid-run, the MLflow server down.

Either way the stage finishes with every step, and nothing it logged is lost.
"""

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from alignpipe import tracking
from alignpipe.tasks.sft import run_sft
from testlib import canonical_split, run_context

pytestmark = pytest.mark.slow

# A resumed run restores the adapter, optimizer, scheduler, RNG states and the data position from the HF
# checkpoint, so it repeats the undisturbed run's arithmetic: the same losses up to float rounding (bf16
# autocast where the CPU has it; measured: identical). 1e-3 is below the batch-to-batch spread of the loss
# here, so a resume that lost optimizer state, restarted the schedule or trained other batches fails.
# Checkpoints fall on epoch boundaries (16 rows, batch 4: 4 steps an epoch). Resumed mid-epoch the losses are
# not identical (measured: up to 4e-3 apart per step, 5e-4 at the last step, after resuming at step 10 of
# this set-up), probably the epoch's length-grouped batch order or dropout RNG rebuilt differently by HF's
# mid-epoch skip; not diagnosed yet, so this test does not cover it.
LOSS_TOLERANCE = 1e-3
STEPS_PER_EPOCH = 4


def _cfg(smoke_cfg, workdir: Path, steps: int, save: int):
    cfg = smoke_cfg.model_copy(deep=True)
    cfg.workdir = str(workdir)          # its own Ray storage: the same work would otherwise be found finished
    cfg.data.sft.limit = 16
    cfg.sft.max_steps = steps
    cfg.sft.batch_size = 4
    cfg.sft.learning_rate = 5e-2
    cfg.sft.eval_fraction = 0.0
    cfg.sft.warmup_ratio = 0.0
    cfg.sft.lr_scheduler = "constant"
    cfg.sft.save_steps = save
    cfg.sft.logging_steps = 1
    return cfg


def _in_background(fn, *args) -> tuple[threading.Thread, dict]:
    """Run `fn(*args)` in a thread; the dict gets its result ("out") or exception ("error")."""
    box: dict = {}

    def target():
        try:
            box["out"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the test, which re-raises it
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def _result(thread: threading.Thread, box: dict, timeout: float = 900):
    thread.join(timeout)
    assert not thread.is_alive(), f"SFT did not finish within {timeout:.0f}s"
    if "error" in box:
        raise box["error"]
    return box["out"]


def _stage_run(ctx) -> str | None:
    """The sft stage's MLflow run under the test's parent run, once it exists."""
    runs = tracking.client_for(ctx.tracking_uri).search_runs(
        [ctx.experiment_id], f"tags.mlflow.parentRunId = '{ctx.parent_run_id}'")
    return runs[0].info.run_id if runs else None


def _loss(uri: str, run_id: str) -> list[tuple[int, float, int]]:
    """(step, loss, timestamp ms) of every logged loss point, in the order logged."""
    points = tracking.client_for(uri).get_metric_history(run_id, "loss")
    return sorted(((m.step, m.value, m.timestamp) for m in points), key=lambda p: (p[2], p[0]))


def _wait_for(ctx, thread, min_step: int, timeout: float = 600) -> tuple[str, int]:
    """Poll MLflow until the stage run has logged `min_step`; returns (run id, last step)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and thread.is_alive():
        run_id = _stage_run(ctx)
        steps = [s for s, _, _ in _loss(ctx.tracking_uri, run_id)] if run_id else []
        if steps and max(steps) >= min_step:
            return run_id, max(steps)
        time.sleep(0.1)
    raise AssertionError(f"SFT ended or timed out before step {min_step} (is it too fast or too slow here?)")


def _train_workers() -> list[psutil.Process]:
    """This test's Ray Train worker processes (in-process Ray: descendants of this process)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:  # ended while we looked
            continue
    return found


def _reported_step(storage: Path) -> int:
    """The step of the last checkpoint Ray Train has registered (its controller's snapshot in the run storage),
    0 before the first: a restarted worker group resumes from exactly this one."""
    for snapshot in storage.glob("sft-*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
        except (OSError, json.JSONDecodeError):  # being rewritten
            return 0
        return int(latest["metrics"].get("step", 0)) if latest else 0  # the final report has no "step"
    return 0


def test_killed_worker_resumes_from_its_checkpoint_with_the_same_loss(smoke_cfg, tiny_model, ray_local, tmp_path):
    steps, save = 5 * STEPS_PER_EPOCH, STEPS_PER_EPOCH
    calm = _cfg(smoke_cfg, tmp_path / "calm", steps, save)
    ctx = run_context(calm, tiny_model, name="undisturbed")
    train_path, digest = canonical_split(calm, "sft", tmp_path)
    undisturbed = run_sft(calm, ctx, train_path, digest)
    calm_loss = {s: v for s, v, _ in _loss(ctx.tracking_uri, undisturbed.mlflow_run_id)}

    hit = _cfg(smoke_cfg, tmp_path / "hit", steps, save)
    ctx = run_context(hit, tiny_model, name="killed")
    thread, box = _in_background(run_sft, hit, ctx, train_path, digest)
    storage = Path(hit.workdir) / "ray_results"
    deadline = time.monotonic() + 600
    while _reported_step(storage) < 2 * save and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)  # the second checkpoint: resuming from it is not resuming from the first or from zero
    reported = _reported_step(storage)
    assert reported == 2 * save, f"SFT ended or timed out before its second checkpoint (at step {reported})"
    [worker] = _train_workers()
    killed_at = int(time.time() * 1000)
    os.kill(worker.pid, signal.SIGKILL)
    out = _result(thread, box)

    assert out.metrics["global_step"] == undisturbed.metrics["global_step"] == steps
    run_id = _stage_run(ctx)
    assert tracking.client_for(ctx.tracking_uri).get_run(run_id).info.status == "FINISHED"
    history = _loss(ctx.tracking_uri, run_id)
    before = [s for s, _, t in history if t <= killed_at]
    after = [(s, v) for s, v, t in history if t > killed_at]
    resumed_from = after[0][0] - 1
    # Resumed right after the last checkpoint reported before the kill (a later one, if it was reported in
    # the instant between our look and the kill); the steps after it were trained again, none skipped.
    assert resumed_from % save == 0 and reported <= resumed_from <= max(before), (max(before), after[:3])
    assert [s for s, _ in after] == list(range(resumed_from + 1, steps + 1))  # every remaining step, once
    assert before == list(range(1, max(before) + 1))
    diffs = [abs(v - calm_loss[s]) for s, v in after]
    print(f"killed after step {max(before)}, resumed from {resumed_from}; final loss {after[-1][1]:.6f} vs "
          f"{calm_loss[steps]:.6f} undisturbed; largest per-step difference {max(diffs):.2e}")
    assert abs(after[-1][1] - calm_loss[steps]) <= LOSS_TOLERANCE
    assert max(diffs) <= LOSS_TOLERANCE

OUTAGE_S = 30  # the number


def test_mlflow_server_down_30s_loses_no_step(smoke_cfg, tiny_model, ray_local, mlflow_server, tmp_path):
    # Enough steps that training is still running when the server goes down: the tiny model trains at up to ~17
    # steps/s (60 steps took 3.5 s in a CI run, all over before the kill), ~1.5 steps/s on a busy machine.
    steps = 300
    cfg = _cfg(smoke_cfg, tmp_path / "work", steps, save=steps)
    cfg.tracking.mlflow_uri = mlflow_server.url
    ctx = run_context(cfg, tiny_model)
    train_path, digest = canonical_split(cfg, "sft", tmp_path)
    thread, box = _in_background(run_sft, cfg, ctx, train_path, digest)
    run_id, _ = _wait_for(ctx, thread, 5)

    mlflow_server.kill()
    down = int(time.time() * 1000)
    time.sleep(OUTAGE_S)
    mlflow_server.start()  # same port, same SQLite store
    up = int(time.time() * 1000)
    out = _result(thread, box)

    assert tracking.client_for(ctx.tracking_uri).get_run(run_id).info.status == "FINISHED"
    assert out.metrics["global_step"] == steps
    history = _loss(ctx.tracking_uri, run_id)
    assert sorted(s for s, _, _ in history) == list(range(1, steps + 1))  # every step, once, its own number
    during = [s for s, _, t in history if down <= t < up]
    print(f"{len(during)} steps logged while the server was down ({(up - down) / 1000:.0f}s): "
          f"{during[:1]}..{during[-1:]}; training ended at step {steps} "
          f"{(history[-1][2] - up) / 1000:.0f}s after the server was back")
    # Training kept going while the server was down (it did not wait on MLflow), and those steps arrived later.
    assert len(during) >= 3, during
    assert during == list(range(during[0], during[-1] + 1))
