"""Two pipelines at once, in two processes, on one SQLite MLflow store and one registered model name.

Both `alignpipe run smoke` processes share the tracking URI (a fresh SQLite file neither has created yet), the
Prefect API and the registered model, each with its own workdir and SFT seed (so distinct weights). Both must
finish, neither may hit "database is locked", each must add its own version, and the registry must end with
one consistent champion.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from alignpipe import registry, tracking
from testlib import PIPELINES, REPO

pytestmark = pytest.mark.slow

NAME = "smoke-model"


def _run(tmp_path, tiny_model, uri: str, seed: int, api_url: str) -> subprocess.Popen:
    sets = {"workdir": str(tmp_path / f"work{seed}"), "model.name": tiny_model, "tracking.mlflow_uri": uri,
            "sft.seed": seed, "align.method": "none", "quantize.method": "none",  # register is what's contended
            # perplexity always separates a tuned tiny model from its random base, so both can become champion
            "register.primary_metric": "perplexity", "register.gates": "[]"}
    args = [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]
    log = open(tmp_path / f"run{seed}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "alignpipe.cli.main", "run", "smoke", "--config", str(PIPELINES), *args],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PREFECT_API_URL": api_url, "COLUMNS": "200"})


def test_two_pipelines_share_one_sqlite_store_and_registry(prefect_harness, tiny_model, tmp_path):
    from prefect.settings import PREFECT_API_URL

    uri = f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}"
    procs = {seed: _run(tmp_path, tiny_model, uri, seed, PREFECT_API_URL.value()) for seed in (11, 22)}
    codes = {seed: proc.wait(timeout=1800) for seed, proc in procs.items()}
    logs = {seed: (tmp_path / f"run{seed}.log").read_text() for seed in procs}

    for seed, code in codes.items():
        assert code == 0, f"run with seed {seed} exited {code}:\n{logs[seed][-4000:]}"
        assert "database is locked" not in logs[seed].lower(), logs[seed][-4000:]
        assert "registered smoke-model version" in logs[seed]

    client = tracking.client_for(uri)
    versions = registry.versions(client, NAME)
    assert len(versions) == 2 and len({mv.tags["weights_digest"] for mv in versions}) == 2
    assert len({mv.tags["flow_run_id"] for mv in versions}) == 2  # one from each pipeline
    aliases = client.get_registered_model(NAME).aliases
    champions = [mv for mv in versions if registry.CHAMPION in mv.aliases]
    assert len(champions) == 1 and aliases[registry.CHAMPION] == champions[0].version
    # Promotions were serialised: the other version was either promoted first and then replaced, or rejected
    # against the champion it actually faced.
    [other] = [mv for mv in versions if mv.version != champions[0].version]
    decision = other.tags["promotion.decision"]
    assert decision in ("demoted", "rejected"), decision
    if decision == "demoted":
        assert aliases.get(registry.PREVIOUS) == other.version
