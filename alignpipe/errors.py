"""The one exception type for problems a user can cause and fix (bad config, bad data, missing model)."""


class AlignpipeError(Exception):
    """A user-fixable problem. The CLI prints the message without a traceback and exits non-zero."""


class ConfigError(AlignpipeError):
    """pipelines.yaml (or a --set override) is invalid."""


class DataValidationError(AlignpipeError):
    """The data failed its quality suite; nothing was trained or registered."""

    def __init__(self, message: str, report_path: str | None = None):
        super().__init__(message)
        self.report_path = report_path


class ModelNotFoundError(AlignpipeError):
    """The configured model could not be found locally, in the cache, or on the hub."""
