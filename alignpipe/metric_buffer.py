"""A metric logger that training never waits on: points are queued with their step and time, written in order.

A background thread sends the queue to MLflow in batches; when the tracking server is unreachable the points
stay queued (and in a local JSONL spool, so a killed worker's restart sends them too) and are retried with
backoff. `drain()` at the end of training waits a bounded time, then fails naming what was not written.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections import deque
from itertools import islice
from pathlib import Path

from alignpipe import tracking
from alignpipe.errors import AlignpipeError

BATCH = 1000            # MLflow's limit on metrics per log_batch request
DRAIN_TIMEOUT_S = 180.0  # how long the end of training waits for an unreachable server to come back
MAX_BACKOFF_S = 5.0      # once the server is back, queued points go out within this long

# For the processes that log through a buffer (Ray training workers): one short try per request, because the
# buffer retries by itself. MLflow's defaults (7 retries, 120 s timeout) keep one batch in flight for minutes.
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


class MetricsNotWritten(AlignpipeError):
    """Metric points could not be written to the tracking server before the drain timeout."""


def spool_path(run_id: str, rank: int = 0) -> Path:
    """The node-local spool of one run's points on one worker: a restarted worker on the node finds it again."""
    return Path(tempfile.gettempdir()) / "alignpipe-metrics" / f"{run_id}-rank{rank}.jsonl"


class MetricBuffer:
    """Queue metric points for one MLflow run and write them from a background thread, in order.

    Args:
        uri: MLflow tracking URI.
        run_id: the run the points belong to (it must still be active when they are written).
        spool: optional JSONL file mirroring the unwritten points; points found there at start are sent first.
    """

    def __init__(self, uri: str, run_id: str, spool: Path | None = None):
        self.uri, self.run_id, self.spool = uri, run_id, spool
        self._client = tracking.client_for(uri)  # here, not in the thread: a bad URI fails the caller at once
        self._pending: deque[tuple[str, float, int, int]] = deque()  # (key, value, timestamp ms, step)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._fatal: Exception | None = None   # a request the server refused: retrying cannot help
        self.last_error: Exception | None = None
        if spool is not None and spool.is_file():  # left by a worker that died before writing them
            self._pending.extend(_read_spool(spool))
            self._wake.set()
        self._thread = threading.Thread(target=self._run, name=f"metric-buffer-{run_id[:8]}", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Points queued and not yet acknowledged by the tracking store."""
        with self._lock:
            return len(self._pending)

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Queue `metrics` at `step`, stamped now; returns at once (non-numbers and NaNs are dropped)."""
        self._raise_fatal()
        now = int(time.time() * 1000)
        points = [(k, float(v), now, step or 0) for k, v in metrics.items() if tracking.is_number(v)]
        if not points:
            return
        with self._lock:
            self._pending.extend(points)
            if self.spool is not None:
                self.spool.parent.mkdir(parents=True, exist_ok=True)
                with open(self.spool, "a") as f:  # flushed on close: survives the process being killed
                    f.writelines(_line(p) for p in points)
        self._wake.set()

    def drain(self, timeout: float = DRAIN_TIMEOUT_S) -> None:
        """Wait until every queued point is written; raise `MetricsNotWritten` after `timeout` seconds.

        The points stay queued (and spooled) after a timeout, so nothing is dropped silently.
        """
        deadline = time.monotonic() + timeout
        self._wake.set()
        while self.pending and self._fatal is None and time.monotonic() < deadline:
            time.sleep(0.05)
        self._raise_fatal()
        if left := self.pending:
            where = f"; they are kept in {self.spool}" if self.spool is not None else ""
            raise MetricsNotWritten(
                f"{left} metric points for MLflow run {self.run_id} were not written to {self.uri} within "
                f"{timeout:.0f}s (last error: {self.last_error}){where}. Check that the tracking server is up."
            )
        if self.spool is not None:
            self.spool.unlink(missing_ok=True)

    def _raise_fatal(self) -> None:
        if self._fatal is not None:
            raise MetricsNotWritten(f"MLflow refused metrics for run {self.run_id} at {self.uri}: {self._fatal}")

    def _run(self) -> None:
        """The writer: send the oldest batch; on success drop it, on failure keep it and back off."""
        from mlflow.entities import Metric

        backoff = 0.0
        while self._fatal is None:
            if backoff:
                time.sleep(backoff)  # not interruptible on purpose: a drain must not turn this into a busy loop
            else:
                self._wake.wait()
            self._wake.clear()  # before reading the queue, so a point queued after this read wakes us again
            with self._lock:
                batch = list(islice(self._pending, BATCH))
            if not batch:
                backoff = 0.0
                continue
            try:
                self._client.log_batch(self.run_id, metrics=[Metric(*p) for p in batch])
            except Exception as exc:  # noqa: BLE001 - anything transient stays queued; see _refused
                self.last_error = exc
                if _refused(exc):
                    self._fatal = exc
                backoff = min(max(2 * backoff, 0.5), MAX_BACKOFF_S)
                continue
            backoff = 0.0
            with self._lock:
                for _ in batch:  # new points only ever join at the right
                    self._pending.popleft()
                if self.spool is not None:
                    _rewrite_spool(self.spool, self._pending)
                if self._pending:
                    self._wake.set()


def _refused(exc: Exception) -> bool:
    """A 4xx answer (bad metric, unknown or finished run): the server is up and will say no again.

    Connection errors, timeouts, 5xx and 429 are transient. A 4xx is fatal only when the request reached
    the server; MLflow reports connection failures as its generic INTERNAL_ERROR (500).
    """
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException):
        return False
    status = exc.get_http_status_code()
    return 400 <= status < 500 and status not in (408, 429)


def _line(point: tuple[str, float, int, int]) -> str:
    key, value, timestamp, step = point
    return json.dumps({"key": key, "value": value, "timestamp": timestamp, "step": step}) + "\n"


def _read_spool(path: Path) -> list[tuple[str, float, int, int]]:
    points = []
    for line in path.read_text().splitlines():
        try:
            raw = json.loads(line)
        except json.JSONDecodeError:  # the last line of a process killed mid-write
            continue
        points.append((raw["key"], float(raw["value"]), int(raw["timestamp"]), int(raw["step"])))
    return points


def _rewrite_spool(path: Path, points) -> None:
    """The spool now holds exactly the unwritten points (usually none: an empty file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(_line(p) for p in points))
    os.replace(tmp, path)  # atomic: a kill mid-rewrite leaves the old spool, whose replay is idempotent
