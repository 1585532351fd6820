"""A compact LM head for TRL trainers on devices without Triton (CPU): score only the positions that have a label.

TRL (1.16) patches every trainer's model with a fused, chunked LM head (`trl.trainer.utils.add_fused_lm_head`). On
CUDA it runs Triton kernels over the labelled positions only. Without Triton it scores *every* position (prompt and
padding too, to keep tile shapes fixed for compilers), folds each [tokens, 32768] tile with a dozen fp32 torch ops
and redoes the projection in fp32 in the backward: on the demo's 2-core CPU that head took ~55% of each SFT step.

`use_compact_lm_head(trainer)` wraps the forward TRL installed: a call with `fused_lm_head=True` on a CPU model runs
the backbone, projects only the positions whose label is not -100 (in the autocast dtype, like the model's own head),
and takes the log-softmax of those rows in fp32, returning TRL's `FusedCausalLMOutput` with the same fields, zeros
at ignored positions and autograd through log-probabilities and entropy. Everything else (generation, GPUs, logit
soft-capping or scaling, MoE router losses) goes to TRL's forward unchanged.
"""

from __future__ import annotations

import functools
import types

import torch

# Config fields that change the logits in ways this head does not reproduce: those models keep TRL's head.
_UNSUPPORTED_CONFIG = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                       "logits_scaling", "output_router_logits")


def use_compact_lm_head(trainer) -> None:
    """Wrap the fused LM head TRL put on `trainer.model` (and on its `ref_model`, where it has one)."""
    from peft import PeftModel

    temperature = float(getattr(trainer, "temperature", 1.0) or 1.0)
    fp32_head = bool(getattr(trainer.args, "cast_lm_head_to_fp32", False))
    for model in (trainer.model, getattr(trainer, "ref_model", None)):
        if isinstance(model, PeftModel):
            model = model.get_base_model()
        if model is not None:
            compact_lm_head(model, temperature, fp32_head)


def compact_lm_head(model, temperature: float = 1.0, fp32_head: bool = False) -> bool:
    """Wrap the fused forward `trl.trainer.utils.add_fused_lm_head` put on `model`; False where there is none to wrap
    (or it is wrapped already, or the model's logits need what this head does not do)."""
    trl_forward = vars(model).get("forward")  # TRL sets the fused forward on the instance
    config = model.config.get_text_config()
    if (trl_forward is None or getattr(trl_forward, "_alignpipe_compact", False)
            or any(getattr(config, name, None) for name in _UNSUPPORTED_CONFIG)):
        return False

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        head = self.get_output_embeddings()
        if not fused_lm_head or head.weight.device.type != "cpu" or kwargs.get("output_router_logits"):
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        mask = labels != -100
        outputs = _score(head, hidden[mask], labels[mask], temperature, fp32_head)
        per_token = {name: None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x)
                     for name, x in outputs.items()}
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -per_token["log_probs"].sum() / count
        return _fused_output(loss=loss, label_mask=mask, **per_token)

    forward._alignpipe_compact = True
    model.forward = types.MethodType(forward, model)
    return True


def _score(head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float, fp32_head: bool) -> dict:
    """Per-row log-probability of `targets` and the distribution's statistics, for labelled rows only."""
    if fp32_head:  # TRL's `cast_lm_head_to_fp32`: the projection itself in fp32, outside autocast
        with torch.autocast(hidden.device.type, enabled=False):
            bias = None if head.bias is None else head.bias.float()
            logits = torch.nn.functional.linear(hidden.float(), head.weight.float(), bias)
    else:
        logits = head(hidden)  # the autocast dtype, like the model's own head
    z = logits.float() if temperature == 1.0 else logits.float() / temperature
    log_p = torch.log_softmax(z, dim=-1)
    log_probs = log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    p = log_p.exp()
    entropy = -(p * log_p).sum(-1)
    with torch.no_grad():  # TRL marks these three non-differentiable
        is_top1 = z.argmax(-1) == targets  # argmax takes the first maximum: a tie before the target is no hit
        log_sum_sq_probs = p.square().sum(-1).log()
        mean_logits = z.mean(-1)
    return {"log_probs": log_probs, "entropy": entropy, "log_sum_sq_probs": log_sum_sq_probs,
            "mean_logits": mean_logits, "is_top1": is_top1}


def _fused_output(**fields):
    from trl.trainer.utils import FusedCausalLMOutput

    return FusedCausalLMOutput(**fields)
