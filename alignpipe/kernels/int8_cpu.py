"""Run a saved torchao int8-dynamic model on CPU through PyTorch's fused dynamic-quantized linear (fbgemm).

torchao's eager int8 path quantizes activations and rescales outputs in a dozen Python-dispatched ops per
linear call, which on CPU decodes slower than fp32. PyTorch's `quantized::linear_dynamic` does the same work
in one fused kernel. The swap keeps the stored int8 weights and per-channel scales bit for bit; only the
activations are quantized differently: per tensor (asymmetric, 7 bits) instead of per token (symmetric).

Per-tensor scales fail where a few tokens carry activations far above the rest, and every row of a batch
(padding, finished sequences) shares the scale: in a Llama block that is worst at the input of `down_proj` (the
MLP's "massive activations" of attention-sink tokens), then of `o_proj`. So the layers named in
`per_token_modules` keep torchao's per-token path: fusing those too cost exact match on the demo task.

`resolve_cpu_kernel` picks the path for the machine that runs the model (`quantize.cpu_kernel: auto` = fbgemm only
on CPUs with the VNNI int8 instructions it was measured on); `cpu_flags` reads those CPU features, here once for the
whole `alignpipe.kernels` package.

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

# /proc/cpuinfo flags the fused int8 linears were measured to beat torchao's path on (VNNI: int8 dot products)
FBGEMM_FLAGS = ("avx512_vnni",)


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU feature flags of this machine (the "flags" line of /proc/cpuinfo), or of `cpuinfo` text given.

    Args:
        cpuinfo: /proc/cpuinfo text to parse instead of this machine's.

    Returns:
        The flags; empty where there is no such line or the file cannot be read (not Linux, not x86).
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


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


def use_fbgemm_linears(model, per_token_modules=PER_TOKEN_MODULES) -> int:
    """Replace every linear whose weight is a torchao `Int8Tensor` (dynamic activations) in place.

    Linears whose attribute name is in `per_token_modules` stay on torchao's per-token path. The model must
    run in float32 (the fused kernel takes fp32 activations). Returns how many were replaced.
    """
    import warnings

    import torch
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torchao.quantization import Int8Tensor

    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            w = getattr(child, "weight", None)
            if not (isinstance(child, torch.nn.Linear) and isinstance(w, Int8Tensor) and w.act_quant_kwargs):
                continue
            if name in per_token_modules:
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
