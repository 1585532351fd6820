"""Live progress from Ray workers to the driver: a small named Ray actor per run (the board) that workers report to.

The run's driver (`alignpipe run`) names the board in `BOARD_ENV`; `ray_runner.ensure_ray` starts it right after
Ray and passes the name on to every worker in the runtime environment. A worker's `Reporter` finds it by name and
sends it fire-and-forget `.remote()` calls, at most one a second, so progress crosses a cluster whose nodes share no
disk and never waits on the driver. With no board (tests, benchmarks, a deployment run without the CLI) a
`Reporter` does nothing. Nothing here imports Prefect: Ray workers import this module.

An entry on the board is one stage's latest progress: `kind` ("train" or "eval"), `done` of `total` (steps or rows),
`tokens_per_s`, `eta_s`, and for training `loss`, for evaluation the artifact's `label`.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

BOARD_ENV = "ALIGNPIPE_PROGRESS_BOARD"  # the board's actor name; unset: no board, every Reporter is a no-op
NAMESPACE = "alignpipe-progress"        # explicit, so Ray Train's workers find it whatever their job's namespace
EVERY_S = 1.0                           # at most one report a second per worker

_board = None  # the driver's handle: a named actor lives only while a handle to it does
# Held around every read of the board (the CLI reads it from a thread of its own) and by `clear_board`, which
# ray_runner.shutdown calls before Ray shuts down, so no read is in flight while Ray's core worker shuts down.
_reading = threading.Lock()


class Board:
    """The Ray actor: stage -> its latest progress entry (with `at`, the wall-clock time it arrived)."""

    def __init__(self):
        self.entries: dict[str, dict[str, Any]] = {}

    def report(self, stage: str, entry: dict[str, Any]) -> None:
        self.entries[stage] = {**entry, "at": time.time()}

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return self.entries


def start_board() -> None:
    """Driver side, once Ray is up: start this run's board when `BOARD_ENV` names one (idempotent)."""
    global _board
    name = os.environ.get(BOARD_ENV)
    if not name or _board is not None:
        return
    import ray

    # 0 CPUs: it never takes a slot the stages asked for; a handful of small calls a second
    _board = ray.remote(num_cpus=0)(Board).options(name=name, namespace=NAMESPACE, get_if_exists=True).remote()


def read_board(timeout_s: float = 0.5) -> dict[str, dict[str, Any]]:
    """Driver side: the board's entries, or {} when there is none (yet) or it does not answer within `timeout_s`."""
    import sys

    ray = sys.modules.get("ray")  # never import Ray just to find it was not running
    with _reading:
        if _board is None or ray is None or not ray.is_initialized():
            return {}
        try:
            return ray.get(_board.snapshot.remote(), timeout=timeout_s)
        except Exception:  # noqa: BLE001 - a slow or gone board only means no progress to show this time
            return {}


def clear_board() -> None:
    """Forget this process's board (before Ray shuts down, or when a test's run ended); waits for a read in flight."""
    global _board
    with _reading:
        _board = None


class Reporter:
    """Worker side: sends one stage's progress to the board, at most every `every_s` seconds (a `final` report
    always goes). Never raises and never waits: progress is a courtesy, training and evaluation are the job."""

    def __init__(self, stage: str, every_s: float = EVERY_S):
        self.stage, self.every_s = stage, every_s
        self.name = os.environ.get(BOARD_ENV)
        self._actor, self._looked_up, self._last = None, False, 0.0

    def report(self, final: bool = False, **entry: Any) -> None:
        now = time.monotonic()
        if not self.name or (not final and now - self._last < self.every_s):
            return
        self._last = now
        try:
            if not self._looked_up:
                import sys

                ray = sys.modules.get("ray")
                # Ray's API starts a default local Ray when none is up: in the driver before `ensure_ray` (validate
                # reports from the flow process) that Ray would lack the pipeline's runtime env, board included
                if ray is None or not ray.is_initialized():
                    return
                self._looked_up = True
                self._actor = ray.get_actor(self.name, namespace=NAMESPACE)
            if self._actor is not None:
                self._actor.report.remote(self.stage, entry)  # fire and forget: the reference is dropped
        except Exception:  # noqa: BLE001 - no board (it ended, or Ray is not here): report nothing from now on
            self._actor = None


def eta_s(done: float, total: float, elapsed_s: float) -> float | None:
    """Seconds left at the pace so far, or None before there is a pace."""
    if done <= 0 or total <= 0 or elapsed_s <= 0:
        return None
    return max(0.0, (total - done) * elapsed_s / done)


def generation_reporter(label: str, stage: str = "evaluate"):
    """A `(rows_done, rows_total, tokens, seconds)` callback for batched generation that reports to the board."""
    reporter = Reporter(stage)

    def on_batch(done: int, total: int, tokens: int, seconds: float) -> None:
        reporter.report(final=done >= total, kind="eval", label=label, done=done, total=total,
                        tokens_per_s=tokens / seconds if seconds else 0.0, eta_s=eta_s(done, total, seconds))

    return on_batch
