"""Content-keyed Prefect caching: a stage's key is its config section + its input digests + the code version.

Each stage module exposes `cache_key(...)`, taking the task's own arguments; it must read only what is stable across
runs (never run ids: the run context's `base_model` and `workdir` are fine). The same key
names the stage's output folder, its Ray Train run and its MLflow run tag, so a cache hit and a reused folder agree.
Registration and promotion are never cached.

A stage key is also a lock (`stage_lock`): two flow runs that reach the same key at once do not both train into
the same folder and Ray run. The first holds the key while its stage runs; the others wait, then find its result
in the cache. Through a Prefect server the lock is a global concurrency limit named after the key (any machine
that reaches the server); with Prefect's temporary local server, a file lock in the workdir (one machine).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from prefect.cache_policies import CachePolicy

from alignpipe import locks
from alignpipe.config.cache import CacheConfig

BLOCK = "block://"


@dataclass
class StageKey(CachePolicy):
    """Prefect cache policy that delegates to a stage's own `cache_key` function."""

    key_fn: Callable[..., str] | None = None

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str | None:
        if self.key_fn is None:
            return None
        return self.key_fn(**inputs)


def storage_for(cache: CacheConfig, workdir: str) -> str | Path:
    """A saved block's slug for `block://type/name`, else a local folder (created): the configured one or <workdir>/cache."""
    where = cache.result_storage
    if where and where.startswith(BLOCK):
        return where[len(BLOCK):]
    path = Path(where).expanduser() if where else Path(workdir) / "cache"
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def cached(task, key_fn: Callable[..., str], cache: CacheConfig, workdir: str):
    """`task` with a content-keyed cache policy and persisted results; unchanged when caching is off."""
    if not cache.enabled:
        return task
    storage = storage_for(cache, workdir)
    keys = storage / "keys" if isinstance(storage, Path) else storage
    return task.with_options(
        cache_policy=StageKey(key_fn=key_fn).configure(key_storage=keys),
        result_storage=storage,
        persist_result=True,
        refresh_cache=cache.refresh,
    )


@contextmanager
def stage_lock(stage: str, key: str, cache: CacheConfig, workdir: str) -> Iterator[None]:
    """Hold stage key `key` while the stage runs (nothing to hold when caching is off: every run does its own)."""
    if not cache.enabled:
        yield
        return
    what = f"stage {stage} (key {key})"

    def waiting() -> None:
        print(f"stage {stage}: another flow run is running key {key}; waiting to reuse its result")

    if locks.prefect_server():
        with locks.prefect_lock(locks.limit_name("alignpipe", stage, key), cache.lease_seconds, None, what, waiting):
            yield
    else:
        with locks.file_lock(Path(workdir) / "cache" / "locks" / f"{stage}-{key}.lock", float("inf"), what, waiting):
            yield
