"""Hardware-specific speed-ups, behind one switch: a compact LM head and a recomputing SwiGLU for training, fused
int8 linears for CPU inference. Each is on only where it was measured to help: `compute.kernels: auto` enables a
kernel on a CPU that has every flag it was measured with (GPUs keep the libraries' own kernels), `off` keeps the
libraries' plain modules everywhere.
"""

from __future__ import annotations

from alignpipe.kernels.int8_cpu import FBGEMM_FLAGS, cpu_flags

__all__ = ["KERNELS", "apply_training_kernels", "cpu_flags", "select"]

# kernel name -> the /proc/cpuinfo flags it was measured to help on
KERNELS: dict[str, tuple[str, ...]] = {
    "compact_lm_head": ("avx512_bf16",),     # bf16 autocast training on CPU: TRL's Triton-less head is the slow part
    "recomputing_swiglu": ("avx512_bf16",),  # the same bf16 CPU training: less memory at the step's peak
    "int8_fbgemm": FBGEMM_FLAGS,             # ("avx2",): fused int8 linears beat torchao's eager path
}

SETTINGS = ("auto", "off")


def select(setting: str, *, use_gpu: bool, flags: frozenset[str] | None = None) -> frozenset[str]:
    """The kernels to enable.

    Args:
        setting: `compute.kernels`: "auto" or "off".
        use_gpu: The work runs on a GPU (then "auto" enables none: the libraries' GPU kernels stay).
        flags: CPU flags to decide on; default this machine's (`cpu_flags()`).

    Returns:
        Names from `KERNELS`.
    """
    if setting not in SETTINGS:
        raise ValueError(f"kernels={setting!r}: use auto or off")
    if setting == "off" or use_gpu:
        return frozenset()
    flags = cpu_flags() if flags is None else flags
    return frozenset(name for name, needed in KERNELS.items() if set(needed) <= flags)


def apply_training_kernels(trainer, enabled: frozenset[str]) -> list[str]:
    """Put the enabled training kernels on a TRL trainer's model (and its reference model).

    Args:
        trainer: A TRL trainer, after construction (TRL has installed its fused LM head).
        enabled: Names from `select`; `int8_fbgemm` is an inference kernel and is ignored here.

    Returns:
        The names applied, in `KERNELS` order.
    """
    applied = []
    if "compact_lm_head" in enabled:
        from alignpipe.kernels.lm_head import use_compact_lm_head

        use_compact_lm_head(trainer)
        applied.append("compact_lm_head")
    if "recomputing_swiglu" in enabled:
        from alignpipe.kernels.swiglu import use_recomputing_swiglu

        use_recomputing_swiglu(trainer.model)
        applied.append("recomputing_swiglu")
    return applied
