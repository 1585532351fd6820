"""When a deployed pipeline runs by itself (used by `alignpipe deploy`)."""

from pydantic import Field, model_validator

from alignpipe.config.base import Section


class ScheduleConfig(Section):
    cron: str | None = Field(None, description="Cron expression, e.g. '0 3 * * 1' (Mondays 03:00).")
    interval_seconds: int | None = Field(None, ge=60, description="Run every N seconds instead of a cron.")
    timezone: str = Field("UTC", description="IANA timezone for the cron expression.")
    active: bool = Field(True, description="false = deployed paused: shown in the UI, no runs until switched on "
                                           "there (or here, and deployed again).")

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.cron is None) == (self.interval_seconds is None):
            raise ValueError("give exactly one of schedule.cron or schedule.interval_seconds")
        if self.cron is not None and len(self.cron.split()) != 5:
            raise ValueError(f"schedule.cron {self.cron!r} needs 5 fields (minute hour day month weekday)")
        return self
