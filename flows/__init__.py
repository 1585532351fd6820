"""Prefect flows: they compose the stages in `tasks/` and hold no stage logic themselves."""
