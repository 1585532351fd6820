"""Preference metrics on held-out pairs: how often a model prefers the chosen answer, and its DPO reward margin.

- preference accuracy: share of pairs where the MEAN per-token log-prob of the chosen answer exceeds the
  rejected one's (length-normalised, so a short rejected answer gets no free win);
- reward margin: mean DPO implicit reward margin against a reference model,
  beta * ((logp_c - ref_c) - (logp_r - ref_r)) with SUMMED answer log-probs (as DPO trains it).
"""

from __future__ import annotations

from typing import Any

from alignpipe import chat


def answer_logps(model, tokenizer, prompts: list[list[dict]], answers: list[list[dict]],
                 batch_size: int = 8) -> list[tuple[float, int]]:
    """Summed log-prob and token count of each answer (its text and end-of-turn) given its prompt.

    The prompt is rendered with the generation prompt and the answer is what the chat template adds after
    it, tokenized separately and concatenated: the same split DPO training uses.
    """
    import torch

    seqs = []
    for prompt, answer in zip(prompts, answers):
        head = chat.render(tokenizer, prompt, add_generation_prompt=True)
        full = chat.render(tokenizer, prompt + answer)
        tail = full[len(head):] if full.startswith(head) else "".join(m["content"] for m in answer)
        seqs.append((tokenizer(head, add_special_tokens=False)["input_ids"],
                     tokenizer(tail.rstrip("\n"), add_special_tokens=False)["input_ids"]))
    out: list[tuple[float, int]] = []
    pad = tokenizer.pad_token_id
    for start in range(0, len(seqs), batch_size):
        batch = seqs[start : start + batch_size]
        width = max(len(p) + len(a) for p, a in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for j, (p, a) in enumerate(batch):  # right padding: positions match an unpadded forward pass
            n = len(p) + len(a)
            ids[j, :n] = torch.tensor(p + a)
            attention[j, :n] = 1
            labels[j, len(p) : n] = torch.tensor(a)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=attention).logits.float()
        logps = torch.log_softmax(logits[:, :-1], dim=-1)
        target = labels[:, 1:]
        mask = target != -100
        picked = logps.gather(2, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
        out += [(float(s), int(n)) for s, n in zip(picked.sum(1), mask.sum(1))]
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
    prompts = [chat.with_system(p["prompt"], system_prompt) for p in pairs]
    chosen = answer_logps(model, tokenizer, prompts, [p["chosen"] for p in pairs], batch_size)
    rejected = answer_logps(model, tokenizer, prompts, [p["rejected"] for p in pairs], batch_size)
    n = max(len(pairs), 1)
    out = {
        "preference_accuracy": sum(c / max(nc, 1) > r / max(nr, 1) for (c, nc), (r, nr) in zip(chosen, rejected)) / n,
        "logp_chosen": sum(c / max(nc, 1) for c, nc in chosen) / n,
        "logp_rejected": sum(r / max(nr, 1) for r, nr in rejected) / n,
    }
    if reference is not None:
        ref_c = answer_logps(reference, tokenizer, prompts, [p["chosen"] for p in pairs], batch_size)
        ref_r = answer_logps(reference, tokenizer, prompts, [p["rejected"] for p in pairs], batch_size)
        margins = [beta * ((c - rc) - (r - rr)) for (c, _), (rc, _), (r, _), (rr, _) in zip(chosen, ref_c, rejected, ref_r)]
        out["reward_margin"] = sum(margins) / n
        out["reward_accuracy"] = sum(m > 0 for m in margins) / n
    return out
