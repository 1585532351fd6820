"""One pipeline = one model, its data and the settings of every stage."""

from urllib.parse import urlparse

from pydantic import ConfigDict, Field, model_validator

from alignpipe.config.align import AlignConfig
from alignpipe.config.base import Section
from alignpipe.config.cache import CacheConfig
from alignpipe.config.compute import ComputeConfig
from alignpipe.config.data import DataConfig, ValidateConfig
from alignpipe.config.evaluate import EvaluateConfig
from alignpipe.config.model import ModelConfig
from alignpipe.config.quantize import GPU_ONLY, QuantizeConfig
from alignpipe.config.register import RegisterConfig
from alignpipe.config.schedule import ScheduleConfig
from alignpipe.config.sft import SftConfig
from alignpipe.config.tracking import TrackingConfig

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", ""}


class PipelineConfig(Section):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())

    name: str = Field(..., description="The pipeline's key in pipelines.yaml.")
    description: str = Field("", description="One line for humans (shown by `alignpipe check`).")
    workdir: str = Field(".alignpipe", description="Project data folder: MLflow store, Ray storage, stage outputs.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    sft: SftConfig = Field(default_factory=SftConfig)
    align: AlignConfig = Field(default_factory=AlignConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    register_: RegisterConfig = Field(default_factory=RegisterConfig, alias="register")
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    schedule: ScheduleConfig | None = Field(None, description="Optional schedule for `alignpipe deploy`.")

    @model_validator(mode="after")
    def _remote_ray_needs_remote_tracking(self):
        if ray_is_remote(self.compute.ray_address) and tracking_is_local_file(self.tracking.mlflow_uri):
            raise ValueError(
                f"compute.ray_address={self.compute.ray_address!r} is a remote cluster but "
                f"tracking.mlflow_uri={self.tracking.mlflow_uri or '(local SQLite default)'!r} is a file on this "
                "machine that Ray workers cannot reach; set tracking.mlflow_uri (or MLFLOW_TRACKING_URI) "
                "to an MLflow server, e.g. http://mlflow.internal:5000"
            )
        if self.compute.use_gpu is False and self.sft.quantized_base is not None:
            raise ValueError(
                f"sft.quantized_base={self.sft.quantized_base!r} (QLoRA) needs a GPU: set compute.use_gpu=true "
                "or sft.quantized_base=null"
            )
        if self.data.preference is None and "method" not in self.align.model_fields_set:
            self.align.method = "none"  # the default (dpo) applies only where there are pairs to align on
        if self.align.method != "none" and self.data.preference is None:
            raise ValueError(
                f"align.method={self.align.method!r} needs preference pairs: set data.preference.path, "
                "or align.method=none to skip the align stage"
            )
        if self.compute.use_gpu is False and self.quantize.method in GPU_ONLY:
            raise ValueError(
                f"quantize.method={self.quantize.method!r} (bitsandbytes) needs a CUDA GPU: set compute.use_gpu=true "
                "on a GPU machine, or quantize.method=int8_dynamic for CPU"
            )
        return self


def ray_is_remote(address: str | None) -> bool:
    """True when Ray workers may run on other machines than this one."""
    if not address or address in ("local", "auto"):
        return False
    host = urlparse(address if "://" in address else f"ray://{address}").hostname or ""
    return host not in LOCAL_HOSTS


def tracking_is_local_file(uri: str | None) -> bool:
    """True for the SQLite / file stores that only this machine can open."""
    if uri is None:
        return True
    scheme = urlparse(uri).scheme
    return scheme in ("", "file", "sqlite")
