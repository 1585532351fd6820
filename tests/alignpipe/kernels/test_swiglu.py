"""The recomputing SwiGLU gives the plain MLP's values and gradients and keeps less for the backward."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

from alignpipe.kernels.swiglu import is_swiglu_mlp, use_recomputing_swiglu
from alignpipe.models import load_model


def _batch(vocab: int):
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (2, 16), generator=g)
    return {"input_ids": input_ids, "labels": input_ids}


def _grads(model, batch, dtype=None):
    model.zero_grad()
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _saved_bytes(model, batch) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward, other than the weights."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch).loss
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_same_values_and_gradients_as_the_plain_mlp(tiny_model, dtype):
    model = load_model(tiny_model)
    batch = _batch(model.config.vocab_size)
    plain_loss, plain = _grads(model, batch, dtype)
    assert use_recomputing_swiglu(model) == model.config.num_hidden_layers
    loss, ours = _grads(model, batch, dtype)
    exact = {"atol": 0.0, "rtol": 0.0}  # bit for bit: a training run must take the same steps
    torch.testing.assert_close(loss, plain_loss, **exact)
    assert ours.keys() == plain.keys() and plain
    for name, grad in plain.items():
        torch.testing.assert_close(ours[name], grad, msg=name, **exact)


def test_keeps_one_intermediate_activation_less_per_layer_under_lora(tiny_model):
    model = get_peft_model(load_model(tiny_model), LoraConfig(r=4, target_modules="all-linear"))
    batch = _batch(model.config.vocab_size)
    plain = _saved_bytes(model, batch)
    assert use_recomputing_swiglu(model) == model.config.num_hidden_layers
    assert use_recomputing_swiglu(model) == 0  # swapped once only
    c = model.config
    tokens = batch["input_ids"].numel()
    # silu(gate(x)) in fp32 is no longer kept, in every layer
    assert plain - _saved_bytes(model, batch) == c.num_hidden_layers * tokens * c.intermediate_size * 4


def test_other_mlps_keep_their_forward():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))  # GELU, c_fc / c_proj
    assert not any(is_swiglu_mlp(m) for m in model.modules())
    assert use_recomputing_swiglu(model) == 0
