"""The progress board: a Ray worker's reports reach the driver through the named actor; with no board, nothing is sent."""

import os
import threading

import pytest
from testlib import wait_for_progress as _wait_for

from alignpipe import progress


def test_a_worker_reports_and_the_driver_reads_it(progress_board, ray_local):
    def evaluate_rows(total: int) -> int:  # what an evaluate task does with `generation_reporter`
        on_batch = progress.generation_reporter("sft")
        for done in range(1, total + 1):
            on_batch(done, total, tokens=10 * done, seconds=0.5 * done)
        return total

    # the name reaches the worker the way ensure_ray passes it: in the runtime environment
    task = ray_local.remote(num_cpus=0, runtime_env={"env_vars": {progress.BOARD_ENV: progress_board}})(evaluate_rows)
    assert ray_local.get(task.remote(8), timeout=120) == 8
    entry = _wait_for("evaluate", lambda e: e["done"] == 8)  # the last batch always goes (rate limit or not)
    assert entry["kind"] == "eval" and entry["label"] == "sft" and entry["total"] == 8
    assert entry["tokens_per_s"] == pytest.approx(20.0) and entry["eta_s"] == 0.0


def test_reports_are_rate_limited_and_never_raise(progress_board):
    reporter = progress.Reporter("sft", every_s=60)
    reporter.report(kind="train", done=1, total=10)
    reporter.report(kind="train", done=2, total=10)  # within the minute: dropped
    assert _wait_for("sft")["done"] == 1
    reporter.report(final=True, kind="train", done=10, total=10)
    assert _wait_for("sft", lambda e: e["done"] == 10)["total"] == 10
    progress.Reporter("sft", every_s=0).report(lock=threading.Lock())  # cannot be pickled: dropped, not raised


def test_without_a_board_reporting_is_a_no_op(monkeypatch):
    monkeypatch.delenv(progress.BOARD_ENV, raising=False)
    reporter = progress.Reporter("sft")
    reporter.report(final=True, kind="train", done=1, total=2)
    assert reporter._actor is None and not reporter._looked_up  # Ray was never asked


def test_a_report_before_ray_is_up_does_not_start_one():
    """validate reports from the flow process, before `ensure_ray`: a lookup there would start Ray's default local
    instance, without the pipeline's runtime env (board, malloc, ISA caps, niceness), which ensure_ray then reuses."""
    import subprocess
    import sys

    code = ("import ray\nfrom alignpipe import progress\n"
            "progress.Reporter('validate').report(final=True, kind='eval', done=1, total=2)\n"
            "print(ray.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, progress.BOARD_ENV: "run-test"})
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]


def test_eta_is_the_pace_so_far():
    assert progress.eta_s(0, 10, 5.0) is None
    assert progress.eta_s(2, 10, 4.0) == pytest.approx(16.0)
    assert progress.eta_s(10, 10, 4.0) == 0.0
