"""The fbgemm int8 path: which hosts get it, that it stays a torch + torchao-only file, and what the swap does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignpipe.kernels import int8_cpu
from alignpipe.kernels.int8_cpu import cpu_flags, is_int8_dynamic, resolve_cpu_kernel, use_fbgemm_linears

VNNI = frozenset({"avx2", "avx512f", "avx512_vnni"})
AVX2 = frozenset({"avx2", "fma"})


@pytest.mark.parametrize("setting,kernels,flags,expected", [
    ("auto", "auto", VNNI, "fbgemm"),
    ("auto", "auto", AVX2, "fbgemm"),          # AVX2 only: torchao's path decodes several times slower than fp32
    ("auto", "auto", frozenset({"sse4_2", "avx"}), "torchao"),  # below AVX2 fbgemm has only reference code
    ("auto", "auto", frozenset(), "torchao"),  # /proc/cpuinfo unreadable: the library's own path
    ("auto", "off", AVX2, "torchao"),
    ("auto", "off", VNNI, "torchao"),          # compute.kernels off: no fused linears anywhere
    ("fbgemm", "auto", AVX2, "fbgemm"),        # an explicit choice wins over the flags...
    ("fbgemm", "off", AVX2, "fbgemm"),         # ... and over the switch
    ("torchao", "auto", VNNI, "torchao"),
])
def test_resolve_cpu_kernel(setting, kernels, flags, expected):
    assert resolve_cpu_kernel(setting, kernels, flags) == expected


def test_resolve_cpu_kernel_defaults_to_this_machine_and_refuses_unknown_settings():
    expected = "fbgemm" if "avx2" in cpu_flags() else "torchao"
    assert resolve_cpu_kernel("auto") == expected
    with pytest.raises(ValueError, match="auto, fbgemm or torchao"):
        resolve_cpu_kernel("onednn")


def test_imports_as_a_top_level_module_without_alignpipe(tmp_path):
    """The registered pyfunc ships this one file (`code_paths`) and imports it as `int8_cpu`."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import int8_cpu; "
            "assert not [m for m in sys.modules if m.split('.')[0] == 'alignpipe'], 'imports alignpipe'; "
            "print(int8_cpu.resolve_cpu_kernel('auto', 'auto', frozenset({'avx2'})), "
            "int8_cpu.isa_cap({'ONEDNN_MAX_CPU_ISA': 'AVX2'}))")
    out = subprocess.run([sys.executable, "-c", code, str(Path(int8_cpu.__file__).parent)], cwd=tmp_path,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "fbgemm ONEDNN_MAX_CPU_ISA=AVX2"


def _int8_tiny(tiny_model):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig

    return AutoModelForCausalLM.from_pretrained(
        tiny_model, dtype=torch.float32, quantization_config=TorchAoConfig(Int8DynamicActivationInt8WeightConfig()))


def test_fused_linears_keep_the_per_token_layers_and_stay_close(tiny_model, tmp_path):
    quantized = _int8_tiny(tiny_model)
    quantized.save_pretrained(tmp_path, safe_serialization=False)
    assert is_int8_dynamic(str(tmp_path), here=False) and not is_int8_dynamic(tiny_model, here=False)

    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    layers = quantized.config.num_hidden_layers
    with torch.inference_mode():
        torchao = quantized(ids).logits
        assert use_fbgemm_linears(quantized, flags=VNNI) == layers * 5  # 7 linears a layer; down_proj, o_proj keep theirs
        assert use_fbgemm_linears(quantized, flags=VNNI) == 0  # swapped once only
        layer = quantized.model.layers[0]
        assert {type(m.weight).__name__ for m in (layer.mlp.down_proj, layer.self_attn.o_proj)} == {"Int8Tensor"}
        fused = quantized(ids).logits
    # the same int8 weights; only the activations' scales differ (per tensor instead of per token)
    assert (fused - torchao).abs().mean() < 0.1 * torchao.abs().mean()


AVX2_HOST = "processor\t: 0\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu sse4_2 avx avx2 fma f16c\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile\n"


@pytest.mark.parametrize("environ,cap", [
    ({"ATEN_CPU_CAPABILITY": "avx2"}, "ATEN_CPU_CAPABILITY=avx2"),
    ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, "ONEDNN_MAX_CPU_ISA=AVX2"),
    ({"ONEDNN_MAX_CPU_ISA": "Avx2"}, "ONEDNN_MAX_CPU_ISA=Avx2"),  # case-insensitive, as the libraries read it
    ({"ATEN_CPU_CAPABILITY": "default"}, "ATEN_CPU_CAPABILITY=default"),  # below AVX2 is below AVX-512 too
])
def test_an_isa_cap_below_avx512_hides_the_avx512_and_amx_flags(environ, cap):
    assert int8_cpu.isa_cap(environ) == cap
    flags = cpu_flags(SAPPHIRE, environ)
    assert flags == {"fpu", "avx", "avx2", "fma"}
    # the int8 kernel decided as on a real AVX2 host (and precision: auto, see tests/alignpipe/test_models.py)
    assert resolve_cpu_kernel("auto", "auto", flags) == resolve_cpu_kernel("auto", "auto", cpu_flags(AVX2_HOST))


@pytest.mark.parametrize("environ", [{}, {"ATEN_CPU_CAPABILITY": "avx512"}, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"},
                                     {"ONEDNN_MAX_CPU_ISA": "ALL"}, {"PATH": "avx2"}])
def test_no_cap_or_a_cap_at_avx512_keeps_every_flag(environ):
    assert int8_cpu.isa_cap(environ) is None
    assert cpu_flags(SAPPHIRE, environ) == cpu_flags(SAPPHIRE)
    assert {"avx512_vnni", "amx_bf16"} <= cpu_flags(SAPPHIRE, environ)


def test_this_machines_flags_honour_the_cap_of_the_environment(monkeypatch):
    """`auto` decisions made here (int8 kernel, precision) see an emulated AVX2 host as a real one."""
    for name in int8_cpu.ISA_CAP_VARS:
        monkeypatch.delenv(name, raising=False)
    uncapped = cpu_flags()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert cpu_flags() == {f for f in uncapped if not f.startswith(("avx512", "amx"))}



def test_on_avx2_the_per_token_layers_run_their_int8_weights_in_fp32(tiny_model):
    """Without VNNI torchao's per-token path is slower than fp32: down_proj / o_proj get dequantized weights."""
    from torchao.quantization import Int8Tensor

    assert int8_cpu.per_token_in_int8(VNNI) and not int8_cpu.per_token_in_int8(AVX2)
    reference, quantized = _int8_tiny(tiny_model), _int8_tiny(tiny_model)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    layers = quantized.config.num_hidden_layers
    with torch.inference_mode():
        int8 = [reference.model.layers[0].mlp.down_proj.weight, reference.model.layers[0].self_attn.o_proj.weight]
        torchao = reference(ids).logits
        assert use_fbgemm_linears(quantized, flags=AVX2) == layers * 5
        layer = quantized.model.layers[0]
        for module, w in zip((layer.mlp.down_proj, layer.self_attn.o_proj), int8):
            assert type(module.weight) is torch.nn.Parameter and not isinstance(module.weight, Int8Tensor)
            assert module.weight.dtype == torch.float32
            assert torch.equal(module.weight, w.dequantize(torch.float32))  # the stored int8 values, rescaled
        fused = quantized(ids).logits
    assert (fused - torchao).abs().mean() < 0.1 * torchao.abs().mean()
