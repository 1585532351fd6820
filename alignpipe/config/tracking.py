"""MLflow tracking and registry settings."""

from pydantic import Field

from alignpipe.config.base import Section


class TrackingConfig(Section):
    mlflow_uri: str | None = Field(
        None, description="MLflow tracking URI; empty = sqlite:///<workdir>/mlflow.db (env MLFLOW_TRACKING_URI wins)."
    )
    experiment: str = Field("alignpipe", min_length=1, description="MLflow experiment name.")
    registered_model: str = Field("alignpipe-model", min_length=1, description="Registered model name.")
