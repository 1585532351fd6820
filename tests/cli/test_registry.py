"""`alignpipe models | promote | rollback | gc` against a real SQLite registry (synthetic versions, no training)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from alignpipe import registry, tracking
from alignpipe.cli.main import app
from alignpipe.cli import registry as cli_registry
from alignpipe.cli.registry import resolve_uri
from testlib import PIPELINES, registry_version

NAME = "cli-model"
BASE = {"exact_match": 0.1, "json_validity": 0.5}


@pytest.fixture
def store(mlflow_uri, tmp_path):
    """A registry with v1 (good), v2 (worse: fails the shipped gates) and v3 (better)."""
    client = tracking.client_for(mlflow_uri)
    for i, (em, jv) in enumerate([(0.5, 1.0), (0.4, 0.9), (0.7, 1.0)]):
        registry_version(client, NAME, {"exact_match": em, "json_validity": jv}, BASE, tmp_path / f"v{i}")
    return client


def cli(mlflow_uri, *args):
    cli_registry.console.width = 250  # wide tables: assertions read whole cells
    result = CliRunner().invoke(app, [*args, "--tracking-uri", mlflow_uri, "--config", str(PIPELINES)])
    return result.exit_code, result.output


def _alias(client, alias):
    mv = registry.alias_version(client, NAME, alias)
    return None if mv is None else str(mv.version)


def test_promote_checks_gates_force_needs_reason_and_rollback_restores(store, mlflow_uri):
    code, out = cli(mlflow_uri, "promote", NAME, "1", "--reason", "first release")
    assert code == 0 and "promoted to @champion" in out and _alias(store, "champion") == "1"

    code, out = cli(mlflow_uri, "promote", NAME, "2", "--reason", "try")
    assert code == 1 and "FAIL" in out and "0.4 >= 0.505" in out and _alias(store, "champion") == "1"
    assert store.get_model_version(NAME, "2").tags["promotion.decision"] == "rejected"

    code, out = cli(mlflow_uri, "promote", NAME, "2", "--force", "--reason", "")
    assert code == 1 and "--force overrides the promotion gates only with a reason" in out
    assert "Traceback" not in out

    code, out = cli(mlflow_uri, "promote", NAME, "3", "--reason", "better")
    assert code == 0 and (_alias(store, "champion"), _alias(store, "previous")) == ("3", "1")

    code, out = cli(mlflow_uri, "models", NAME)
    assert code == 0
    for needle in ("@champion", "@previous", "0.7", "rejected", "all passed", "json_validity >= 0.99"):
        assert needle in out, needle

    code, out = cli(mlflow_uri, "rollback", NAME)
    assert code == 0 and "@champion is version 1 again (version 3 rolled back)" in out
    assert _alias(store, "champion") == "1"

    code, out = cli(mlflow_uri, "promote", NAME, "2", "--force", "--reason", "hotfix for customer X")
    assert code == 0 and _alias(store, "champion") == "2"
    tags = store.get_model_version(NAME, "2").tags
    assert tags["promotion.decision"] == "forced" and "hotfix for customer X" in tags["promotion.manual_override"]


def test_gc_keeps_aliased_and_newest_versions_and_says_what_it_freed(store, mlflow_uri):
    store.set_registered_model_alias(NAME, "champion", "1")
    code, out = cli(mlflow_uri, "gc", NAME, "--keep", "1")
    assert code == 0 and "deleted the artifacts of versions 2; freed 4.0 KiB" in out
    code, out = cli(mlflow_uri, "models", NAME)
    assert "artifacts deleted" in out


def test_models_shows_logged_model_metrics_and_those_of_versions_registered_with_tags(store, mlflow_uri, tmp_path):
    registry_version(store, NAME, {"exact_match": 0.625, "json_validity": 0.875}, BASE, tmp_path / "old", legacy=True)
    code, out = cli(mlflow_uri, "models", NAME)
    rows = {line.split()[1]: line for line in out.splitlines() if line.split()[1:2] in (["3"], ["4"])}
    assert code == 0 and "0.7" in rows["3"] and "0.625" in rows["4"] and "0.875" in rows["4"]


def test_models_lists_registered_models_and_unknown_names_fail_cleanly(store, mlflow_uri):
    code, out = cli(mlflow_uri, "models")
    assert code == 0 and NAME in out
    code, out = cli(mlflow_uri, "models", "nope")
    assert code == 1 and "no registered model 'nope'" in out and "Traceback" not in out


def test_tracking_uri_comes_from_flag_then_env_then_pipelines_file(tmp_path, monkeypatch):
    config = tmp_path / "pipelines.yaml"
    config.write_text(PIPELINES.read_text().replace("workdir: .alignpipe", f"workdir: {tmp_path / 'wd'}"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_uri(None, config) == f"sqlite:///{tmp_path / 'wd' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_uri(None, config) == "http://env:5000"
    assert resolve_uri("http://flag:5000", config) == "http://flag:5000"
