"""Where the heavy work runs (Ray) and how it survives failures."""

from typing import Literal

from pydantic import Field, field_validator, model_validator

from alignpipe.config.base import Section

ALLOCATORS = ("auto", "system", "tcmalloc", "jemalloc")


class ComputeConfig(Section):
    ray_address: str | None = Field(
        None, description="Ray cluster to run on: its GCS address `<head>:6379` from a driver on a node of the "
        "cluster (one with no CPUs will do), or `auto` (the cluster this process runs on, e.g. a Ray Job). Not Ray "
        "Client (`ray://`), which Ray Train does not support. Empty = start Ray in-process, sized to what the "
        "pipeline asks for."
    )
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP across them).")
    use_gpu: bool = Field(False, description="One GPU per training worker and per heavy task (merge, quantize, "
                          "evaluate); every model then runs on CUDA.")
    cpus_per_worker: float = Field(2, gt=0, description="CPUs per training worker; also its torch thread count.")
    max_failures: int = Field(2, ge=-1, description="Worker failures survived by restarting from the last checkpoint.")
    checkpoints_to_keep: int = Field(2, ge=1, description="Ray Train checkpoints kept per training stage.")
    storage_path: str | None = Field(
        None, description="Where everything a Ray worker reads or writes lives (Ray Train checkpoints, data, models, "
        "adapters, predictions): a local folder, or `s3://bucket/prefix` on any S3-compatible store (credentials from "
        "the standard AWS variables). Default: the workdir, which suits one machine only."
    )
    storage_endpoint: str | None = Field(
        None, description="Endpoint URL of an S3-compatible store (MinIO, moto, Ceph ...); default "
        "`AWS_ENDPOINT_URL`, else AWS itself."
    )
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources every training worker and heavy task asks for, "
        "e.g. `{trainer: 1}` to keep the work on nodes started with `--resources='{\"trainer\": 4}'`."
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

    @field_validator("ray_address")
    @classmethod
    def _not_ray_client(cls, value: str | None) -> str | None:
        if value and value.startswith("ray://"):
            raise ValueError(
                "Ray Client (`ray://`) may not work as expected with Ray Train, Ray's docs say: from a driver on a "
                "node of the cluster use its GCS address `<head>:6379` (e.g. RAY_ADDRESS=alignpipe-head-svc:6379); "
                "from anywhere else, submit the run as a Ray Job (`ray job submit --address http://<head>:8265 -- "
                "alignpipe run <pipeline>`: Ray sets RAY_ADDRESS for the job's driver)"
            )
        return value

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
