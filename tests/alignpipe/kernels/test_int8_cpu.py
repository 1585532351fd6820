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
    ("auto", "auto", AVX2, "torchao"),
    ("auto", "auto", frozenset(), "torchao"),  # /proc/cpuinfo unreadable: the library's own path
    ("auto", "off", VNNI, "torchao"),          # compute.kernels off: no fused linears anywhere
    ("fbgemm", "auto", AVX2, "fbgemm"),        # an explicit choice wins over the flags...
    ("fbgemm", "off", AVX2, "fbgemm"),         # ... and over the switch
    ("torchao", "auto", VNNI, "torchao"),
])
def test_resolve_cpu_kernel(setting, kernels, flags, expected):
    assert resolve_cpu_kernel(setting, kernels, flags) == expected


def test_resolve_cpu_kernel_defaults_to_this_machine_and_refuses_unknown_settings():
    expected = "fbgemm" if "avx512_vnni" in cpu_flags() else "torchao"
    assert resolve_cpu_kernel("auto") == expected
    with pytest.raises(ValueError, match="auto, fbgemm or torchao"):
        resolve_cpu_kernel("onednn")


def test_imports_as_a_top_level_module_without_alignpipe(tmp_path):
    """The registered pyfunc ships this one file (`code_paths`) and imports it as `int8_cpu`."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import int8_cpu; "
            "assert not [m for m in sys.modules if m.split('.')[0] == 'alignpipe'], 'imports alignpipe'; "
            "print(int8_cpu.resolve_cpu_kernel('auto', 'auto', frozenset({'avx512_vnni'})))")
    out = subprocess.run([sys.executable, "-c", code, str(Path(int8_cpu.__file__).parent)], cwd=tmp_path,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "fbgemm"


def test_fused_linears_keep_the_per_token_layers_and_stay_close(tiny_model, tmp_path):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig

    quantized = AutoModelForCausalLM.from_pretrained(
        tiny_model, dtype=torch.float32, quantization_config=TorchAoConfig(Int8DynamicActivationInt8WeightConfig()))
    quantized.save_pretrained(tmp_path, safe_serialization=False)
    assert is_int8_dynamic(str(tmp_path), here=False) and not is_int8_dynamic(tiny_model, here=False)

    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    layers = quantized.config.num_hidden_layers
    with torch.inference_mode():
        torchao = quantized(ids).logits
        assert use_fbgemm_linears(quantized) == layers * 5  # 7 linears a layer; down_proj and o_proj keep theirs
        assert use_fbgemm_linears(quantized) == 0  # swapped once only
        layer = quantized.model.layers[0]
        assert {type(m.weight).__name__ for m in (layer.mlp.down_proj, layer.self_attn.o_proj)} == {"Int8Tensor"}
        fused = quantized(ids).logits
    # the same int8 weights; only the activations' scales differ (per tensor instead of per token)
    assert (fused - torchao).abs().mean() < 0.1 * torchao.abs().mean()
