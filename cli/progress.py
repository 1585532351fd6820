"""A live per-stage view for `alignpipe run`, fed by the flow's own log lines ("stage sft: running").

It listens to Prefect's flow-run logger instead of reaching into the flow, so the flow stays a plain Prefect
flow that runs the same under a deployment. With `--verbose`, the workers' progress bars (the HF Trainer's tqdm,
loading weights) come through Ray's worker log forwarding above this view; by default they are off.
"""

from __future__ import annotations

import logging
import re
import time

from rich.spinner import Spinner
from rich.table import Table

STAGE_LINE = re.compile(r"^stage (?P<stage>[\w-]+): (?P<what>running|(?P<status>done|cached) in (?P<secs>[\d.]+)s)")


class StageProgress(logging.Handler):
    """Stage name -> status and wall time, rendered as a table whenever rich.live refreshes."""

    def __init__(self, pipeline: str):
        super().__init__(level=logging.INFO)
        self.pipeline = pipeline
        self.stages: dict[str, dict] = {}

    def emit(self, record: logging.LogRecord) -> None:
        m = STAGE_LINE.match(record.getMessage())
        if not m:
            return
        if m["what"] == "running":
            self.stages[m["stage"]] = {"status": "running", "start": time.monotonic(), "secs": None}
        else:
            entry = self.stages.setdefault(m["stage"], {"start": time.monotonic()})
            entry.update(status=m["status"], secs=float(m["secs"]))

    def fail_running(self) -> None:
        for entry in self.stages.values():
            if entry["status"] == "running":
                entry.update(status="failed", secs=time.monotonic() - entry["start"])

    def __rich__(self) -> Table:
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
        return table
