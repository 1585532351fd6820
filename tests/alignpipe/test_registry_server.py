"""Promotions on an MLflow server backed by PostgreSQL (the `alignpipe up` stack): serialised by a PostgreSQL advisory
lock with a renewed lease (`register.lock_url`), so concurrent `alignpipe promote` calls lose no alias move, and a
holder that dies or hangs frees the registry within its lease."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from alignpipe import locks, registry, tracking
from testlib import PIPELINES, READY_SET_GO, REPO, registry_version

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("stack")]

BASE = {"exact_match": 0.1, "json_validity": 0.5}
LEASE_S = 4.0


def _setup(local_stack, name: str, tmp_path) -> tuple:
    client = tracking.client_for(local_stack.env["MLFLOW_TRACKING_URI"])
    v1 = registry_version(client, name, {"exact_match": 0.5, "json_validity": 1.0}, BASE, tmp_path / "v1")
    v2 = registry_version(client, name, {"exact_match": 0.7, "json_validity": 1.0}, BASE, tmp_path / "v2")
    return client, v1, v2

def test_concurrent_promotions_lose_no_alias_move(local_stack, tmp_path):
    name = "promote-race"
    client, v1, v2 = _setup(local_stack, name, tmp_path)
    env = {**os.environ, **local_stack.env, "COLUMNS": "200"}
    assert env[registry.LOCK_URL_ENV].startswith("postgresql://")
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", READY_SET_GO, str(go), "promote", name, v, "--reason", f"call {i}",
                               "--config", str(PIPELINES)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for i, v in enumerate([v1, v2] * 4)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    go.touch()
    outs = [p.communicate(timeout=300)[0] for p in procs]
    codes = [p.returncode for p in procs]
    assert set(codes) <= {0, 1}, outs  # promoted, or rejected by a gate: never a crash or a lock timeout
    promoted = codes.count(0)
    assert promoted >= 1

    aliases = client.get_registered_model(name).aliases
    assert aliases[registry.CHAMPION] == v2  # v1 never beats v2: whatever the order, v2 ends as champion
    events = [e for v in (v1, v2) for e in json.loads(client.get_model_version(name, v).tags.get("alias_history", "[]"))
              if e["alias"] == registry.CHAMPION]
    sets = [e for e in events if e["action"] == "set"]
    assert len(sets) == promoted, (sets, outs)  # one recorded move per promotion that succeeded: none lost
    moved = [e for e in events if e["action"] == "moved away"]
    assert all(e["to"] in (v1, v2) for e in moved)
    decisions = [client.get_model_version(name, v).tags["promotion.decision"] for v in (v1, v2)]
    assert decisions[1] == "promoted" and decisions[0] in ("rejected", "demoted", "promoted")


def _holder(local_stack, name: str) -> subprocess.Popen:
    """A process inside the registry lock, as a promotion is between reading the champion and moving the alias."""
    code = (f"from alignpipe import registry, tracking; import time\n"
            f"uri = {local_stack.env['MLFLOW_TRACKING_URI']!r}\n"
            f"with registry.registry_lock(tracking.client_for(uri), uri, {name!r}, lock_url="
            f"{local_stack.env[registry.LOCK_URL_ENV]!r}, lease_s={LEASE_S}):\n"
            f"    print('held', flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _acquire_seconds(local_stack, name: str, timeout_s: float) -> float:
    uri = local_stack.env["MLFLOW_TRACKING_URI"]
    t0 = time.monotonic()
    with registry.registry_lock(tracking.client_for(uri), uri, name, timeout_s=timeout_s,
                                lock_url=local_stack.env[registry.LOCK_URL_ENV], lease_s=LEASE_S):
        return time.monotonic() - t0


def test_a_dead_or_hung_holder_frees_the_registry_within_its_lease(local_stack):
    name = "lock-holder"
    holder = _holder(local_stack, name)
    try:
        time.sleep(LEASE_S + 1)  # a live holder renews: past its lease, the registry is still held
        with pytest.raises(registry.RegistryError, match="stayed locked"):
            _acquire_seconds(local_stack, name, timeout_s=1)
        os.kill(holder.pid, signal.SIGKILL)  # killed mid-promotion: its connection ends, and the lock with it
        assert _acquire_seconds(local_stack, name, timeout_s=LEASE_S) < LEASE_S
    finally:
        holder.kill()
        holder.wait()

    hung = _holder(local_stack, name)
    try:
        os.kill(hung.pid, signal.SIGSTOP)  # hung (or cut off): no renewal reaches the server any more
        waited = _acquire_seconds(local_stack, name, timeout_s=3 * LEASE_S)
        assert waited <= LEASE_S + 2, waited
    finally:
        hung.kill()
        hung.wait()


def test_advisory_keys_are_stable_64_bit_and_distinct():
    keys = {locks.advisory_key(f"alignpipe registry http://h {n}") for n in ("a", "b", "c")}
    assert len(keys) == 3 and all(-2**63 <= k < 2**63 for k in keys)
    assert locks.advisory_key("x") == locks.advisory_key("x")
