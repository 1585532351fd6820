"""Preference metrics on held-out pairs: how often a model prefers the chosen answer, and its DPO reward margin.

- preference accuracy: share of pairs where the MEAN per-token log-prob of the chosen answer exceeds the
  rejected one's (length-normalised, so a short rejected answer gets no free win);
- reward margin: mean DPO implicit reward margin against a reference model,
  beta * ((logp_c - ref_c) - (logp_r - ref_r)) with SUMMED answer log-probs (as DPO trains it).
"""

from __future__ import annotations

import inspect
from typing import Any

from alignpipe import chat


def answer_logps(model, tokenizer, prompts: list[list[dict]], answers: list[list[dict]],
                 batch_size: int = 8) -> list[tuple[float, int]]:
    """Summed log-prob and token count of each answer (its text and end-of-turn) given its prompt.

    The prompt is rendered with the generation prompt and the answer is what the chat template adds after
    it, tokenized separately and concatenated: the same split DPO training uses.
    """
    seqs = []
    for prompt, answer in zip(prompts, answers):
        head = chat.render(tokenizer, prompt, add_generation_prompt=True)
        full = chat.render(tokenizer, prompt + answer)
        tail = full[len(head):] if full.startswith(head) else "".join(m["content"] for m in answer)
        seqs.append((tokenizer(head, add_special_tokens=False)["input_ids"],
                     tokenizer(tail.rstrip("\n"), add_special_tokens=False)["input_ids"]))
    # Sorted by prompt length: each batch's answers then sit in a narrow band of positions, and only those
    # positions go through the vocabulary projection (`_batch_logps`). Results come back in the callers' order.
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i][0]), len(seqs[i][1])))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(seqs)
    pad = tokenizer.pad_token_id
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        for i, value in zip(idx, _batch_logps(model, [seqs[i] for i in idx], pad)):
            out[i] = value
    return out


def _batch_logps(model, batch: list[tuple[list[int], list[int]]], pad: int) -> list[tuple[float, int]]:
    """One forward pass over right-padded (prompt, answer) rows, with vocabulary logits only at the positions that
    predict an answer token (`logits_to_keep` as positions): the prompt positions' logits were most of the work."""
    import torch

    width = max(len(p) + len(a) for p, a in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    attention = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for j, (p, a) in enumerate(batch):  # right padding: positions match an unpadded forward pass
        n = len(p) + len(a)
        ids[j, :n] = torch.tensor(p + a)
        attention[j, :n] = 1
        labels[j, len(p) : n] = torch.tensor(a)
    ids, attention, labels = (t.to(model.device) for t in (ids, attention, labels))  # CUDA where the model is
    target = labels[:, 1:]                       # logits at position t predict the token at t + 1
    keep = (target != -100).any(0).nonzero().squeeze(-1)
    with torch.inference_mode():
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            logits = model(input_ids=ids, attention_mask=attention, logits_to_keep=keep).logits
        else:                                    # an older or custom model: every position, then select
            logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1][:, keep]
    target = target[:, keep]
    mask = target != -100
    logps = torch.log_softmax(logits.float(), dim=-1)
    picked = logps.gather(2, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    return [(float(s), int(n)) for s, n in zip(picked.sum(1), mask.sum(1))]


def pair_logps(model, tokenizer, pairs: list[dict[str, Any]], system_prompt: str | None,
               batch_size: int = 8) -> dict[str, list[tuple[float, int]]]:
    """Summed log-prob and token count of every pair's chosen and of its rejected answer under `model`."""
    prompts = [chat.with_system(p["prompt"], system_prompt) for p in pairs]
    return {side: answer_logps(model, tokenizer, prompts, [p[side] for p in pairs], batch_size)
            for side in ("chosen", "rejected")}


def metrics_from_logps(policy: dict[str, list[tuple[float, int]]], beta: float,
                       reference: dict[str, list[tuple[float, int]]] | None = None) -> dict[str, float]:
    """Preference accuracy and mean log-probs from `pair_logps`; with the reference's, the DPO reward margin."""
    chosen, rejected = policy["chosen"], policy["rejected"]
    n = max(len(chosen), 1)
    out = {
        "preference_accuracy": sum(c / max(nc, 1) > r / max(nr, 1) for (c, nc), (r, nr) in zip(chosen, rejected)) / n,
        "logp_chosen": sum(c / max(nc, 1) for c, nc in chosen) / n,
        "logp_rejected": sum(r / max(nr, 1) for r, nr in rejected) / n,
    }
    if reference is not None:
        ref_c, ref_r = reference["chosen"], reference["rejected"]
        if len(ref_c) != len(chosen):
            raise ValueError(f"reference log-probs cover {len(ref_c)} pairs, the policy's {len(chosen)}")
        margins = [beta * ((c - rc) - (r - rr)) for (c, _), (rc, _), (r, _), (rr, _) in zip(chosen, ref_c, rejected, ref_r)]
        out["reward_margin"] = sum(margins) / n
        out["reward_accuracy"] = sum(m > 0 for m in margins) / n
    return out


def preference_metrics(model, tokenizer, pairs: list[dict[str, Any]], system_prompt: str | None, beta: float,
                       reference=None, batch_size: int = 8) -> dict[str, float]:
    """Preference accuracy (and, with a reference model, the mean DPO reward margin) on canonical pairs.

    Args:
        model: The policy to score.
        tokenizer: Its tokenizer (chat template applied).
        pairs: Canonical preference rows (`prompt`, `chosen`, `rejected`).
        system_prompt: Added to prompts without a system turn, as in training.
        beta: DPO temperature of the implicit reward.
        reference: The reference model (same tokenizer); without it only the accuracy is computed.
        batch_size: Sequences per forward pass.

    Returns:
        {"preference_accuracy": ..., "logp_chosen": ..., "logp_rejected": ...} plus "reward_margin" and
        "reward_accuracy" (share of pairs with a positive margin) when a reference is given.
    """
    policy = pair_logps(model, tokenizer, pairs, system_prompt, batch_size)
    ref = pair_logps(reference, tokenizer, pairs, system_prompt, batch_size) if reference is not None else None
    return metrics_from_logps(policy, beta, ref)
