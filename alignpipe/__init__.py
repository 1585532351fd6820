"""alignpipe core: config schema, data formats, model loading, tracking, the Ray Train runner.

Nothing here imports `flows/`, `tasks/` or the CLI: imports point down only.
"""

__version__ = "0.1.0"
