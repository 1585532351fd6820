"""Prefect deployments of the alignpipe flow: one per pipeline in pipelines.yaml, with its schedule.

Each deployment is named after its pipeline, presets the `pipeline` and `config_file` parameters, and
offers a form in the Prefect UI: `pipeline` as a drop-down of the file's pipelines, `overrides` as a JSON
object of `section.key: value` pairs (the same keys as `--set`). They are *served* deployments: a
`alignpipe deploy --serve` process (or `prefect.serve`) polls the server and runs each flow run in a
subprocess of its own.

One source: pipelines.yaml. `prefect.yaml` (for `prefect deploy` with a work pool and a worker) is generated
from the same deployments by `alignpipe deploy --prefect-yaml prefect.yaml`; never edit it by hand, and
regenerate it after changing a pipeline's description or schedule, or adding a pipeline
(tests/flows/test_deploy_source.py fails until then). What it cannot carry: `prefect deploy` builds the
parameter form from the flow's signature and ignores a `parameter_openapi_schema` key, so there `pipeline`
is a text box (a wrong name fails the run with the config error), not the drop-down.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import prefect
import yaml
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.schedules import Cron, Interval, Schedule

from alignpipe.config import load_pipeline, pipeline_names
from alignpipe.config.schedule import ScheduleConfig
from alignpipe.flows.pipeline import alignpipe_pipeline

TAGS = ["alignpipe"]
# prefect.yaml's flow, as `prefect deploy` loads it: a file of the checkout, relative to prefect.yaml's folder
ENTRYPOINT = "flows/pipeline.py:alignpipe_pipeline"


def schedule_for(s: ScheduleConfig) -> Schedule:
    """The Prefect schedule for a pipeline's `schedule:` section."""
    if s.cron is not None:
        return Cron(s.cron, timezone=s.timezone, active=s.active)
    return Interval(timedelta(seconds=s.interval_seconds), timezone=s.timezone, active=s.active)


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


PREFECT_YAML_HEADER = """\
# Generated from {config}; do not edit. Change {config}, then run in this folder:
#   alignpipe deploy --config {config} --prefect-yaml {out}
# (tests/flows/test_deploy_source.py fails while the two disagree).
#
# The same deployments as `alignpipe deploy` (names, descriptions, tags, parameters, schedules), for users
# who deploy the Prefect way, with a work pool and a worker:
#
#   export PREFECT_API_URL=http://127.0.0.1:4200/api            # e.g. from `alignpipe env`
#   prefect work-pool create alignpipe --type process            # once
#   prefect deploy --all                                         # from this folder
#   prefect worker start --pool alignpipe                        # runs the flow runs, in this checkout
#
# The worker runs each flow run as a subprocess in the folder recorded below at deploy time; that
# process needs this project installed (`make setup`) and the usual variables (MLFLOW_TRACKING_URI,
# RAY_ADDRESS, RAY_AUTH_MODE) in the worker's environment.
#
# One difference: `prefect deploy` builds the run form from the flow's signature (it ignores a
# parameter_openapi_schema key here), so `pipeline` is a text box, not the drop-down `alignpipe deploy`
# gives ({choices}); a wrong name fails the run with the config error.
"""


def prefect_yaml(deployments: list[RunnerDeployment], config_file: str | Path, out: str | Path) -> str:
    """prefect.yaml's text for these deployments (from `build_deployments(config_file)`), to be written at `out`.

    Paths in it are relative to `out`'s folder, the working directory its pull step records at deploy time.
    """
    root = Path(out).resolve().parent
    config = Path(config_file).resolve()
    rel_config = os.path.relpath(config, root)
    choices = deployments[0]._parameter_openapi_schema.properties["pipeline"].get("enum", []) if deployments else []
    head = PREFECT_YAML_HEADER.format(out=Path(out).name, config=rel_config,
                                      choices=", ".join(choices))
    fixed = {"name": "alignpipe", "prefect-version": prefect.__version__, "build": None, "push": None,
             "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $PWD }}"}}]}
    entries = [{
        "name": d.name,
        "description": d.description,
        "entrypoint": ENTRYPOINT,
        "tags": list(d.tags),
        "parameters": {**d.parameters, "config_file": rel_config},
        "enforce_parameter_schema": True,
        "work_pool": {"name": "alignpipe", "work_queue_name": "default"},
        "schedules": [_schedule_entry(s.schedule, s.active) for s in d.schedules],
    } for d in deployments]
    items = ["\n".join(("  - " if i == 0 else "    ") + line for i, line in enumerate(_dump(e).splitlines())) + "\n"
             for e in entries]  # a blank line between deployments, as a person would write them
    return head + "\n" + _dump(fixed) + "\ndeployments:\n" + "\n".join(items)


def _dump(obj) -> str:
    return yaml.safe_dump(obj, sort_keys=False, width=120, default_flow_style=None)


def _schedule_entry(schedule, active: bool) -> dict:
    """A schedule as prefect.yaml writes it (`prefect deploy` reads cron/interval, timezone, active)."""
    if getattr(schedule, "cron", None):
        return {"cron": schedule.cron, "timezone": schedule.timezone, "active": active}
    return {"interval": int(schedule.interval.total_seconds()), "timezone": schedule.timezone, "active": active}


def apply_deployments(deployments: list[RunnerDeployment]) -> dict[str, str]:
    """Create or update each deployment on the Prefect server (PREFECT_API_URL); returns name -> id."""
    return {d.name: str(d.apply()) for d in deployments}


def serve_deployments(deployments: list[RunnerDeployment]) -> None:
    """Register the deployments and run their flow runs (scheduled or launched from the UI) until stopped."""
    from prefect import serve

    # Schedules stay as pipelines.yaml says when this process stops; runs wait for the next serve process.
    serve(*deployments, print_starting_message=True, pause_on_shutdown=False)
