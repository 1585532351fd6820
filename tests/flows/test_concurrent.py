"""Many pipelines on one shared stack (PostgreSQL behind the Prefect and MLflow servers, S3 storage, the Ray cluster).

Five `alignpipe run smoke` processes start at once with one workdir: three with the same config (A) and two with
other SFT seeds (B, C). Each stage key must be run by one flow run only, the others waiting on its Prefect global
concurrency limit and then reusing its cached result; every run must finish, without "database is locked" or a
deadlock, and the registry must hold one version per distinct set of weights.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from alignpipe import registry, tracking
from testlib import PIPELINES, REPO

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("stack")]

NAME, EXPERIMENT = "race-model", "race"
SEEDS = {"a1": 11, "a2": 11, "a3": 11, "b": 22, "c": 33}


def _run(tmp_path, tiny_model, env: dict[str, str], label: str, seed: int) -> subprocess.Popen:
    sets = {"workdir": str(tmp_path / "work"), "model.name": tiny_model, "sft.seed": seed, "sft.max_steps": 2,
            "align.method": "none", "quantize.method": "none", "data.eval.limit": 4,
            "compute.cpus_per_worker": 1, "evaluate.cpus": 1,  # the stack's nodes have 1 CPU each
            "tracking.experiment": EXPERIMENT, "tracking.registered_model": NAME,
            # perplexity always separates a tuned tiny model from its random base: every version can be promoted
            "register.primary_metric": "perplexity", "register.gates": "[]",
            "evaluate.prompted_base.enabled": "false"}  # no perplexity of its own: the plain base is the reference
    args = [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]
    log = open(tmp_path / f"{label}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "alignpipe.cli.main", "run", "smoke", "--config", str(PIPELINES),
                             *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **env, "COLUMNS": "200"})


def test_concurrent_runs_train_each_stage_key_once_and_register_without_duplicates(local_stack, tiny_model, tmp_path):
    procs = {label: _run(tmp_path, tiny_model, local_stack.env, label, seed) for label, seed in SEEDS.items()}
    codes = {label: proc.wait(timeout=1200) for label, proc in procs.items()}
    logs = {label: (tmp_path / f"{label}.log").read_text() for label in procs}
    for label, code in codes.items():
        assert code == 0, f"run {label} exited {code}:\n{logs[label][-4000:]}"
        for bad in ("database is locked", "deadlock detected"):
            assert bad not in logs[label].lower(), logs[label][-4000:]
    # The runs overlapped: at least one waited on a key another was running (else the test proves nothing).
    assert any("waiting to reuse its result" in log for log in logs.values())

    client = tracking.client_for(local_stack.env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
    sft_runs = client.search_runs([exp], f"tags.`{tracking.TAG_STAGE}` = 'sft'")
    keys = [r.data.tags[tracking.TAG_CONTENT_KEY] for r in sft_runs]
    assert len(keys) == 3 and len(set(keys)) == 3, keys  # A trained once (not three times), B and C once each
    validate_runs = client.search_runs([exp], f"tags.`{tracking.TAG_STAGE}` = 'validate'")
    assert len(validate_runs) == 1  # the data is the same for all five: validated once
    parents = [r for r in client.search_runs([exp]) if "alignpipe.cached_stages" in r.data.tags]
    assert len(parents) == 5
    cached = [r.data.tags["alignpipe.cached_stages"] for r in parents]
    assert sum("sft" in c.split(",") for c in cached) == 2, cached  # the two other A runs reused A's adapter

    versions = registry.versions(client, NAME)
    assert len(versions) == 3 and len({mv.tags["weights_digest"] for mv in versions}) == 3
    a_versions = {line.split("version ")[1].split()[0] for label in ("a1", "a2", "a3")
                  for line in logs[label].splitlines() if line.startswith("registered race-model version")}
    assert len(a_versions) == 1  # the three A runs point at one version
    champion = client.get_registered_model(NAME).aliases[registry.CHAMPION]
    assert champion in {mv.version for mv in versions}
