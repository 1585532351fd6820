"""`alignpipe check | run`: validate pipelines.yaml, run a pipeline as a Prefect flow, print the summary."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markdown import Markdown
from rich.markup import escape
from rich.table import Table

from alignpipe import lognoise
from alignpipe.cli.runlog import RunLog, run_log_path
from alignpipe.config import load_all, load_checked, preflight
from alignpipe.config.loader import parse_overrides
from alignpipe.errors import AlignpipeError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="LLM fine-tuning pipeline on Prefect, Ray and MLflow.")
console = Console()
err = Console(stderr=True)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Pipelines file.")]


def _quiet_env() -> None:
    """Resolved once, here at the edge: no telemetry from the libraries we drive. (Prefect's client honours
    DO_NOT_TRACK, but the temporary server `run` starts sends its own heartbeat unless its analytics setting is
    off; that heartbeat also raced the flow for the server's SQLite file and logged "database is locked".)"""
    for key, value in {"RAY_USAGE_STATS_ENABLED": "0", "GX_ANALYTICS_ENABLED": "false",
                       "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false",
                       "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}.items():
        os.environ.setdefault(key, value)


@app.callback()
def _every_command() -> None:
    _quiet_env()  # before any command imports Prefect, Ray or GX: they read these once


@app.command()
def check(config: ConfigOpt = Path("pipelines.yaml")) -> None:
    """Validate every pipeline in the file (schema, cross-field rules, files that must exist)."""
    try:
        results = load_all(config, env=os.environ)
    except AlignpipeError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)  # `[str]` in a message is not markup
        raise typer.Exit(1) from None
    table = Table("pipeline", "status", "details")
    failed = False
    for name, cfg in results.items():
        problems = [str(cfg)] if isinstance(cfg, AlignpipeError) else preflight(cfg)
        failed |= bool(problems)
        table.add_row(name, "[red]invalid[/red]" if problems else "[green]ok[/green]",
                      escape("\n".join(problems) if problems else cfg.description))
    console.print(table)
    if failed:
        raise typer.Exit(1)


@app.command()
def run(
    pipeline: Annotated[str, typer.Argument(help="Pipeline name in the pipelines file.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key: section.key=value (repeatable).")] = None,
    config: ConfigOpt = Path("pipelines.yaml"),
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help=(
        "Also show the libraries' progress bars and training log lines from every Ray worker (loading weights, "
        "tokenizing, map, training steps) and Ray's INFO lines. Without it the console keeps the stage events, "
        "the training and evaluation progress, warnings and errors; everything is in the run's log file "
        "(<workdir>/runs/<run>/run.log, also logged to MLflow) and the training metrics are in MLflow."))] = False,
) -> None:
    """Run one pipeline end to end and print its summary."""
    log, summary = None, None
    try:  # fail fast on config mistakes, before Prefect, Ray or MLflow start
        overrides = parse_overrides(set_ or [])
        cfg = load_checked(config, pipeline, overrides, env=os.environ)
        if not verbose:  # before the flow imports transformers and datasets: they read these once (in this process;
            for key, value in lognoise.QUIET_ENV.items():  # the Ray workers keep theirs, see cli/runlog.py)
                os.environ.setdefault(key, value)
        if not console.is_terminal:  # Ray colours the prefix of each worker line it forwards, terminal or not
            os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        from alignpipe.flows.pipeline import alignpipe_pipeline

        _hide_user_error_tracebacks()
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        log = RunLog(run_log_path(cfg.workdir, pipeline))
        summary = _run_with_progress(pipeline, lambda: alignpipe_pipeline(
            pipeline=pipeline, overrides=overrides, config_file=str(config)), log, verbose)
    except AlignpipeError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)  # `[str]` in a message is not markup
        raise typer.Exit(1) from None
    finally:
        if log is not None:
            log.close()
            if summary is None:  # failed or stopped: where to look
                err.print(f"run log: {log.path}", soft_wrap=True, highlight=False)
    print_summary(summary)
    _log_run_file(cfg, summary["mlflow_run_id"], log.path)


def _log_run_file(cfg, run_id: str, path: Path) -> None:
    """The run's log file, to the pipeline's MLflow run (finished by now: MLflow takes artifacts after the end)."""
    from alignpipe import tracking

    try:
        tracking.client_for(tracking.tracking_uri(cfg)).log_artifact(run_id, str(path), "logs")
    except Exception as exc:  # noqa: BLE001 - the run itself succeeded; the file is still on disk
        err.print(f"[yellow]warning:[/yellow] the run log was not logged to MLflow: {escape(str(exc))}")
    console.print(f"run log: {path} (MLflow: logs/{path.name})", soft_wrap=True, highlight=False)


def _exit_on_sigterm(signum, frame):
    """SIGTERM (`kill`, a container stopping) ends `run` through Python's exit handlers, as Ctrl-C does, so the
    temporary Prefect server it started stops too. (With the default action, Prefect re-sends SIGTERM once it has
    marked the flow run crashed, and the process dies on the spot, leaving that server running.)"""
    raise SystemExit(128 + signum)


def _run_with_progress(pipeline: str, run_flow, log, verbose: bool):
    """Run the flow with its output recorded in the run log (cli/runlog.py) and, on a terminal, under one live view
    (the stage table and the current training or evaluation progress, cli/progress.py); elsewhere plain lines."""
    from rich.live import Live

    from alignpipe import progress
    from alignpipe.cli.progress import BoardPoller, ProgressLines, StageProgress, log_lines_above
    from alignpipe.cli.runlog import recording

    view = StageProgress(pipeline)
    flow_logger = logging.getLogger("prefect.flow_runs")
    flow_logger.addHandler(view)
    os.environ[progress.BOARD_ENV] = f"run-{log.path.parent.name}"  # ray_runner.ensure_ray starts it
    try:
        if not console.is_terminal:
            with recording(log, verbose), BoardPoller(view, ProgressLines(view, print)):
                try:
                    return run_flow()
                except BaseException:
                    for line in view.fail_running():
                        print(line)
                    raise
        live_console = Console(file=sys.stdout)  # the terminal itself, not the streams replaced below
        with Live(view, console=live_console, refresh_per_second=2), log_lines_above(live_console), \
                recording(log, verbose), BoardPoller(view):
            try:
                return run_flow()
            except BaseException:
                view.fail_running()
                raise
    finally:
        flow_logger.removeHandler(view)
        os.environ.pop(progress.BOARD_ENV, None)


class _NoTracebackForUserErrors(logging.Filter):
    """Prefect logs flow failures with a traceback; for user-fixable errors the message is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], AlignpipeError):
            record.exc_info, record.exc_text = None, None
        return True


def _hide_user_error_tracebacks() -> None:
    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs", ""):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(_NoTracebackForUserErrors())


def print_summary(summary: dict) -> None:
    stages = Table("stage", "status", "wall time", title=f"pipeline {summary['pipeline']}")
    for s in summary["stages"]:
        stages.add_row(s["stage"], s["status"], f"{s['seconds']:.1f}s")
    console.print(stages)
    console.print(Markdown(summary["table"]))
    reg = summary.get("registered")
    if reg:
        console.print(f"registered [bold]{reg['model_name']}[/bold] version {reg['version']} as @{reg['alias']} "
                      f"(models:/{reg['model_name']}@{reg['alias']})")
        console.print(f"promotion: {reg.get('decision', '')}")
    console.print(f"MLflow run {summary['mlflow_run_id']}; open the UI with:\n  {summary['mlflow_ui']}")


# The registry commands live in their own module, as do up/down/status/env/deploy.
from alignpipe.cli.registry import add_commands

add_commands(app)
from alignpipe.cli import ops

ops.register(app)

if __name__ == "__main__":  # python -m alignpipe.cli.main
    app()
