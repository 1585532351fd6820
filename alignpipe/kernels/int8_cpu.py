"""Run a saved torchao int8-dynamic model on CPU through PyTorch's fused dynamic-quantized linear (fbgemm).

torchao's eager int8 path quantizes activations and rescales outputs in a dozen Python-dispatched ops per
linear call, which on CPU decodes slower than fp32. PyTorch's `quantized::linear_dynamic` does the same work
in one fused kernel. The swap keeps the stored int8 weights and per-channel scales bit for bit; only the
activations are quantized differently: per tensor (asymmetric, 7 bits) instead of per token (symmetric).

Per-tensor scales fail where a few tokens carry activations far above the rest, and every row of a batch
(padding, finished sequences) shares the scale: in a Llama block that is worst at the input of `down_proj` (the
MLP's "massive activations" of attention-sink tokens), then of `o_proj`. So the layers named in
`per_token_modules` keep per-token accuracy: fusing those too cost exact match on the demo task. They keep
torchao's per-token int8 path where the CPU has VNNI; on AVX2-only CPUs, where that path is slower than fp32, they
run as fp32 linears with their int8 weights dequantized once (`per_token_in_int8`).

`resolve_cpu_kernel` picks the path for the machine that runs the model (`quantize.cpu_kernel: auto` = fbgemm on
every CPU fbgemm has kernels for: AVX2 and up). Without VNNI torchao's path decodes slower than fp32 (its `_int_mm`
has no int8 dot-product instruction, and its dozen small ops per linear gain little from a second thread); the fused
linears bring int8 back to fp32's speed there. `cpu_flags` reads the CPU features (capped as the libraries are, see
`isa_cap`), here once for the whole `alignpipe.kernels` package.

Imports only torch and torchao: the registered pyfunc ships this file (`code_paths`) to serve the same runtime.
"""

from __future__ import annotations


def is_int8_dynamic(folder: str, here: bool = True) -> bool:
    """True for a saved torchao int8-dynamic model; with `here`, only on a machine without CUDA (where it helps)."""
    import json
    from pathlib import Path

    config = json.loads((Path(folder) / "config.json").read_text()).get("quantization_config") or {}
    if "Int8DynamicActivationInt8WeightConfig" not in json.dumps(config):
        return False
    if not here:
        return True
    import torch

    return not torch.cuda.is_available()


PER_TOKEN_MODULES = ("down_proj", "o_proj")

# /proc/cpuinfo flags the fused int8 linears need and were measured to beat torchao's path on: fbgemm's kernels
# are AVX2 (AVX-512 and VNNI where present); below AVX2 it has only reference code
FBGEMM_FLAGS = ("avx2",)
# ... and those on which `per_token_modules` stay on torchao's per-token int8 path (as measured with VNNI); without
# them that path is slower than an fp32 matmul of the dequantized weights
PER_TOKEN_INT8_FLAGS = ("avx512_vnni",)


# Environment variables that cap the instruction set the libraries use (read once, when torch loads), and the
# values that cap it below AVX-512: an AVX-512 host so capped computes like an AVX2-only one
ISA_CAP_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "FBGEMM_ENABLE_INSTRUCTIONS")
BELOW_AVX512 = ("default", "sse41", "sse4_2", "avx", "avx2", "avx2_vnni", "avx2_vnni_2")


def isa_cap(environ=None) -> str | None:
    """The first `ISA_CAP_VARS` setting that caps the instruction set below AVX-512, as "NAME=value", or None.

    Args:
        environ: The environment to read; default this process's.
    """
    import os

    environ = os.environ if environ is None else environ
    for name in ISA_CAP_VARS:
        value = environ.get(name, "")
        if value.strip().lower() in BELOW_AVX512:
            return f"{name}={value}"
    return None


def cpu_flags(cpuinfo: str | None = None, environ=None) -> frozenset[str]:
    """The CPU feature flags the libraries can use: the "flags" line of /proc/cpuinfo (or of `cpuinfo` text given),
    less every avx512* and amx* flag where the environment caps the instruction set below AVX-512 (`isa_cap`).

    Args:
        cpuinfo: /proc/cpuinfo text to parse instead of this machine's.
        environ: The environment whose cap applies; default this process's for this machine's flags, and no cap
            for `cpuinfo` text.

    Returns:
        The flags; empty where there is no such line or the file cannot be read (not Linux, not x86).
    """
    import os

    if cpuinfo is None:
        environ = os.environ if environ is None else environ
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return frozenset()
    flags: frozenset[str] = frozenset()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            flags = frozenset(value.split())
            break
    if environ is not None and isa_cap(environ):
        flags = frozenset(f for f in flags if not f.startswith(("avx512", "amx")))
    return flags


def resolve_cpu_kernel(setting: str, kernels: str = "auto", flags: frozenset[str] | None = None) -> str:
    """How an int8-dynamic model runs on this CPU: "fbgemm" (fused linears) or "torchao" (its own path).

    Args:
        setting: `quantize.cpu_kernel`: "fbgemm" or "torchao" win as given; "auto" = fbgemm where the CPU has
            every flag in `FBGEMM_FLAGS`.
        kernels: `compute.kernels`; "off" turns "auto" into torchao.
        flags: CPU flags to decide on; default this machine's (`cpu_flags()`).

    Returns:
        "fbgemm" or "torchao".
    """
    if setting in ("fbgemm", "torchao"):
        return setting
    if setting != "auto":
        raise ValueError(f"cpu_kernel={setting!r}: use auto, fbgemm or torchao")
    if kernels == "off":
        return "torchao"
    flags = cpu_flags() if flags is None else flags
    return "fbgemm" if set(FBGEMM_FLAGS) <= flags else "torchao"


def per_token_in_int8(flags: frozenset[str] | None = None) -> bool:
    """Whether the `per_token_modules` keep torchao's int8 per-token path (True) or compute in fp32 (False).

    Where the CPU has every flag in `PER_TOKEN_INT8_FLAGS` torchao's `_int_mm` uses int8 dot products (the
    measured default); elsewhere (AVX2 only) its path is slower than a plain fp32 matmul of the same int8 weights
    dequantized once, which is also closer to the original model (no activation rounding at all).

    Args:
        flags: CPU flags to decide on; default this machine's (`cpu_flags()`).
    """
    flags = cpu_flags() if flags is None else flags
    return set(PER_TOKEN_INT8_FLAGS) <= flags


def use_fbgemm_linears(model, per_token_modules=PER_TOKEN_MODULES, flags: frozenset[str] | None = None) -> int:
    """Replace every linear whose weight is a torchao `Int8Tensor` (dynamic activations) in place.

    Linears whose attribute name is in `per_token_modules` keep per-token accuracy: on torchao's per-token path
    where `per_token_in_int8(flags)`, else as fp32 linears holding their int8 weights dequantized (more memory
    for those layers, none on disk). The model must run in float32 (the fused kernel takes fp32 activations).
    Returns how many were replaced by fused linears.
    """
    import warnings

    import torch
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torchao.quantization import Int8Tensor

    keep_int8 = per_token_in_int8(flags)
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            w = getattr(child, "weight", None)
            if not (isinstance(child, torch.nn.Linear) and isinstance(w, Int8Tensor) and w.act_quant_kwargs):
                continue
            if name in per_token_modules:
                if not keep_int8:
                    child.weight = torch.nn.Parameter(w.dequantize(torch.float32), requires_grad=False)
                continue
            rows = w.qdata.shape[0]
            # torch.ao.nn.quantized and its qint8 tensors are deprecated in favour of torchao (pytorch#184982), which
            # has no fused per-channel int8 CPU kernel yet: use them without the warning they print for every layer
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scale = w.scale.reshape(rows)
                qweight = torch.quantize_per_channel(w.qdata.float() * scale.reshape(rows, 1).float(), scale.double(),
                                                     torch.zeros(rows, dtype=torch.long), 0, torch.qint8)
                fused = DynamicLinear(child.in_features, child.out_features, bias_=child.bias is not None,
                                      dtype=torch.qint8)
            bias = child.bias.detach().float() if child.bias is not None else None
            fused.set_weight_bias(qweight, bias)
            setattr(parent, name, fused)
            swapped += 1
    return swapped
