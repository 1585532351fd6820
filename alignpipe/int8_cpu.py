"""Run a saved torchao int8-dynamic model on CPU through PyTorch's fused dynamic-quantized linear (fbgemm).

torchao's eager int8 path quantizes activations and rescales outputs in a dozen Python-dispatched ops per
linear call, which on CPU decodes slower than fp32. PyTorch's `quantized::linear_dynamic` does the same work
in one fused kernel. The swap keeps the stored int8 weights and per-channel scales bit for bit; only the
activations are quantized differently: per tensor (asymmetric, 7 bits) instead of per token (symmetric).

Per-tensor scales fail where a few tokens carry activations far above the rest, and every row of a batch
(padding, finished sequences) shares the scale: in a Llama block that is worst at the input of `down_proj` (the
MLP's "massive activations" of attention-sink tokens), then of `o_proj`. So the layers named in
`per_token_modules` keep torchao's per-token path. Measured on demo models, batch 16, 2026-12-01 (see the
README's int8 section): every linear fused, exact match 0.565 where fp32 scored 0.825; `down_proj` kept, 0.820
on 200 rows but 0.688 on a 64-row subset where fp32 scored 0.797; `down_proj` and `o_proj` kept, 0.845 and 0.812.

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
                qweight = torch._make_per_channel_quantized_tensor(
                    w.qdata.contiguous(), w.scale.reshape(rows).double(), torch.zeros(rows, dtype=torch.long), 0)
                fused = DynamicLinear(child.in_features, child.out_features, bias_=child.bias is not None,
                                      dtype=torch.qint8)
            bias = child.bias.detach().float() if child.bias is not None else None
            fused.set_weight_bias(qweight, bias)
            setattr(parent, name, fused)
            swapped += 1
    return swapped
