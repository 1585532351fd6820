"""What `alignpipe run` shows while a pipeline runs: the stage table and the current training or evaluation progress.

The stage table is fed by the flow's own log lines ("stage sft: running"), so the flow stays a plain Prefect flow
that runs the same under a deployment. The progress comes from the run's progress board (`alignpipe.progress`), which
the Ray workers report to; a `BoardPoller` thread reads it twice a second, so a slow board never holds up the flow or
the screen. On a terminal both render as one `rich.live.Live` view (`StageProgress`); elsewhere (CI, a pipe) the
flow's stage lines are the record, and `ProgressLines` adds one plain line of progress now and then for long work.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

from rich.console import Console, Group
from rich.progress_bar import ProgressBar
from rich.spinner import Spinner
from rich.table import Table

from alignpipe import progress

STAGE_LINE = re.compile(r"^stage (?P<stage>[\w-]+): (?P<what>running|(?P<status>done|cached) in (?P<secs>[\d.]+)s)")


def duration(seconds: float | None) -> str:
    """`42s`, `5m12s`, `1h03m`; `?` when unknown."""
    if seconds is None:
        return "?"
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def describe(stage: str, entry: dict) -> str:
    """One line of progress: `sft: step 120/400 (30%), loss 1.234, 850 tokens/s, ETA 5m12s` or
    `evaluate: sft 8/16 rows (50%), 1500 tokens/s, ETA 4s`."""
    done, total = entry.get("done", 0), entry.get("total") or 0
    pct = f" ({done / total:.0%})" if total > 0 else ""
    if entry.get("kind") == "eval":
        parts = [f"{stage}: {entry.get('label', '')} {done}/{total} rows{pct}"]
    else:
        parts = [f"{stage}: step {done}/{total}{pct}"]
        if entry.get("loss") is not None:
            parts.append(f"loss {entry['loss']:.4g}")
    if entry.get("tokens_per_s"):
        parts.append(f"{entry['tokens_per_s']:.0f} tokens/s")
    if done < total:
        parts.append(f"ETA {duration(entry.get('eta_s'))}")
    return ", ".join(parts)


class StageProgress(logging.Handler):
    """Stage name -> status and wall time (from the flow's log lines), plus the board's latest progress entries;
    rendered as the table and a progress row whenever rich.live refreshes."""

    def __init__(self, pipeline: str):
        super().__init__(level=logging.INFO)
        self.pipeline = pipeline
        self.stages: dict[str, dict] = {}
        self.board: dict[str, dict] = {}  # replaced whole by the poller

    def emit(self, record: logging.LogRecord) -> None:
        m = STAGE_LINE.match(record.getMessage())
        if not m:
            return
        if m["what"] == "running":
            self.stages[m["stage"]] = {"status": "running", "start": time.monotonic(), "since": time.time(),
                                       "secs": None}
        else:
            entry = self.stages.setdefault(m["stage"], {"start": time.monotonic(), "since": time.time()})
            entry.update(status=m["status"], secs=float(m["secs"]))

    def fail_running(self) -> list[str]:
        """Mark the running stages failed; returns their `stage X: failed after Ns` lines."""
        lines = []
        for name, entry in self.stages.items():
            if entry["status"] == "running":
                entry.update(status="failed", secs=time.monotonic() - entry["start"])
                lines.append(f"stage {name}: failed after {entry['secs']:.1f}s")
        return lines

    def current(self) -> tuple[str, dict] | None:
        """The running stage and its progress entry on the board (one that arrived after the stage began)."""
        for name, entry in reversed(self.stages.items()):
            if entry["status"] == "running":
                found = self.board.get(name)
                return (name, found) if found and found.get("at", 0) >= entry["since"] - 1 else None
        return None

    def __rich__(self) -> Group:
        table = Table("stage", "status", "wall time", title=f"pipeline {self.pipeline}", title_justify="left")
        for name, entry in self.stages.items():
            if entry["status"] == "running":
                status = Spinner("dots", text="running", style="yellow")
                secs = time.monotonic() - entry["start"]
            else:
                status = {"done": "[green]done[/green]", "cached": "[cyan]cached[/cyan]"}.get(entry["status"], "[red]failed[/red]")
                secs = entry["secs"]
            table.add_row(name, status, f"{secs:.0f}s")
        if not self.stages:
            table.add_row("-", Spinner("dots", text="starting (imports, Prefect, MLflow)"), "")
        now = self.current()
        if now is None:
            return Group(table)
        stage, entry = now
        row = Table.grid(padding=(0, 1))
        row.add_row(ProgressBar(total=max(entry.get("total") or 1, 1), completed=entry.get("done", 0), width=30),
                    describe(stage, entry))
        return Group(table, row)


class ProgressLines:
    """Plain progress lines for a console that is not a terminal, for long work only: once a stage (and artifact)
    has reported progress for `every_s`, one line each time `every_s` more have passed or another quarter is done,
    until it is done (its stage line follows)."""

    def __init__(self, view: StageProgress, write: Callable[[str], None], every_s: float = 30.0, step: float = 0.25):
        self.view, self.write, self.every_s, self.step = view, write, every_s, step
        self._seen: dict[tuple[str, str], tuple[float, float, float]] = {}  # first seen, last line, its fraction

    def update(self, now: float | None = None) -> None:
        found = self.view.current()
        if found is None:
            return
        stage, entry = found
        now = time.monotonic() if now is None else now
        total = entry.get("total") or 0
        fraction = entry.get("done", 0) / total if total > 0 else 0.0
        key = (stage, entry.get("label", ""))
        first, when, printed = self._seen.setdefault(key, (now, now, 0.0))
        if now - first < self.every_s or fraction >= 1:
            return  # short work, or done: the stage lines say enough
        if now - when >= self.every_s or int(fraction / self.step) > int(printed / self.step):
            self._seen[key] = (first, now, fraction)
            self.write(describe(stage, entry))


class BoardPoller:
    """Reads the run's progress board every `interval_s` in a daemon thread and hands the entries to the view (and,
    with no terminal, to `ProgressLines`)."""

    def __init__(self, view: StageProgress, lines: ProgressLines | None = None, interval_s: float = 0.5):
        self.view, self.lines, self.interval_s = view, lines, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="alignpipe-progress", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.view.board = progress.read_board(timeout_s=self.interval_s)
            if self.lines is not None:
                self.lines.update()

    def __enter__(self) -> BoardPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


class _AboveLive(logging.Handler):
    """Prints log lines with the live view's console, so they land above the view instead of through it."""

    def __init__(self, live_console: Console, like: logging.Handler):
        super().__init__(level=like.level)
        self.live_console = live_console
        self.setFormatter(like.formatter)
        for f in like.filters:
            self.addFilter(f)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.live_console.print(self.format(record), markup=False, highlight=False, soft_wrap=True)
        except Exception:  # noqa: BLE001 - logging's own convention
            self.handleError(record)


@contextmanager
def log_lines_above(live_console: Console):
    """Prefect's console handler writes to the stderr it was configured with, under the live view's redraws; for
    the run it is swapped for one that prints through the view's console."""
    from prefect.logging.handlers import PrefectConsoleHandler

    root = logging.getLogger()
    swaps = [(h, _AboveLive(live_console, h)) for h in root.handlers if isinstance(h, PrefectConsoleHandler)]
    for old, new in swaps:
        root.removeHandler(old)
        root.addHandler(new)
    try:
        yield
    finally:
        for old, new in swaps:
            root.removeHandler(new)
            root.addHandler(old)
