"""Where the heavy work runs (Ray) and how it survives failures."""

from typing import Literal

from pydantic import Field, field_validator, model_validator

from alignpipe.config.base import Section

ALLOCATORS = ("auto", "system", "tcmalloc", "jemalloc")


class ComputeConfig(Section):
    ray_address: str | None = Field(
        None, description="Ray cluster address (`ray://host:10001`, `auto`); empty = start Ray in-process."
    )
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP across them).")
    use_gpu: bool = Field(False, description="One GPU per training worker.")
    cpus_per_worker: float = Field(2, gt=0, description="CPUs per training worker; also its torch thread count.")
    max_failures: int = Field(2, ge=-1, description="Worker failures survived by restarting from the last checkpoint.")
    checkpoints_to_keep: int = Field(2, ge=1, description="Ray Train checkpoints kept per training stage.")
    storage_path: str | None = Field(
        None, description="Ray Train storage (shared by all nodes on a cluster); default <workdir>/ray_results."
    )
    allocator: str = Field(
        "auto", description="malloc of every Ray worker: `auto` (tcmalloc where Ray runs on this machine and "
        "libtcmalloc_minimal is installed, else the system's), `system`, `tcmalloc`, `jemalloc`, or the path of a "
        "malloc library; preloaded (LD_PRELOAD) into each worker process."
    )
    kernels: Literal["auto", "off"] = Field(
        "auto", description="Hardware-specific kernels (alignpipe.kernels): auto = each kernel only on the CPU "
        "features it was measured on, GPUs keep the libraries' kernels; off = the libraries' plain modules everywhere."
    )

    @field_validator("allocator")
    @classmethod
    def _allocator(cls, value: str) -> str:
        if value not in ALLOCATORS and "/" not in value:
            raise ValueError(f"allocator={value!r}: use one of {', '.join(ALLOCATORS)}, or the path of a malloc "
                             "library such as /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
        return value

    @field_validator("kernels", mode="before")
    @classmethod
    def _kernels(cls, value):
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` (file or --set) as false

    @model_validator(mode="after")
    def _threads(self):
        if self.cpus_per_worker != int(self.cpus_per_worker) and not self.use_gpu:
            raise ValueError(f"cpus_per_worker={self.cpus_per_worker}: use a whole number of CPUs for CPU training")
        return self
