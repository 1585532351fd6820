"""Drop the import-time warnings that every process prints on a CPU-only machine and that no user can act on.

torchao's CPU wheel ships CUDA-only kernels (`_C_mxfp8`, `_C_cutlass_90a`) and says it cannot load them; its
int-matmul module says Triton is absent; torch says torchao registers Enums with pytree the old way; PEFT asks
transformers for a renamed property (a FutureWarning). Each Ray worker (training, merge, quantize, each evaluated
model) printed them all. Only these messages are dropped, from these loggers; with a CUDA device present,
torchao's lines are kept (there they mean something).
"""

from __future__ import annotations

import logging
import sys
import warnings

_KNOWN: dict[str, tuple[str, ...]] = {
    "torchao": ("Failed to load ",),
    "torchao.kernel.intmm": ("Detected no triton",),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
}
_CUDA_ONLY = ("torchao", "torchao.kernel.intmm")


class _DropKnown(logging.Filter):
    def __init__(self, logger_name: str, fragments: tuple[str, ...]):
        super().__init__()
        self.logger_name, self.fragments = logger_name, fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not any(f in message for f in self.fragments):
            return True
        if self.logger_name in _CUDA_ONLY:
            torch = sys.modules.get("torch")  # torchao imports torch first: no import here
            return bool(torch is not None and torch.cuda.is_available())
        return False


def install() -> None:
    """Idempotent: add the filters once per process (before torchao is imported, or they come too late)."""
    # PEFT 0.21 still asks transformers 5 for the old property name whenever it wraps or loads a model
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    for name, fragments in _KNOWN.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) for f in logger.filters):
            logger.addFilter(_DropKnown(name, fragments))
