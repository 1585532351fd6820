"""Mutual exclusion for work that many runs share: one run trains a stage key, one promotion moves aliases at a time.

Three kinds, each with the reach its store allows, all freed when their holder dies:
- `file_lock`: an OS lock on a file (one machine, or a disk every holder mounts); the kernel frees it with the process.
- `prefect_lock`: a Prefect global concurrency limit of one slot, taken with `strict=True` through the Prefect
  server (any machine that reaches it). Prefect's client renews the lease while the holder lives; the server's
  repossessor frees an expired one. The server takes leases of 60 s or more.
- `postgres_lock`: a PostgreSQL session-level advisory lock. A killed holder's connection ends and the lock with
  it; a hung or cut-off holder stops renewing, and the server ends its session after `lease_s` seconds idle
  (`idle_session_timeout`), which frees the lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from alignpipe.errors import AlignpipeError

PREFECT_MIN_LEASE_S = 60.0    # the Prefect server refuses shorter leases


class LockTimeout(AlignpipeError):
    """A lock stayed held by someone else for longer than the caller would wait."""


@contextmanager
def file_lock(path: str | Path, timeout_s: float, what: str,
              on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive `flock` on `path` (created with its folder); `on_wait` is called once if it must wait."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        deadline, waited = time.monotonic() + timeout_s, False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited and on_wait:
                    on_wait()
                waited = True
                if time.monotonic() > deadline:
                    raise LockTimeout(f"{what} stayed locked for {timeout_s:.0f}s ({path}); its holder may be stuck: "
                                      "retry, or stop that process") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prefect_server() -> str | None:
    """The Prefect API URL this process is configured for, or None when it would use a temporary local server
    (which shares nothing with other processes and never frees an expired lease)."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def limit_name(*parts: str) -> str:
    """A global concurrency limit name from free text: Prefect names may not hold '/' or '%'."""
    text = "-".join(parts)
    return "".join(c if c.isalnum() or c in "-_.:" else "_" for c in text)


@contextmanager
def prefect_lock(name: str, lease_s: float, timeout_s: float | None, what: str,
                 on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the one slot of the global concurrency limit `name` (made on first use) on the Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            busy = client.read_global_concurrency_limit_by_name(name).active_slots > 0
        except ObjectNotFound:
            busy = False
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:  # made by a concurrent holder between our read and create
                pass
    if busy and on_wait:  # a hint only: the slot may change hands before we ask for it
        on_wait()
    held = ExitStack()  # acquired apart from the body: a TimeoutError of the caller's own work is not ours
    try:
        held.enter_context(concurrency(name, occupy=1, timeout_seconds=timeout_s,
                                       lease_duration=max(lease_s, PREFECT_MIN_LEASE_S), strict=True))
    except TimeoutError:
        raise LockTimeout(f"{what} stayed locked for {timeout_s:.0f}s (Prefect global concurrency limit {name!r}); "
                          "its holder's lease runs out unless it still renews it") from None
    with held:
        yield


def advisory_key(name: str) -> int:
    """A signed 64-bit advisory lock key for `name` (PostgreSQL's `bigint`)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)


@contextmanager
def postgres_lock(url: str, name: str, lease_s: float, timeout_s: float, what: str,
                  on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold PostgreSQL's advisory lock for `name` on the database at `url` (a libpq URL) with a renewed lease."""
    import psycopg2
    from psycopg2 import errors

    conn = psycopg2.connect(url, connect_timeout=10, application_name=f"alignpipe lock {name}"[:63])
    conn.autocommit = True
    key = advisory_key(name)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT set_config('idle_session_timeout', %s, false)", (str(int(lease_s * 1000)),))
            cur.execute("SELECT pg_try_advisory_lock(%s)", (key,))
            if not cur.fetchone()[0]:
                if on_wait:
                    on_wait()
                cur.execute("SELECT set_config('lock_timeout', %s, false)", (str(int(timeout_s * 1000)),))
                try:
                    cur.execute("SELECT pg_advisory_lock(%s)", (key,))
                except errors.LockNotAvailable:
                    raise LockTimeout(f"{what} stayed locked for {timeout_s:.0f}s (PostgreSQL advisory lock {key}); "
                                      "a holder that stops renewing loses it after its lease") from None
        stop = threading.Event()
        renewer = threading.Thread(target=_renew, args=(conn, lease_s, stop), name=f"lease {name}", daemon=True)
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join()
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT pg_advisory_unlock(%s)", (key,))
            except psycopg2.Error:  # the session ended (lease lost): its locks went with it
                pass
    finally:
        conn.close()


def _renew(conn, lease_s: float, stop: threading.Event) -> None:
    """Keep the session busy every third of its lease, so the server never ends it while the holder lives."""
    import psycopg2

    while not stop.wait(lease_s / 3):
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
        except psycopg2.Error as exc:
            print(f"lock lease lost: {exc}; another holder may take it now", file=sys.stderr)
            return
