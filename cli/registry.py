"""`alignpipe models | promote | rollback | gc`: look at and manage registered versions and their aliases.

The registry is found from --tracking-uri, else MLFLOW_TRACKING_URI, else the pipelines file's default
(sqlite:///<workdir>/mlflow.db). Gates come from the pipeline that registered the version (its `pipeline` tag).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from alignpipe import registry, tracking
from alignpipe.config import load_pipeline, pipeline_names
from alignpipe.errors import AlignpipeError

console = Console()
err = Console(stderr=True)

UriOpt = Annotated[str | None, typer.Option("--tracking-uri", help="MLflow tracking/registry URI.")]
ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Pipelines file (default URI and gates).")]
PipelineOpt = Annotated[str | None, typer.Option("--pipeline", "-p", help="Pipeline whose gates apply "
                                                 "(default: the one that registered the version).")]


def resolve_uri(tracking_uri: str | None, config: Path, pipeline: str | None = None) -> str:
    """--tracking-uri > MLFLOW_TRACKING_URI > the pipelines file (its tracking.mlflow_uri or workdir default)."""
    if tracking_uri:
        return tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    name = pipeline or pipeline_names(config)[0]
    return tracking.tracking_uri(load_pipeline(config, name))


def _user_errors(fn):
    """Print user-fixable errors without a traceback and exit 1."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AlignpipeError as exc:
            err.print(f"[red]error:[/red] {exc}", soft_wrap=True)
            raise typer.Exit(1) from None
    return wrapper


@_user_errors
def models(name: Annotated[str | None, typer.Argument(help="Registered model; omit to list all.")] = None,
           tracking_uri: UriOpt = None, config: ConfigOpt = Path("pipelines.yaml")) -> None:
    """Versions with their aliases, key metrics and gate results (or every registered model)."""
    client = tracking.client_for(resolve_uri(tracking_uri, config))
    if name is None:
        table = Table("model", "versions", "aliases", title="registered models")
        for m in client.search_registered_models():
            count = len(client.search_model_versions(f"name = '{m.name}'"))
            table.add_row(m.name, str(count), ", ".join(f"@{a}=v{v}" for a, v in sorted(m.aliases.items())))
        console.print(table)
        return
    table = Table("version", "aliases", "candidate", *registry.KEY_METRICS[:4], "decision", "gates", title=name)
    for mv in registry.versions(client, name):
        m, _ = registry.version_metrics(client, mv)
        failed = mv.tags.get("gates.failed", "")
        gates = "[green]all passed[/green]" if "gates.results" in mv.tags and not failed else \
            (f"[red]{failed}[/red]" if failed else "-")
        decision = mv.tags.get("promotion.decision", "-") + (" (artifacts deleted)" if "artifacts_deleted" in mv.tags
                                                             else "")
        table.add_row(str(mv.version), " ".join(f"@{a}" for a in mv.aliases), mv.tags.get("candidate", "-"),
                      *[f"{m[k]:.4g}" if k in m else "-" for k in registry.KEY_METRICS[:4]], decision, gates)
    console.print(table)


@_user_errors
def promote(name: Annotated[str, typer.Argument(help="Registered model.")],
            version: Annotated[str, typer.Argument(help="Version to promote.")],
            reason: Annotated[str, typer.Option("--reason", help="Why (recorded in the version's tags).")],
            alias: Annotated[str, typer.Option("--alias", help="Alias to move.")] = registry.CHAMPION,
            force: Annotated[bool, typer.Option("--force", help="Move the alias even if gates fail "
                                                "(needs --reason; recorded as a manual override).")] = False,
            pipeline: PipelineOpt = None, tracking_uri: UriOpt = None, config: ConfigOpt = Path("pipelines.yaml"),
            ) -> None:
    """Check the promotion gates on VERSION and move the alias to it if they pass (or with --force)."""
    uri = resolve_uri(tracking_uri, config, pipeline)
    client = tracking.client_for(uri)
    mv = registry.get_version(client, name, version)
    cfg = load_pipeline(config, pipeline or mv.tags.get("pipeline") or pipeline_names(config)[0])
    decision = registry.promote(client, uri, name, version, gates=cfg.register_.gates,
                                primary_metric=cfg.register_.primary_metric, actor=registry.actor_name(),
                                reason=reason, alias=alias, force=force, lock_url=_lock_url(cfg),
                                lease_s=cfg.register_.lock_lease_seconds)
    _print_gates(decision)
    console.print(decision.summary())
    if not decision.promoted:
        raise typer.Exit(1)


@_user_errors
def rollback(name: Annotated[str, typer.Argument(help="Registered model.")],
             reason: Annotated[str, typer.Option("--reason", help="Why (recorded in tags).")] = "rollback",
             tracking_uri: UriOpt = None, config: ConfigOpt = Path("pipelines.yaml")) -> None:
    """Give @champion back to the @previous version."""
    uri = resolve_uri(tracking_uri, config)
    restored, demoted = registry.rollback(tracking.client_for(uri), uri, name, registry.actor_name(), reason,
                                          lock_url=_lock_url())
    console.print(f"{name}: @champion is version {restored} again" +
                  (f" (version {demoted} rolled back)" if demoted else ""))


@_user_errors
def gc(name: Annotated[str, typer.Argument(help="Registered model.")],
       keep: Annotated[int, typer.Option("--keep", help="Newest versions kept whole.")] = 5,
       tracking_uri: UriOpt = None, config: ConfigOpt = Path("pipelines.yaml")) -> None:
    """Delete the artifacts of old versions that hold no alias (never champion, challenger or previous)."""
    uri = resolve_uri(tracking_uri, config)
    deleted, freed = registry.gc(tracking.client_for(uri), uri, name, keep, registry.actor_name(), lock_url=_lock_url())
    which = ", ".join(deleted) if deleted else "none"
    console.print(f"{name}: deleted the artifacts of versions {which}; freed {registry.human_bytes(freed)}")


def _lock_url(cfg=None) -> str | None:
    """What serialises promotions on a server: the environment's lock database, else the pipeline's."""
    return os.environ.get(registry.LOCK_URL_ENV) or (cfg.register_.lock_url if cfg else None)


def _print_gates(decision: registry.Decision) -> None:
    table = Table("gate", "result", "numbers", title=f"gates vs {decision.against}")
    for r in decision.results:
        table.add_row(r.gate, "[green]pass[/green]" if r.passed else "[red]FAIL[/red]", r.detail)
    console.print(table)


def add_commands(app: typer.Typer) -> None:
    """Register these commands on the main CLI."""
    for fn in (models, promote, rollback, gc):
        app.command(fn.__name__)(fn)


__all__ = ["add_commands"]
