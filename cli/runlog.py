"""The run's log file, `<workdir>/runs/<run key>/run.log`: everything `alignpipe run` saw, also what its quiet console
leaves out (the workers' progress bars and "Loading weights", Ray Train's INFO lines, the Trainer's loss lines).

Two routes feed it, both public APIs:

- log records at INFO and above (the flow's and tasks' lines, Prefect's): a handler on the root logger, where
  Prefect's flow- and task-run loggers propagate.
- what is written to `sys.stdout` / `sys.stderr`: this process's prints, and the Ray workers' output, which Ray
  (`log_to_driver`) writes to the driver's `sys.stdout` / `sys.stderr` of the moment, one line at a time, each
  prefixed `(name pid=N[, ip=...])` (the prefix Ray documents for worker logs). For the run both are replaced by a
  `Router`: every complete line goes to the file (colour codes dropped, a progress bar's redraws reduced to its
  last state); to the console goes every line in verbose mode, and in quiet mode every line except the workers',
  of which only warnings, errors and tracebacks come through.

Under the live view the router is installed inside `rich.live.Live`, whose own redirect of the same two streams
then prints what the router lets through above the table.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

WORKER_LINE = re.compile(r"^\((?:[^()]*? )?pid=\w+(?:, ip=[^)]*)?\) ?")
ALARM = re.compile(r"\b(?:WARNING|ERROR|CRITICAL|FATAL|Traceback|[A-Z]\w*(?:Warning|Error|Exception))\b")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_log_path(workdir: str | Path, pipeline: str) -> Path:
    """A new run's log file: `<workdir>/runs/<UTC time>-<pipeline>-<pid>/run.log` (the flow run's summary JSON sits
    beside these folders); the pid keeps concurrent runs in one workdir apart."""
    key = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{pipeline}-{os.getpid()}"
    return Path(workdir).resolve() / "runs" / key / "run.log"


def plain(line: str) -> str:
    """A console line as the file keeps it: no colour or cursor codes, a `\\r`-redrawn bar as its last state."""
    line = ANSI.sub("", line).rstrip("\n")
    m = WORKER_LINE.match(line)
    prefix, body = (line[: m.end()], line[m.end():]) if m else ("", line)
    states = [s for s in body.split("\r") if s.strip()]
    return prefix + (states[-1] if states else body.replace("\r", "")) + "\n"


class RunLog:
    """The open log file; `write` is thread-safe (Ray's log thread, the flow, the progress poller all write)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.write(text)
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


class _RecordsToFile(logging.Handler):
    def __init__(self, log: RunLog):
        super().__init__(level=logging.INFO)
        self.log = log
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s - %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.log.write(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - logging's own convention: report, never raise into the caller
            self.handleError(record)


class Router(io.TextIOBase):
    """Stands in for one console stream: whole lines to the run log, and to `console` what the mode lets through."""

    def __init__(self, console, log: RunLog, verbose: bool):
        super().__init__()
        self.console, self.log, self.verbose = console, log, verbose
        self._pending = ""
        self._lock = threading.Lock()
        self._alarmed: set[str] = set()  # worker prefixes whose last line was shown (a traceback goes on indented)

    def write(self, text: str) -> int:
        with self._lock:
            *lines, self._pending = (self._pending + text).split("\n")
            for line in lines:
                self._route(line + "\n")
        return len(text)

    def _route(self, line: str) -> None:
        kept = plain(line)
        self.log.write(kept)
        if self.verbose or self._shown(kept):
            self.console.write(line)

    def _shown(self, kept: str) -> bool:
        m = WORKER_LINE.match(kept)
        if m is None:
            return True
        prefix, body = m.group(0), kept[m.end():]
        if ALARM.search(body) or (body[:1] in (" ", "\t") and prefix in self._alarmed):
            self._alarmed.add(prefix)
            return True
        self._alarmed.discard(prefix)
        return False

    def end(self) -> None:
        """Route a last line that never got its newline."""
        if self._pending:
            self.write("\n")

    def flush(self) -> None:
        self.console.flush()

    def isatty(self) -> bool:
        return self.console.isatty()

    def fileno(self) -> int:
        return self.console.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.console, "encoding", "utf-8")

    @property
    def buffer(self):
        """The console's own byte stream: bytes written there skip the run log."""
        return self.console.buffer


@contextmanager
def recording(log: RunLog, verbose: bool) -> Iterator[None]:
    """For the run: log records to the file, and `sys.stdout` / `sys.stderr` through a `Router` each."""
    root = logging.getLogger()
    records = _RecordsToFile(log)
    root.addHandler(records)
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = Router(saved[0], log, verbose), Router(saved[1], log, verbose)
    try:
        yield
    finally:
        for router in (sys.stdout, sys.stderr):
            if isinstance(router, Router):
                router.end()
        sys.stdout, sys.stderr = saved
        root.removeHandler(records)
