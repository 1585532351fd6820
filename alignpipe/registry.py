"""Model registry logic shared by the `register` task and the CLI: gates, promotion, rollback, retention, locks.

Everything reads and writes the MLflow Model Registry through an explicit `MlflowClient`. A version's evaluation
metrics are metrics of its MLflow 3 logged model (`<name>` for the registered artifact, `base.<name>` for the base
model from the same evaluation), so the UI's Models tab lists and charts them and gates can be re-checked later
(`alignpipe promote`) without the run that produced them. Versions registered before that kept them in string tags
(`metrics.<name>`, `base_metrics.<name>`); `version_metrics` still reads those.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import unquote, urlparse

from alignpipe import locks
from alignpipe.config.register import Gate
from alignpipe.errors import AlignpipeError

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"
PROTECTED = (CHAMPION, CHALLENGER, PREVIOUS)
BASE_METRIC = "base."              # logged-model metric prefix of the base model's values
METRIC_TAG, BASE_TAG = "metrics.", "base_metrics."  # where versions registered before kept them (read only)
LOCK_URL_ENV = "ALIGNPIPE_REGISTRY_LOCK_URL"   # register.lock_url from the environment (`alignpipe env` exports it)
LEASE_S = 30.0                       # a hung lock holder's registry is free again after this long
HISTORY_KEEP = 50                    # alias events kept in a version's `alias_history` tag
KEY_METRICS = ("exact_match", "json_validity", "field_accuracy", "perplexity", "latency_p95_ms", "tokens_per_s")


class RegistryError(AlignpipeError):
    """A registry request the user can fix: unknown model or version, nothing to roll back to, bad --keep."""


def higher_is_better(metric: str) -> bool:
    """Rates and throughput go up; perplexity, latencies, memory and time go down."""
    return not (metric == "perplexity" or "latency" in metric or metric.endswith(("_ms", "_mb", "_bytes", "_seconds")))


BASE_LABELS = ("base", "prompted_base")  # evaluation labels of the untuned model: as is, and told the task


def better_base(metrics: dict[str, dict[str, float]], primary_metric: str) -> tuple[str | None, dict[str, float]]:
    """(label, figures) of the base model the gates and "beats base" compare with: of the plain and the prompted
    base, among those scored on the most held-out rows, the better on the primary metric ((None, {}) if neither)."""
    scored = [label for label in BASE_LABELS if primary_metric in metrics.get(label, {})]
    if not scored:
        return None, {}
    most = max(metrics[label].get("rows", 0) for label in scored)
    pick = (max if higher_is_better(primary_metric) else min)(
        (label for label in scored if metrics[label].get("rows", 0) == most), key=lambda l: metrics[l][primary_metric])
    return pick, metrics[pick]


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- gates -----------------------------------------------------------------------------------------------------

@dataclass
class GateResult:
    gate: str
    passed: bool
    detail: str                       # the numbers, e.g. "0.61 >= 0.605 (champion v1 0.6 + 0.005)"


def check_gates(gates: list[Gate], primary_metric: str, candidate: dict[str, float], base: dict[str, float],
                champion: dict[str, float] | None, champion_name: str = "champion") -> list[GateResult]:
    """Evaluate every gate plus "primary metric beats base" on the candidate's metrics.

    Args:
        gates: Parsed gates from `register.gates`.
        primary_metric: Must be strictly better than the base model's value (direction from the metric's name).
        candidate: Metrics of the artifact being promoted.
        base: Metrics of the base model (from the same evaluation).
        champion: Metrics of the current champion, or None when there is none yet: gates that reference
            `champion` are then evaluated against `base` (the first version must beat the base model).
        champion_name: How to name the champion in the details, e.g. "champion v3".

    Returns:
        One result per gate, the primary-metric check first.
    """
    op = ">" if higher_is_better(primary_metric) else "<"
    results = [_check(Gate(metric=primary_metric, op=op, ref="base"), candidate, base, champion, champion_name)]
    return results + [_check(g, candidate, base, champion, champion_name) for g in gates]


def _check(gate: Gate, candidate, base, champion, champion_name) -> GateResult:
    text = str(gate)
    value = candidate.get(gate.metric)
    if value is None:
        return GateResult(text, False, f"the candidate has no metric {gate.metric!r} (it has: "
                                       f"{', '.join(sorted(candidate)) or 'none'})")
    if gate.ref is None:
        threshold, how = gate.delta, f"{gate.delta:g}"
    else:
        ref_name, ref = (champion_name, champion) if gate.ref == CHAMPION and champion is not None else ("base", base)
        if gate.ref == CHAMPION and champion is None:
            ref_name = "base (no champion yet)"
        ref_value = ref.get(gate.metric)
        if ref_value is None:
            return GateResult(text, False, f"{ref_name} has no metric {gate.metric!r} to compare with")
        threshold = gate.factor * ref_value + gate.delta
        how = f"{ref_name} {ref_value:.4g}" + (f" x {gate.factor:g}" if gate.factor != 1 else "") + \
              (f" {'+' if gate.delta > 0 else '-'} {abs(gate.delta):g}" if gate.delta else "")
    passed = {">=": value >= threshold, ">": value > threshold, "<=": value <= threshold, "<": value < threshold}[gate.op]
    return GateResult(text, passed, f"{gate.metric} {value:.4g} {gate.op} {threshold:.4g} ({how})")


def failed_text(results: list[GateResult]) -> str:
    return "; ".join(f"{r.gate}: {r.detail}" for r in results if not r.passed)


# --- versions and their metrics --------------------------------------------------------------------------------

def log_version_metrics(client, run_id: str, model_id: str, candidate: dict[str, float],
                        base: dict[str, float]) -> None:
    """Attach an evaluation to a logged model: the candidate's metrics by name, the base model's as `base.<name>`.

    They are logged through `run_id` (the run that logged the model), which records them on the run too.
    """
    from mlflow.entities import Metric

    at = int(time.time() * 1000)
    batch = [Metric(k, float(v), at, 0, model_id=model_id) for k, v in sorted(candidate.items())]
    batch += [Metric(f"{BASE_METRIC}{k}", float(v), at, 0, model_id=model_id) for k, v in sorted(base.items())]
    if batch:
        client.log_batch(run_id, metrics=batch)


def version_metrics(client, mv) -> tuple[dict[str, float], dict[str, float]]:
    """(candidate, base) metrics of a version: its logged model's, else its tags (versions registered before)."""
    from mlflow.exceptions import MlflowException

    model_id = logged_model_id(mv)
    logged = []
    if model_id:
        try:
            logged = client.get_logged_model(model_id).metrics or []
        except MlflowException:  # the logged model was deleted: the tags are all there is
            pass
    if not logged:
        return tag_metrics(mv.tags), tag_metrics(mv.tags, BASE_TAG)
    latest = {}
    for m in sorted(logged, key=lambda m: (m.timestamp, m.step)):  # a key logged twice: the latest value wins
        latest[m.key] = float(m.value)
    candidate = {k: v for k, v in latest.items() if not k.startswith(BASE_METRIC)}
    base = {k.removeprefix(BASE_METRIC): v for k, v in latest.items() if k.startswith(BASE_METRIC)}
    return candidate, base


def tag_metrics(tags: dict[str, str], prefix: str = METRIC_TAG) -> dict[str, float]:
    """Metrics kept as string tags `<prefix><name>` (versions registered before logged-model metrics)."""
    out = {}
    for key, value in tags.items():
        if key.startswith(prefix):
            try:
                out[key[len(prefix):]] = float(value)
            except ValueError:
                pass
    return out


def get_version(client, name: str, version: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        raise RegistryError(f"registered model {name!r} has no version {version}; list them with "
                            f"`alignpipe models {name}`") from None


def alias_version(client, name: str, alias: str):
    """The version holding `alias`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def versions(client, name: str) -> list:
    """Every version of `name`, newest first (aliases filled in)."""
    found = client.search_model_versions(f"name = '{name}'")
    if not found and not _model_exists(client, name):
        known = ", ".join(m.name for m in client.search_registered_models()) or "none"
        raise RegistryError(f"no registered model {name!r} in this registry (registered models: {known}); check "
                            "the name or pass --tracking-uri")
    aliases = client.get_registered_model(name).aliases if found else {}
    by_version: dict[str, list[str]] = {}
    for alias, v in aliases.items():
        by_version.setdefault(str(v), []).append(alias)
    for mv in found:
        mv.aliases = sorted(by_version.get(str(mv.version), []))
    return sorted(found, key=lambda mv: int(mv.version), reverse=True)


def find_by_digest(client, name: str, digest: str):
    """A version of `name` tagged with this weights digest, or None (the oldest if several)."""
    found = client.search_model_versions(f"name = '{name}' and tags.weights_digest = '{digest}'")
    return min(found, key=lambda mv: int(mv.version)) if found else None


def ensure_model(client, name: str, description: str = "Fine-tuned by alignpipe.") -> None:
    from mlflow.exceptions import MlflowException

    if _model_exists(client, name):
        return
    try:
        client.create_registered_model(name, description=description)
    except MlflowException:
        if not _model_exists(client, name):  # else created concurrently (SQLite reports a bare IntegrityError)
            raise


def _model_exists(client, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return True
    except MlflowException:
        return False


# --- serialising alias moves -------------------------------------------------------------------------------------

def local_store(uri: str) -> Path | None:
    """The file behind a SQLite or file-store URI (the lock goes beside it), else None (a server)."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        return Path(unquote(uri.split("sqlite:///", 1)[-1])) if uri.startswith("sqlite:///") else None
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path)) / "registry"
    return None


@contextmanager
def registry_lock(client, uri: str, name: str, timeout_s: float = 600, lock_url: str | None = None,
                  lease_s: float = LEASE_S):
    """Hold the registry of `name` exclusively: version creation and alias moves happen one at a time.

    Local stores (sqlite, file) take an OS file lock next to the store, which every process on the machine honours.
    A server's registry is held through `lock_url`, a PostgreSQL database (`register.lock_url`, e.g. the one behind
    the MLflow server), as an advisory lock whose lease (`lease_s`) its holder renews; without one, through the
    Prefect server's global concurrency limits; with neither, a file lock that serialises this machine only.
    A holder that dies frees the lock at once (its connection or file closes); one that hangs, within its lease.
    """
    what = f"registry of {name!r}"
    try:
        if (store := local_store(uri)) is not None:
            with locks.file_lock(store.parent / f"{store.name}.{_safe(name)}.lock", timeout_s, what):
                yield
        elif lock_url:
            with locks.postgres_lock(lock_url, f"alignpipe registry {uri} {name}", lease_s, timeout_s, what):
                yield
        elif locks.prefect_server():
            with locks.prefect_lock(locks.limit_name("alignpipe-registry", _safe(name), locks.advisory_key(uri)
                                                     .to_bytes(8, "big", signed=True).hex()),
                                    lease_s, timeout_s, what):
                yield
        else:
            _warn_machine_only(uri)
            folder = Path.home() / ".cache" / "alignpipe" / "locks"
            with locks.file_lock(folder / f"{locks.advisory_key(uri) & 0xFFFFFFFF:08x}.{_safe(name)}.lock", timeout_s,
                                 what):
                yield
    except locks.LockTimeout as exc:
        raise RegistryError(f"{exc}; another promotion may be stuck") from None


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


_WARNED: set[str] = set()


def _warn_machine_only(uri: str) -> None:
    if uri not in _WARNED:
        _WARNED.add(uri)
        print(f"warning: promotions on {uri} are serialised on this machine only: set register.lock_url "
              f"({LOCK_URL_ENV}) to a PostgreSQL database, or PREFECT_API_URL to a Prefect server, to serialise "
              "them across machines", file=sys.stderr)


def _record(client, name: str, version: str, event: dict) -> None:
    """Append an alias event to the version's `alias_history` tag (call under the registry lock)."""
    mv = client.get_model_version(name, version)
    history = json.loads(mv.tags.get("alias_history", "[]"))[-(HISTORY_KEEP - 1):]
    history.append(event)
    client.set_model_version_tag(name, version, "alias_history", json.dumps(history))


def move_alias(client, name: str, alias: str, version: str, actor: str, reason: str) -> None:
    """Point `alias` at `version` and record when, by whom and why (call under the registry lock)."""
    old = alias_version(client, name, alias)
    client.set_registered_model_alias(name, alias, str(version))
    when = now()
    _record(client, name, str(version), {"at": when, "by": actor, "alias": alias, "action": "set", "reason": reason})
    if old is not None and str(old.version) != str(version):
        _record(client, name, str(old.version), {"at": when, "by": actor, "alias": alias, "action": "moved away",
                                                 "to": str(version), "reason": reason})


# --- promotion, rollback ---------------------------------------------------------------------------------------

@dataclass
class Decision:
    version: str
    promoted: bool
    alias: str
    against: str                      # "champion v3" or "base (no champion yet)"
    results: list[GateResult] = field(default_factory=list)
    forced: bool = False
    previous: str | None = None       # the champion this version replaced

    @property
    def failed(self) -> str:
        return failed_text(self.results)

    def summary(self) -> str:
        if self.promoted:
            how = "forced past failed gates" if self.forced and self.failed else "every gate passed"
            return f"version {self.version} promoted to @{self.alias} ({how}; against {self.against})"
        return f"version {self.version} stays @{CHALLENGER}: failed {self.failed}"


def promote(client, uri: str, name: str, version: str, *, gates: list[Gate], primary_metric: str, actor: str,
            reason: str, alias: str = CHAMPION, force: bool = False, lock_url: str | None = None,
            lease_s: float = LEASE_S) -> Decision:
    """Check the gates on `version` and move `alias` to it if they pass (or if forced); serialised per model.

    The champion it is compared with is read under the lock, so two concurrent promotions each compare with
    the champion the other one left behind. The outcome is written to the version's tags either way:
    `promotion.decision` (promoted | rejected | forced), `promotion.against`, `gates.results`, `gates.failed`.

    Raises:
        RegistryError: Unknown version, artifacts deleted by gc, or `force` without a reason.
    """
    if force and not reason.strip():
        raise RegistryError("--force overrides the promotion gates only with a reason: add --reason \"why\"")
    version = str(version)
    with registry_lock(client, uri, name, lock_url=lock_url, lease_s=lease_s):
        mv = get_version(client, name, version)
        if "artifacts_deleted" in mv.tags:
            raise RegistryError(f"{name} version {version}: its artifacts were deleted by gc; register it again")
        current = alias_version(client, name, CHAMPION)
        champion = None if current is None or str(current.version) == version else current
        against = f"champion v{champion.version}" if champion else "base (no champion yet)"
        candidate, base = version_metrics(client, mv)
        results = check_gates(gates, primary_metric, candidate, base,
                              version_metrics(client, champion)[0] if champion else None,
                              f"champion v{champion.version}" if champion else CHAMPION)
        passed = all(r.passed for r in results)
        decision = Decision(version, passed or force, alias, against, results, forced=force and not passed)
        when = now()
        tags = {"gates.results": json.dumps([r.__dict__ for r in results]), "gates.failed": decision.failed,
                "promotion.against": against, "promotion.at": when, "promotion.by": actor,
                "promotion.reason": reason, "promotion.decision": "rejected"}
        if decision.promoted:
            tags["promotion.decision"] = "forced" if decision.forced else "promoted"
            if decision.forced:
                tags["promotion.manual_override"] = f"{when} by {actor}: {reason} (failed: {decision.failed})"
            move_alias(client, name, alias, version, actor, reason if not decision.forced else f"forced: {reason}")
            if alias == CHAMPION and champion is not None:
                decision.previous = str(champion.version)
                move_alias(client, name, PREVIOUS, decision.previous, actor,
                           f"replaced as champion by version {version}")
                client.set_model_version_tag(name, decision.previous, "promotion.decision", "demoted")
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
    return decision


def rollback(client, uri: str, name: str, actor: str, reason: str = "rollback",
             lock_url: str | None = None) -> tuple[str, str | None]:
    """`champion` <- `previous`; the demoted version loses `champion` and `previous` is cleared.

    Returns:
        (restored version, demoted version or None).
    """
    with registry_lock(client, uri, name, lock_url=lock_url):
        prev = alias_version(client, name, PREVIOUS)
        if prev is None:
            raise RegistryError(f"{name} has no @{PREVIOUS} version to roll back to (a rollback needs an earlier "
                                "champion); promote a version explicitly with `alignpipe promote`")
        current = alias_version(client, name, CHAMPION)
        move_alias(client, name, CHAMPION, str(prev.version), actor, f"rollback: {reason}")
        client.delete_registered_model_alias(name, PREVIOUS)
        _record(client, name, str(prev.version), {"at": now(), "by": actor, "alias": PREVIOUS, "action": "removed",
                                                   "reason": "restored as champion"})
        client.set_model_version_tag(name, str(prev.version), "promotion.decision", "restored")
        demoted = None
        if current is not None and str(current.version) != str(prev.version):
            demoted = str(current.version)
            client.set_model_version_tag(name, demoted, "promotion.decision", "rolled_back")
    return str(prev.version), demoted


# --- retention -------------------------------------------------------------------------------------------------

def gc(client, uri: str, name: str, keep: int, actor: str, lock_url: str | None = None) -> tuple[list[str], int]:
    """Delete the artifacts of versions beyond the newest `keep` that hold no alias.

    Versions holding an alias (champion, challenger, previous or any other) are never touched. The version
    entry stays in the registry, tagged `artifacts_deleted`, so its lineage remains readable.

    Returns:
        (versions whose artifacts were deleted, bytes freed; only counted for local artifact stores).
    """
    if keep < 0:
        raise RegistryError(f"--keep {keep}: must be 0 or more (the number of newest versions kept whole)")
    deleted, freed = [], 0
    with registry_lock(client, uri, name, lock_url=lock_url):
        for mv in versions(client, name)[keep:]:
            if mv.aliases or "artifacts_deleted" in mv.tags:
                continue
            freed += _delete_artifacts(client, mv)
            client.set_model_version_tag(name, str(mv.version), "artifacts_deleted", f"{now()} by {actor}")
            deleted.append(str(mv.version))
    return deleted, freed


def _delete_artifacts(client, mv) -> int:
    """Delete the logged model's artifacts; returns the bytes freed where the store is a local folder."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    model_id = logged_model_id(mv)
    location = client.get_logged_model(model_id).artifact_location if model_id else \
        client.get_model_version_download_uri(mv.name, mv.version)
    parsed = urlparse(location)
    if parsed.scheme in ("", "file"):
        folder = Path(unquote(parsed.path))
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0
        shutil.rmtree(folder, ignore_errors=True)
        return size
    get_artifact_repository(location).delete_artifacts()
    return 0


def logged_model_id(mv) -> str | None:
    """The MLflow 3 logged model behind a version (its source is `models:/m-<id>`), or None for a plain path."""
    if getattr(mv, "model_id", None):
        return mv.model_id
    source = mv.source or ""
    return source.removeprefix("models:/").split("/")[0] if source.startswith("models:/m-") else None


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def actor_name() -> str:
    """Who runs a CLI command: the OS user (recorded in alias-move tags)."""
    import getpass

    try:
        return f"user {getpass.getuser()}@{os.uname().nodename}"
    except Exception:
        return "user unknown"
