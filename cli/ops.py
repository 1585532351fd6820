"""`alignpipe up | down | status | env | deploy`: the local stack and the Prefect deployments."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from alignpipe.errors import AlignpipeError
from alignpipe.cli import stack as stack_mod

console = Console()
err = Console(stderr=True)

WorkdirOpt = Annotated[Path, typer.Option("--workdir", "-w", help="Where the stack keeps its state, stores and logs.")]
DEFAULT_WORKDIR = Path(".alignpipe")


def _fail(exc: AlignpipeError) -> None:
    err.print(f"[red]error:[/red] {exc}", soft_wrap=True)
    raise typer.Exit(1) from None


def _exports(env: dict[str, str]) -> str:
    return "\n".join(f"export {k}={v}" for k, v in env.items())


def up(workdir: WorkdirOpt = DEFAULT_WORKDIR) -> None:
    """Start PostgreSQL, a Prefect server (UI) and an MLflow server on it, an S3 API server and a 2-node Ray cluster
    on 127.0.0.1."""
    with console.status("starting the stack") as spinner:
        try:
            stack = stack_mod.up(workdir, on_wait=lambda what: spinner.update(f"waiting for {what}"))
        except AlignpipeError as exc:
            _fail(exc)
    _print_status(workdir)
    console.print("Point `alignpipe run` (and `alignpipe deploy`) at it:")
    console.print(_exports(stack.env), highlight=False, soft_wrap=True)


def down(workdir: WorkdirOpt = DEFAULT_WORKDIR) -> None:
    """Stop what `alignpipe up` started (by pid / process group; other Ray instances are left alone)."""
    with console.status("stopping the stack"):
        stopped = stack_mod.down(workdir)
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


def status(workdir: WorkdirOpt = DEFAULT_WORKDIR) -> None:
    """Show the stack's services, whether they run, and their URLs."""
    if not _print_status(workdir):
        raise typer.Exit(1)


def env(workdir: WorkdirOpt = DEFAULT_WORKDIR) -> None:
    """Print the exports that point pipelines at the stack: `eval "$(alignpipe env)"`."""
    stack = stack_mod.load(workdir)
    if stack is None:
        _fail(AlignpipeError(f"no stack recorded in {stack_mod.state_file(workdir)}; start one with `alignpipe up`"))
    print(_exports(stack.env))


def _print_status(workdir: Path) -> bool:
    rows = stack_mod.status(workdir)
    if not rows:
        console.print("no stack running (start one with `alignpipe up`)")
        return False
    table = Table("service", "state", "pid", "url", "log")
    for svc, running in rows:
        table.add_row(svc.name, "[green]running[/green]" if running else "[red]stopped[/red]", str(svc.pid),
                      svc.url, svc.log)
    console.print(table)
    return all(running for _, running in rows)


def deploy(
    config: Annotated[Path, typer.Option("--config", "-c", help="Pipelines file.")] = Path("pipelines.yaml"),
    serve: Annotated[bool, typer.Option("--serve", help="Stay up and run the deployments' flow runs.")] = False,
    prefect_yaml: Annotated[Path | None, typer.Option(
        "--prefect-yaml", help="Write the same deployments to this prefect.yaml (for `prefect deploy`) instead; "
                               "needs no server.")] = None,
) -> None:
    """Create a Prefect deployment per pipeline (schedule + parameter form) on the server at PREFECT_API_URL."""
    from prefect.settings import PREFECT_API_URL

    from alignpipe.flows.deploy import apply_deployments, build_deployments, prefect_yaml as render, serve_deployments

    if prefect_yaml is not None:
        try:
            deployments = build_deployments(config)
        except AlignpipeError as exc:
            _fail(exc)
        prefect_yaml.write_text(render(deployments, config, prefect_yaml))
        console.print(f"wrote {prefect_yaml}: {', '.join(d.name for d in deployments)}")
        return
    try:
        if not PREFECT_API_URL.value():  # else Prefect would deploy to a throw-away temporary server
            raise AlignpipeError("PREFECT_API_URL is not set: deployments need a Prefect server; start the local "
                                 "stack and point at it with `alignpipe up` then `eval \"$(alignpipe env)\"`")
        deployments = build_deployments(config)
    except AlignpipeError as exc:
        _fail(exc)
    if serve:
        serve_deployments(deployments)
        return
    ids = apply_deployments(deployments)
    table = Table("deployment", "schedule", "id")
    for d in deployments:
        sched = ", ".join(str(s.schedule.cron if hasattr(s.schedule, "cron") else s.schedule.interval)
                          + ("" if s.active else " (paused)") for s in d.schedules) or "-"
        table.add_row(f"alignpipe/{d.name}", sched, ids[d.name])
    console.print(table)
    console.print("Runs launched from the UI or by a schedule start once a serve process polls for them:\n"
                  f"  alignpipe deploy --serve --config {config}")


def register(app: typer.Typer) -> None:
    for fn in (up, down, status, env, deploy):
        app.command()(fn)
