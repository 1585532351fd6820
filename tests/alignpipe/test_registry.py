"""alignpipe.registry on a real SQLite registry: gates, promotion, rollback, locks, gc (synthetic versions)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from alignpipe import registry, tracking
from alignpipe.config import load_pipeline
from alignpipe.config.register import Gate
from alignpipe.errors import ConfigError
from testlib import PIPELINES, registry_version

NAME = "m"
GATES = [Gate.parse("exact_match >= champion + 0.005"), Gate.parse("json_validity >= 0.99"),
         Gate.parse("latency_p95_ms <= 1.2 * champion")]
BASE = {"exact_match": 0.1, "json_validity": 0.5, "latency_p95_ms": 100.0}


def _promote(client, uri, version, **kw):
    return registry.promote(client, uri, NAME, version, gates=GATES, primary_metric="exact_match",
                            actor="test", reason="test", **kw)


def _version(client, tmp_path, em, jv=1.0, lat=100.0):
    metrics = {"exact_match": em, "json_validity": jv, "latency_p95_ms": lat}
    return registry_version(client, NAME, metrics, BASE, tmp_path / f"v{em}-{jv}-{lat}")


def _alias(client, alias):
    mv = registry.alias_version(client, NAME, alias)
    return None if mv is None else str(mv.version)


@pytest.fixture
def client(mlflow_uri):
    return tracking.client_for(mlflow_uri)


def test_gate_text_parses_and_prints_back():
    g = Gate.parse("latency_p95_ms <= 1.2 * champion")
    assert (g.metric, g.op, g.ref, g.factor, g.delta) == ("latency_p95_ms", "<=", "champion", 1.2, 0.0)
    g = Gate.parse("exact_match>=champion+0.005")
    assert (g.ref, g.factor, g.delta, str(g)) == ("champion", 1.0, 0.005, "exact_match >= champion + 0.005")
    assert Gate.parse("perplexity < base - 0.5").delta == -0.5
    assert (Gate.parse("json_validity >= 0.99").ref, Gate.parse("json_validity >= 0.99").delta) == (None, 0.99)


def test_bad_gate_is_a_config_error_naming_the_key_and_the_form():
    with pytest.raises(ConfigError) as exc:
        load_pipeline(PIPELINES, "smoke", {"register.gates": ["json_validity >= 0.99", "exact_match >> champion"]})
    msg = str(exc.value)
    assert "pipelines.smoke.register.gates" in msg and "item 1" in msg and "'exact_match >> champion'" in msg
    assert "exact_match >= champion + 0.005" in msg  # the example of the right form


def test_shipped_gates_round_trip_through_the_config():
    cfg = load_pipeline(PIPELINES, "demo")
    assert [str(g) for g in cfg.register_.gates] == ["exact_match >= champion + 0.005", "json_validity >= 0.99"]
    dumped = cfg.model_dump(mode="json", by_alias=True)
    assert dumped["register"]["gates"] == ["exact_match >= champion + 0.005", "json_validity >= 0.99"]
    assert load_pipeline(PIPELINES, "demo", {"register.gates": dumped["register"]["gates"]}).register_.gates == \
        cfg.register_.gates


def test_check_gates_gives_numbers_and_reasons():
    results = registry.check_gates(GATES, "exact_match", {"exact_match": 0.6, "json_validity": 0.98},
                                   BASE, {"exact_match": 0.6, "latency_p95_ms": 50.0}, "champion v1")
    by_gate = {r.gate: r for r in results}
    assert by_gate["exact_match > base"].passed
    assert not by_gate["exact_match >= champion + 0.005"].passed
    assert "0.6 >= 0.605 (champion v1 0.6 + 0.005)" in by_gate["exact_match >= champion + 0.005"].detail
    assert not by_gate["json_validity >= 0.99"].passed and "0.98 >= 0.99" in by_gate["json_validity >= 0.99"].detail
    assert "no metric 'latency_p95_ms'" in by_gate["latency_p95_ms <= 1.2 * champion"].detail

    # No champion yet: champion-relative gates are read against base; lower-is-better primary metrics flip.
    [primary, *_] = registry.check_gates([Gate.parse("exact_match >= champion + 0.005")], "perplexity",
                                         {"exact_match": 0.2, "perplexity": 9.0}, {"exact_match": 0.1,
                                                                                   "perplexity": 10.0}, None)
    assert primary.gate == "perplexity < base" and primary.passed
    [_, em] = registry.check_gates([Gate.parse("exact_match >= champion + 0.005")], "perplexity",
                                   {"exact_match": 0.2, "perplexity": 9.0}, {"exact_match": 0.1}, None)
    assert em.passed and "base (no champion yet)" in em.detail


def test_worse_never_champion_better_is_and_rollback_restores(client, mlflow_uri, tmp_path):
    v1 = _version(client, tmp_path, 0.5)
    first = _promote(client, mlflow_uri, v1)
    assert first.promoted and first.against == "base (no champion yet)"
    assert _alias(client, "champion") == v1

    worse = _version(client, tmp_path, 0.4)
    decision = _promote(client, mlflow_uri, worse)
    assert not decision.promoted
    tags = client.get_model_version(NAME, worse).tags
    assert tags["promotion.decision"] == "rejected" and tags["promotion.against"] == f"champion v{v1}"
    assert "exact_match >= champion + 0.005: exact_match 0.4 >= 0.505" in tags["gates.failed"]
    assert _alias(client, "champion") == v1

    better = _version(client, tmp_path, 0.7)
    assert _promote(client, mlflow_uri, better).promoted
    assert _alias(client, "champion") == better
    assert _alias(client, "previous") == v1
    history = json.loads(client.get_model_version(NAME, better).tags["alias_history"])
    assert history[-1]["alias"] == "champion" and history[-1]["by"] == "test" and history[-1]["at"]

    assert registry.rollback(client, mlflow_uri, NAME, "test") == (v1, better)
    assert _alias(client, "champion") == v1
    assert _alias(client, "previous") is None
    assert client.get_model_version(NAME, better).tags["promotion.decision"] == "rolled_back"
    with pytest.raises(registry.RegistryError, match="no @previous"):
        registry.rollback(client, mlflow_uri, NAME, "test")


def test_gates_read_the_metrics_of_the_versions_logged_model(client, mlflow_uri, tmp_path):
    v = _version(client, tmp_path, 0.5, lat=90.0)
    mv = client.get_model_version(NAME, v)
    assert not [k for k in mv.tags if k.startswith((registry.METRIC_TAG, registry.BASE_TAG))]
    numbers = {m.key: m.value for m in client.get_logged_model(registry.logged_model_id(mv)).metrics}
    assert numbers == {"exact_match": 0.5, "json_validity": 1.0, "latency_p95_ms": 90.0, "base.exact_match": 0.1,
                       "base.json_validity": 0.5, "base.latency_p95_ms": 100.0}
    assert registry.version_metrics(client, mv) == ({"exact_match": 0.5, "json_validity": 1.0,
                                                     "latency_p95_ms": 90.0}, BASE)
    decision = _promote(client, mlflow_uri, v)
    assert decision.promoted and "exact_match 0.5 > 0.1 (base 0.1)" in [r.detail for r in decision.results]


def test_versions_registered_with_metric_tags_still_promote_and_gate(client, mlflow_uri, tmp_path):
    metrics = {"exact_match": 0.5, "json_validity": 1.0, "latency_p95_ms": 100.0}
    old = registry_version(client, NAME, metrics, BASE, tmp_path / "old", legacy=True)
    mv = client.get_model_version(NAME, old)
    assert registry.logged_model_id(mv) is None and registry.version_metrics(client, mv) == (metrics, BASE)
    assert _promote(client, mlflow_uri, old).promoted and _alias(client, "champion") == old

    # a new version is compared with the old champion's tag metrics
    worse = _promote(client, mlflow_uri, _version(client, tmp_path, 0.502))
    assert not worse.promoted and f"exact_match 0.502 >= 0.505 (champion v{old} 0.5 + 0.005)" in worse.failed
    better = _version(client, tmp_path, 0.6)
    assert _promote(client, mlflow_uri, better).promoted and _alias(client, "previous") == old


def test_the_gates_base_is_the_better_of_the_plain_and_the_prompted_base():
    plain, told = {"exact_match": 0.0, "rows": 400}, {"exact_match": 0.41, "rows": 400}
    assert registry.better_base({"base": plain, "prompted_base": told, "sft": {"exact_match": 0.9}},
                                "exact_match") == ("prompted_base", told)
    assert registry.better_base({"base": {**plain, "exact_match": 0.5}, "prompted_base": told},
                                "exact_match")[0] == "base"
    # a base kept on its screen (fewer rows) is never the comparison: the full evaluation decides
    assert registry.better_base({"base": {"exact_match": 0.5, "rows": 64}, "prompted_base": told},
                                "exact_match")[0] == "prompted_base"
    assert registry.better_base({"base": {"perplexity": 9.0, "rows": 400}, "prompted_base": {"perplexity": 4.0,
                                                                                          "rows": 400}},
                                "perplexity")[0] == "prompted_base"  # lower is better
    assert registry.better_base({"base": plain}, "exact_match") == ("base", plain)
    assert registry.better_base({"sft": {"exact_match": 0.9}}, "exact_match") == (None, {})


def test_first_version_must_beat_base(client, mlflow_uri, tmp_path):
    v = _version(client, tmp_path, 0.1)  # equal to base: the primary metric must be strictly better
    decision = _promote(client, mlflow_uri, v)
    assert not decision.promoted and "exact_match > base" in decision.failed
    assert _alias(client, "champion") is None


def test_force_needs_a_reason_and_is_recorded(client, mlflow_uri, tmp_path):
    v = _version(client, tmp_path, 0.05)
    with pytest.raises(registry.RegistryError, match="--reason"):
        registry.promote(client, mlflow_uri, NAME, v, gates=GATES, primary_metric="exact_match", actor="ops",
                         reason=" ", force=True)
    decision = registry.promote(client, mlflow_uri, NAME, v, gates=GATES, primary_metric="exact_match",
                                actor="ops", reason="hotfix", force=True)
    assert decision.promoted and decision.forced
    tags = client.get_model_version(NAME, v).tags
    assert tags["promotion.decision"] == "forced" and "ops: hotfix" in tags["promotion.manual_override"]


def test_concurrent_promotions_lose_no_update(client, mlflow_uri, tmp_path):
    v1 = _version(client, tmp_path, 0.5)
    assert _promote(client, mlflow_uri, v1).promoted
    # v3 beats v2 by more than the margin, so whatever the order, v3 must end as champion: if v2 went first,
    # v3 is compared with v2 and passes; if v3 went first, v2 is compared with v3 and fails.
    v2, v3 = _version(client, tmp_path, 0.6), _version(client, tmp_path, 0.7)
    barrier, decisions = threading.Barrier(2), {}

    def go(version):
        barrier.wait()
        decisions[version] = _promote(client, mlflow_uri, version)

    threads = [threading.Thread(target=go, args=(v,)) for v in (v2, v3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert _alias(client, "champion") == v3
    assert decisions[v3].promoted
    t2 = client.get_model_version(NAME, v2).tags
    if decisions[v2].promoted:  # went first: promoted against v1, then replaced by v3
        assert t2["promotion.against"] == f"champion v{v1}"
        assert decisions[v3].against == f"champion v{v2}" and decisions[v3].previous == v2
        assert _alias(client, "previous") == v2
        assert t2["promotion.decision"] == "demoted"
    else:  # went second: compared with v3, the champion it actually faced
        assert t2["promotion.decision"] == "rejected" and t2["promotion.against"] == f"champion v{v3}"
        assert _alias(client, "previous") == v1


def test_server_without_a_lock_service_is_serialised_on_this_machine_and_says_so(client, tmp_path, monkeypatch,
                                                                                  capfd):
    """No register.lock_url and no Prefect server: a file lock under ~/.cache serialises this machine, with a warning
    (the PostgreSQL and Prefect locks are tested against the stack in test_registry_server.py)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("HOME", str(tmp_path))
    registry.ensure_model(client, NAME)
    inside, overlaps = [], []

    def hold():
        # A server URI takes the server path; the client still talks to the SQLite store. No Prefect server for this
        # thread (settings are per context, and a session fixture may have set one for the process).
        with temporary_settings({PREFECT_API_URL: None}), \
                registry.registry_lock(client, "http://registry.example", NAME, timeout_s=60):
            inside.append(1)
            overlaps.append(len(inside))
            time.sleep(0.3)
            inside.pop()

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    threads = [threading.Thread(target=hold) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == [1, 1, 1]
    assert list((tmp_path / ".cache" / "alignpipe" / "locks").glob(f"*.{NAME}.lock"))
    assert "serialised on this machine only" in capfd.readouterr().err


def test_gc_deletes_only_old_unaliased_versions(client, mlflow_uri, tmp_path):
    vs = [_version(client, tmp_path, 0.5 + i / 100) for i in range(5)]
    client.set_registered_model_alias(NAME, "champion", vs[0])
    client.set_registered_model_alias(NAME, "previous", vs[1])
    deleted, freed = registry.gc(client, mlflow_uri, NAME, keep=2, actor="test")
    assert deleted == [vs[2]] and freed == 4096
    assert "artifacts_deleted" in client.get_model_version(NAME, vs[2]).tags
    assert registry.gc(client, mlflow_uri, NAME, keep=0, actor="test") == ([vs[4], vs[3]], 8192)
    for v in vs[:2]:
        assert "artifacts_deleted" not in client.get_model_version(NAME, v).tags
    with pytest.raises(registry.RegistryError, match="artifacts were deleted"):
        _promote(client, mlflow_uri, vs[3])


def test_metric_directions_read_by_the_model_card_and_the_gates():
    assert all(registry.higher_is_better(m) for m in ("exact_match", "json_validity", "tokens_per_s"))
    assert not any(registry.higher_is_better(m) for m in ("perplexity", "latency_p95_ms", "peak_rss_mb", "size_mb",
                                                           "eval_seconds"))
