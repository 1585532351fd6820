from pathlib import Path

import pytest
import torch

from alignpipe.kernels.int8_cpu import isa_cap
from alignpipe.models import EAGER_MAX_TOKENS, choose_precision, dtype_for, precision_choice, training_attention

AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma avx512f\nbugs\t\t: spectre_v1\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"


def test_auto_attention_is_eager_only_on_cpu_for_short_rows():
    assert training_attention("auto", on_gpu=False, longest=EAGER_MAX_TOKENS) == "eager"
    assert training_attention("auto", on_gpu=False, longest=EAGER_MAX_TOKENS + 1) == "sdpa"  # scores grow as len²
    assert training_attention("auto", on_gpu=True, longest=80) == "sdpa"  # fused GPU kernels
    assert training_attention("sdpa", on_gpu=False, longest=80) == "sdpa"  # an explicit choice wins
    assert training_attention("eager", on_gpu=True, longest=4096) == "eager"


def test_precision_auto_says_which_cpu_flags_or_cuda_decided():
    dtype, why = choose_precision("auto", None, SAPPHIRE)
    assert dtype == "bfloat16" and "avx512_bf16, amx_bf16" in why and "no CUDA" in why
    dtype, why = choose_precision("auto", None, AVX2_ONLY)
    assert dtype == "float32" and "lacks avx512_bf16 and amx_bf16" in why
    # a flag name inside another word, or outside the flags line, is not the flag
    assert choose_precision("auto", None, "model name\t: not avx512_bf16\nflags\t: avx512_bf16x\n")[0] == "float32"
    assert choose_precision("auto", None, None) == (
        "float32", "precision: auto -> float32 (no CUDA; /proc/cpuinfo unreadable, so no native bf16 known)")
    assert choose_precision("auto", ("NVIDIA H100", True), AVX2_ONLY) == (
        "bfloat16", "precision: auto -> bfloat16 (CUDA NVIDIA H100 supports bf16)")  # a GPU: CPU flags do not count
    assert choose_precision("auto", ("Tesla T4", False), SAPPHIRE)[0] == "float32"
    assert choose_precision("fp32", ("NVIDIA H100", True), SAPPHIRE) == (
        "float32", "precision: fp32 -> float32 (set in the config)")
    assert choose_precision("bf16", None, AVX2_ONLY)[0] == "bfloat16"


def test_precision_choice_on_this_machine_matches_dtype_for():
    dtype, why = precision_choice("auto")
    assert dtype == dtype_for("auto") and why.startswith(f"precision: auto -> {dtype} (")
    cpuinfo = Path("/proc/cpuinfo")
    if "no CUDA" in why and cpuinfo.is_file() and not isa_cap():  # the CPU flags decided: the ones it names are this CPU's
        words = cpuinfo.read_text().split()
        assert (dtype == "bfloat16") == ("avx512_bf16" in words or "amx_bf16" in words)


def test_precision_auto_on_a_capped_isa_is_fp32_and_says_which_variable_capped_it():
    dtype, why = choose_precision("auto", None, SAPPHIRE, {"ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert dtype == "float32"
    assert "ONEDNN_MAX_CPU_ISA=AVX2 caps the instruction set" in why and "avx512_bf16, amx_bf16 go unused" in why
    assert choose_precision("auto", None, SAPPHIRE, {"ATEN_CPU_CAPABILITY": "avx512"})[0] == "bfloat16"
    assert choose_precision("auto", None, SAPPHIRE)[0] == "bfloat16"  # no environment given: no cap
    # a host without bf16 says what it lacks, capped or not
    assert "lacks" in choose_precision("auto", None, AVX2_ONLY, {"ATEN_CPU_CAPABILITY": "avx2"})[1]


def test_precision_choice_reads_the_cap_from_this_process(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU decides precision: auto, not the CPU flags")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert precision_choice("auto")[0] == "float32"  # no CUDA here: the CPU flags decide, capped at AVX2
