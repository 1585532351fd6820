"""A SwiGLU MLP that keeps two activations for the backward instead of four.

Llama-family MLPs compute `down(silu(gate(x)) * up(x))`. As plain autograd ops, the step keeps, per layer and
token, `gate(x)` (for SiLU's backward), `silu(gate(x))` and `up(x)` (for the product's) and the product (for
`down`'s weight or LoRA gradient): four [tokens, intermediate] tensors. `_SwiGLU` keeps `gate(x)` and `up(x)` and
recomputes the SiLU in the backward, a few elementwise ops per layer; the product is still kept by `down`.

That is one [tokens, intermediate] tensor less per layer at the step's memory peak, the end of the forward, where
every activation is held: LoRA's peak, since its frozen weights have no gradients or optimizer state.

`use_recomputing_swiglu(model)` swaps the forward of every MLP with exactly that shape (`gate_proj`, `up_proj`,
`down_proj`, a SiLU `act_fn`); others (GELU MLPs, fused `gate_up_proj`, MoE experts) keep theirs. Values and
gradients are those of the plain ops bit for bit (tests/alignpipe/kernels/test_swiglu.py), so a training run takes
the same steps with it as without. On only where `alignpipe.kernels` selects `recomputing_swiglu`.
"""

from __future__ import annotations

import types

import torch
from torch import nn


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up, saving its two inputs only."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return nn.functional.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        # the plain ops' own backward kernels, on a recomputed silu(gate): the same gradients, bit for bit
        grad_up = grad * nn.functional.silu(gate)
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return grad_gate, grad_up


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(_SwiGLU.apply(self.gate_proj(x), self.up_proj(x)))


def is_swiglu_mlp(module: nn.Module) -> bool:
    """An MLP whose forward is `down_proj(silu(gate_proj(x)) * up_proj(x))`, the Llama family's."""
    act = getattr(module, "act_fn", None)
    silu = isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"  # transformers' ACT2FN["silu"]
    return (type(module).__name__.endswith("MLP") and silu
            and all(isinstance(getattr(module, name, None), nn.Module)
                    for name in ("gate_proj", "up_proj", "down_proj"))
            and getattr(getattr(module, "config", None), "pretraining_tp", 1) == 1)


def use_recomputing_swiglu(model: nn.Module) -> int:
    """Swap the forward of every Llama-family MLP in `model` (a PEFT wrapper included); returns how many."""
    swapped = 0
    for module in model.modules():
        if is_swiglu_mlp(module) and vars(module).get("forward") is None:
            module.forward = types.MethodType(_forward, module)
            swapped += 1
    return swapped
