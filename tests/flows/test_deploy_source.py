"""One deployment source: the checked-in prefect.yaml is what `alignpipe deploy --prefect-yaml` generates from
pipelines.yaml now, and says what `build_deployments` deploys (fast: no server)."""

import inspect
import shutil

import pytest
import yaml
from prefect.utilities.callables import parameter_schema

from alignpipe.config import pipeline_names
from alignpipe.flows.deploy import ENTRYPOINT, build_deployments, prefect_yaml
from alignpipe.flows.pipeline import alignpipe_pipeline
from testlib import PIPELINES, REPO

PREFECT_YAML = REPO / "prefect.yaml"


@pytest.fixture(scope="module")
def deployments():
    return build_deployments(PIPELINES)


def test_the_checked_in_prefect_yaml_is_generated_from_pipelines_yaml(deployments):
    assert PREFECT_YAML.read_text() == prefect_yaml(deployments, PIPELINES, PREFECT_YAML), (
        "prefect.yaml is stale: run `alignpipe deploy --prefect-yaml prefect.yaml` at the repository root")


def test_a_changed_pipelines_yaml_needs_a_regenerated_prefect_yaml(tmp_path):
    copy = tmp_path / "pipelines.yaml"
    shutil.copy(PIPELINES, copy)
    copy.write_text(copy.read_text().replace('cron: "0 3 * * 1"', 'cron: "0 4 * * 1"', 1))
    assert prefect_yaml(build_deployments(copy), copy, tmp_path / "prefect.yaml") != PREFECT_YAML.read_text()


def test_prefect_yaml_declares_what_alignpipe_deploy_deploys(deployments):
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    assert spec["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $PWD }}"}}]
    by_name = {d["name"]: d for d in spec["deployments"]}
    assert list(by_name) == [d.name for d in deployments] == pipeline_names(PIPELINES)
    path, func = ENTRYPOINT.split(":")
    assert (REPO / path).is_file() and func == alignpipe_pipeline.fn.__name__
    for d in deployments:
        entry = by_name[d.name]
        assert entry["entrypoint"] == ENTRYPOINT and entry["work_pool"]["name"] == "alignpipe"
        assert entry["description"] == d.description and entry["tags"] == d.tags
        # the same parameters; config_file relative to prefect.yaml's folder (the worker's working directory)
        assert {**entry["parameters"], "config_file": str((REPO / entry["parameters"]["config_file"]).resolve())} \
            == d.parameters
        assert entry["enforce_parameter_schema"] is True
        want = []
        for s in d.schedules:
            if hasattr(s.schedule, "cron"):
                want.append({"cron": s.schedule.cron, "timezone": s.schedule.timezone, "active": s.active})
            else:
                want.append({"interval": s.schedule.interval.total_seconds(), "timezone": s.schedule.timezone,
                             "active": s.active})
        assert entry["schedules"] == want


def test_the_shipped_demo_schedule_is_weekly_and_paused(deployments):
    (demo,) = [d for d in deployments if d.name == "demo"]
    (s,) = demo.schedules
    assert (s.schedule.cron, s.schedule.timezone, s.active) == ("0 3 * * 1", "UTC", False)


def test_the_parameter_form_differs_only_by_the_drop_down(deployments):
    """`prefect deploy` builds the form from the flow's signature; `alignpipe deploy` adds the pipeline enum.
    The header of prefect.yaml says so and lists the choices."""
    plain = parameter_schema(alignpipe_pipeline).model_dump()
    names = pipeline_names(PIPELINES)
    for d in deployments:
        form = d._parameter_openapi_schema.model_dump()
        assert form["properties"]["pipeline"].pop("enum") == names
        assert form == plain
    assert f"gives ({', '.join(names)})" in PREFECT_YAML.read_text()


def test_prefect_deploy_still_ignores_a_schema_in_prefect_yaml():
    """If this fails, Prefect's `prefect deploy` may now honour `parameter_openapi_schema` from prefect.yaml:
    write the drop-down's schema there (flows/deploy.py `prefect_yaml`) and drop the header's caveat."""
    from prefect.cli.deploy import _core

    assert 'deploy_config["parameter_openapi_schema"] = parameter_schema(flow)' in inspect.getsource(_core)


def test_the_cli_writes_it_without_a_server(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from alignpipe.cli.main import app

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    out = tmp_path / "prefect.yaml"
    result = CliRunner().invoke(app, ["deploy", "--config", str(PIPELINES), "--prefect-yaml", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text() == prefect_yaml(build_deployments(PIPELINES), PIPELINES, out)
    assert "config_file: ../" in out.read_text()  # relative to where prefect.yaml is, not absolute
