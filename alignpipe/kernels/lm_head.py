"""A compact LM head for TRL trainers on devices without Triton (CPU): score only the positions that have a label.

TRL (1.16) patches every trainer's model with a fused, chunked LM head (`trl.trainer.utils.add_fused_lm_head`). On
CUDA it runs Triton kernels over the labelled positions only. Without Triton it scores *every* position (prompt and
padding too, to keep tile shapes fixed for compilers), folds each [tokens, 32768] tile with a dozen fp32 torch ops
and redoes the projection in fp32 in the backward, so on CPU the head costs a large share of each training step.

`use_compact_lm_head(trainer)` wraps the forward TRL installed: a call with `fused_lm_head=True` on a CPU model runs
the backbone, projects only the positions whose label is not -100 (in the autocast dtype, like the model's own head),
and takes the log-softmax of those rows in fp32, returning TRL's `FusedCausalLMOutput` with the same fields, zeros
at ignored positions and autograd through log-probabilities and entropy. Everything else (generation, GPUs, logit
soft-capping or scaling, MoE router losses) goes to TRL's forward unchanged. On only where `alignpipe.kernels`
selects `compact_lm_head`.
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
    log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = _RowStats.apply(logits, targets, temperature)
    return {"log_probs": log_probs, "entropy": entropy, "log_sum_sq_probs": log_sum_sq_probs,
            "mean_logits": mean_logits, "is_top1": is_top1}


# fp32 elements per row chunk (16 MB): a chunk's few [rows, vocab] temporaries stay small beside the logits
_CHUNK_ELEMENTS = 1 << 22


class _RowStats(torch.autograd.Function):
    """log p(target) and the entropy of softmax(logits / temperature), row by row, in fp32 chunks of rows.

    Plain torch ops would keep several fp32 [rows, vocab] tensors for the backward (log-softmax, its exp for the
    entropy) and make more at the step's memory peak, the end of the forward, where every activation of the
    backbone is still held. This keeps only the logits (in their own dtype) and recomputes each chunk's
    log-softmax in the backward. It runs the plain ops' own kernels on each chunk (log-softmax and its backward
    are row-wise), so where the entropy gets no gradient (SFT, DPO, KTO) the gradients are those of the plain ops
    bit for bit, and a training run takes the same steps.
    """

    @staticmethod
    def forward(ctx, logits, targets, temperature):
        rows = logits.shape[0]
        log_probs, entropy, log_sum_sq, mean_logits = (
            torch.empty(rows, dtype=torch.float32, device=logits.device) for _ in range(4))
        is_top1 = torch.empty(rows, dtype=torch.bool, device=logits.device)
        step = _chunk_rows(logits)
        for s in range(0, rows, step):
            z = _scaled(logits[s:s + step], temperature)
            t = targets[s:s + len(z)]
            is_top1[s:s + len(z)] = z.argmax(-1) == t  # the first maximum: a tie before the target is no hit
            mean_logits[s:s + len(z)] = z.mean(-1)
            log_p = torch.log_softmax(z, dim=-1)
            del z
            log_probs[s:s + len(log_p)] = log_p.gather(-1, t.unsqueeze(-1)).squeeze(-1)
            p = log_p.exp()
            entropy[s:s + len(log_p)] = -(p * log_p).sum(-1)
            log_sum_sq[s:s + len(log_p)] = p.square_().sum(-1).log()
        ctx.save_for_backward(logits, targets)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(log_sum_sq, mean_logits, is_top1)  # as TRL marks them
        return log_probs, entropy, log_sum_sq, mean_logits, is_top1

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, *_):
        logits, targets = ctx.saved_tensors
        grad = torch.empty_like(logits)
        with_entropy = bool(grad_entropy.any())  # SFT, DPO and KTO leave it at zero
        step = _chunk_rows(logits)
        for s in range(0, logits.shape[0], step):
            log_p = torch.log_softmax(_scaled(logits[s:s + step], ctx.temperature), dim=-1)
            rows = slice(s, s + len(log_p))
            g_lp = grad_log_probs[rows].unsqueeze(-1)
            # d/d log p of log p_t: onehot(t) (gather's backward); of the entropy -sum p log p: -p (1 + log p)
            g = torch.zeros_like(log_p).scatter_add_(-1, targets[rows].unsqueeze(-1), g_lp)
            if with_entropy:
                g.sub_(log_p.exp().mul_(log_p + 1).mul_(grad_entropy[rows].unsqueeze(-1)))
            g = torch._log_softmax_backward_data(g, log_p, -1, log_p.dtype)
            if ctx.temperature != 1.0:
                g.div_(ctx.temperature)
            grad[rows] = g
        return grad, None, None


def _chunk_rows(logits: torch.Tensor) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, logits.shape[-1]))


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """`logits.float() / temperature`, as the plain ops compute it."""
    z = logits.float()
    return z if temperature == 1.0 else z / temperature


def _fused_output(**fields):
    from trl.trainer.utils import FusedCausalLMOutput

    return FusedCausalLMOutput(**fields)
