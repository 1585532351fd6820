"""Model registry settings."""

from pydantic import Field

from alignpipe.config.base import Section


class RegisterConfig(Section):
    enabled: bool = Field(True, description="Register the tuned model in the MLflow Model Registry.")
    alias: str = Field("challenger", description="Alias set on the new version.")
