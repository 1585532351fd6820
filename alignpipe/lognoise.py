"""Drop the import-time warnings that every process prints on a CPU-only machine and that no user can act on.

torchao's CPU wheel ships CUDA-only kernels (`_C_mxfp8`, `_C_cutlass_90a`) and says it cannot load them; its
int-matmul module says Triton is absent; torch says torchao registers Enums with pytree the old way; PEFT asks
transformers for a renamed property (a FutureWarning). Each Ray worker (training, merge, quantize, each evaluated
model) printed them all. Only these messages are dropped, from these loggers; with a CUDA device present,
torchao's lines are kept (there they mean something).

`alignpipe run` also turns the libraries' progress bars and Ray's INFO lines off in its own process (QUIET_ENV)
unless `--verbose`; its Ray workers keep theirs (WORKER_BARS), for the run's log file.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# Set by `alignpipe run` without --verbose, in its own process: no tqdm bars from transformers ("Loading weights",
# "Writing model shards"), datasets ("Map") or MLflow ("Downloading artifacts") in the driver, and the driver's own
# Ray INFO lines off. Warnings, errors and tracebacks reach the console as before.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
             "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "ALIGNPIPE_QUIET": "1"}
# ... and given to its Ray workers instead (ray_runner.ensure_ray; an in-process Ray's workers would inherit
# QUIET_ENV): they keep their bars and log lines, which Ray forwards to the driver and `alignpipe run` keeps in the
# run's log file, off the console (alignpipe/cli/runlog.py).
WORKER_BARS = {"HF_HUB_DISABLE_PROGRESS_BARS": "0", "HF_DATASETS_DISABLE_PROGRESS_BARS": "0",
               "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "true", "ALIGNPIPE_QUIET": "0"}


def quiet_console() -> bool:
    """True when this process runs under `alignpipe run` without --verbose (QUIET_ENV is set)."""
    return os.environ.get("ALIGNPIPE_QUIET") == "1"


# logger -> (message fragment, kept where CUDA is available)
_KNOWN: dict[str, tuple[str, bool]] = {
    "torchao": ("Failed to load ", True),
    "torchao.kernel.intmm": ("Detected no triton", True),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported", False),
}


class _DropKnown(logging.Filter):
    def __init__(self, fragment: str, keep_with_cuda: bool):
        super().__init__()
        self.fragment, self.keep_with_cuda = fragment, keep_with_cuda

    def filter(self, record: logging.LogRecord) -> bool:
        if self.fragment not in record.getMessage():
            return True
        torch = sys.modules.get("torch")  # torchao imports torch first: no import here
        return self.keep_with_cuda and torch is not None and torch.cuda.is_available()


def install() -> None:
    """Idempotent: add the filters once per process (before torchao is imported, or they come too late)."""
    # PEFT 0.21 still asks transformers 5 for the old property name whenever it wraps or loads a model
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    for name, (fragment, keep_with_cuda) in _KNOWN.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) for f in logger.filters):
            logger.addFilter(_DropKnown(fragment, keep_with_cuda))
