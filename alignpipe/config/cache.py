"""Stage caching: where Prefect keeps cache keys and results, and whether to use them."""

from pydantic import Field

from alignpipe.config.base import Section


class CacheConfig(Section):
    enabled: bool = Field(True, description="Skip a stage whose config section, input digests and code are unchanged.")
    refresh: bool = Field(False, description="Run every stage again and overwrite the cached results.")
    result_storage: str | None = Field(
        None,
        description="Where stage results persist: null = <workdir>/cache, a local folder, or a saved Prefect "
                    "storage block as `block://<type>/<name>` (e.g. `block://s3-bucket/alignpipe`) for several machines.",
    )
    lease_seconds: int = Field(
        300, ge=60, le=86400,
        description="Lease on a stage key's lock on the Prefect server, renewed while its run lives: a crashed "
                    "run's key is free again this long after it died (the server takes 60 s or more).")
