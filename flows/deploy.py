"""Prefect deployments of the alignpipe flow: one per pipeline in pipelines.yaml, with its schedule.

Each deployment is named after its pipeline, presets the `pipeline` and `config_file` parameters, and
offers a form in the Prefect UI: `pipeline` as a drop-down of the file's pipelines, `overrides` as a JSON
object of `section.key: value` pairs (the same keys as `--set`). They are *served* deployments: a
`alignpipe deploy --serve` process (or `prefect.serve`) polls the server and runs each flow run in a
subprocess of its own.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.schedules import Cron, Interval, Schedule

from alignpipe.config import load_pipeline, pipeline_names
from alignpipe.config.schedule import ScheduleConfig
from alignpipe.flows.pipeline import alignpipe_pipeline

TAGS = ["alignpipe"]


def schedule_for(s: ScheduleConfig) -> Schedule:
    """The Prefect schedule for a pipeline's `schedule:` section."""
    if s.cron is not None:
        return Cron(s.cron, timezone=s.timezone)
    return Interval(timedelta(seconds=s.interval_seconds), timezone=s.timezone)


def build_deployments(config_file: str | Path) -> list[RunnerDeployment]:
    """One deployment per pipeline (validated first: a bad pipeline stops `deploy` with its config error)."""
    path = Path(config_file).resolve()
    names = pipeline_names(path)
    deployments = []
    for name in names:
        cfg = load_pipeline(path, name)
        deployment = alignpipe_pipeline.to_deployment(
            name=name,
            schedules=[schedule_for(cfg.schedule)] if cfg.schedule else None,
            parameters={"pipeline": name, "overrides": {}, "config_file": str(path)},
            description=cfg.description or None,
            tags=[*TAGS, name],
            # The served flow is imported as `flows.pipeline` (installed package), whatever the serve cwd is.
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        # A drop-down of this file's pipelines instead of a free-text box in the UI's run form.
        deployment._parameter_openapi_schema.properties["pipeline"]["enum"] = names
        deployments.append(deployment)
    return deployments


def apply_deployments(deployments: list[RunnerDeployment]) -> dict[str, str]:
    """Create or update each deployment on the Prefect server (PREFECT_API_URL); returns name -> id."""
    return {d.name: str(d.apply()) for d in deployments}


def serve_deployments(deployments: list[RunnerDeployment]) -> None:
    """Register the deployments and run their flow runs (scheduled or launched from the UI) until stopped."""
    from prefect import serve

    # Schedules stay as pipelines.yaml says when this process stops; runs wait for the next serve process.
    serve(*deployments, print_starting_message=True, pause_on_shutdown=False)
