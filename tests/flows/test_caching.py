"""Content-keyed Prefect caching: same key -> cached state and the stored result; new key -> the task runs."""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from alignpipe.flows.caching import cached, storage_for
from alignpipe.config.cache import CacheConfig

CALLS: list[int] = []


@task(cache_policy=NO_CACHE)
def square(ctx: str, x: int) -> int:
    CALLS.append(x)
    return x * x


def key(ctx: str, x: int) -> str:
    return f"square-{x}"  # ignores the run-scoped argument, as stage keys ignore run ids


def test_same_key_is_served_from_the_cache_and_ctx_stays_out_of_the_key(prefect_harness, tmp_path):
    CALLS.clear()
    cache = CacheConfig()

    @flow
    def twice(x: int, run: str):
        state = cached(square, key, cache, str(tmp_path))(run, x, return_state=True)
        return state.name, state.result()

    first, second, third = twice(3, "run-1"), twice(3, "run-2"), twice(4, "run-3")  # run-2: same content
    assert [first, second, third] == [("Completed", 9), ("Cached", 9), ("Completed", 16)]
    assert CALLS == [3, 4]
    assert (tmp_path / "cache" / "keys" / "square-3").exists()


def test_refresh_and_disabled_run_the_task_again(prefect_harness, tmp_path):
    CALLS.clear()

    @flow
    def once(cache: CacheConfig):
        return cached(square, key, cache, str(tmp_path))("ctx", 5, return_state=True).name

    assert once(CacheConfig()) == "Completed"
    assert once(CacheConfig()) == "Cached"
    assert once(CacheConfig(refresh=True)) == "Completed"
    assert once(CacheConfig(enabled=False)) == "Completed"
    assert CALLS == [5, 5, 5]


def test_storage_is_a_block_slug_or_a_folder(tmp_path):
    assert storage_for(CacheConfig(result_storage="block://s3-bucket/results"), str(tmp_path)) == "s3-bucket/results"
    assert storage_for(CacheConfig(), str(tmp_path)) == (tmp_path / "cache").resolve()
    where = tmp_path / "elsewhere"
    assert storage_for(CacheConfig(result_storage=str(where)), str(tmp_path)) == where.resolve()
    assert where.is_dir()
