"""alignpipe core: config schema, data formats, model loading, tracking, the Ray Train runner.

Nothing here imports `flows/`, `tasks/` or the CLI: imports point down only.
"""

from alignpipe import lognoise

lognoise.install()  # every process that runs our code (CLI, Ray workers) imports this package before torchao

__version__ = "0.1.0"
