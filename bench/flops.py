"""Training FLOPs per token and a measured matmul FLOP/s: the two halves of bench/run.py's utilisation rows.

Convention for N (the parameters that cost a multiply-add per token): every parameter except the input
embedding (a table lookup, no matmul), plus the LM head's matmul, counted even when its weight is tied to the
embedding (tied weights are stored once but used twice). Norm weights are included, as the usual 6N rule does
(<0.1% here); attention's own score/value matmuls (~2·layers·seq·d per token) are left out, as that rule does.
"""

from __future__ import annotations

import time


def matmul_params(model) -> int:
    """N for `model` (a transformers causal LM, possibly on the meta device): see the module docstring."""
    embedding = model.get_input_embeddings().weight
    n = sum(p.numel() for p in model.parameters()) - embedding.numel()  # parameters() yields a tied weight once
    head = model.get_output_embeddings()
    if head is not None and head.weight is embedding:  # tied: the head's matmul was just subtracted with the table
        n += head.weight.numel()
    return n


def matmul_params_of(model_path: str) -> tuple[int, int]:
    """(N, the LM head's share of N) for the model in a folder, built on the meta device (no weights loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    head = model.get_output_embeddings()
    return matmul_params(model), head.weight.numel() if head is not None else 0


def executed_flops_per_token(n: int, head: int, method: str, adapter_params: int = 0,
                             label_share: float = 1.0) -> float:
    """What the pipeline's trainer computes per token, as opposed to the 4N/6N convention: its LM head
    (`alignpipe.lm_head`) projects only the labelled tokens, a `label_share` of them (`head` = the head's N)."""
    per_head = 6 if method == "full" else 4  # LoRA: the frozen head needs its input gradient only
    return training_flops_per_token(n - head, method, adapter_params) + per_head * head * label_share


def training_flops_per_token(n: int, method: str, adapter_params: int = 0) -> int:
    """Forward 2N + backward 4N for full fine-tuning (6N). LoRA: frozen weights get no weight gradients, so 4N,
    plus 6 per adapter parameter (the adapters are trained like full weights).

    Args:
        n: Matmul parameters of the base model (`matmul_params`).
        method: "full" or "lora".
        adapter_params: Trainable adapter parameters (LoRA only).
    """
    if method == "full":
        return 6 * n
    if method == "lora":
        return 4 * n + 6 * adapter_params
    raise ValueError(f"method={method!r}: use 'full' or 'lora'")


def matmul_flops_per_s(dtype: str, threads: int, size: int = 2048, repeats: int = 5, iters: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of a size x size @ size x size torch matmul with `threads` threads.

    Best-of rather than mean: on a shared machine the fastest repeat is the closest to what the CPU can do.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(size, size, dtype=getattr(torch, dtype))
        b = torch.randn(size, size, dtype=getattr(torch, dtype))
        for _ in range(2):  # warm-up: thread pool start, oneDNN kernel selection
            a @ b
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(iters):
                a @ b
            best = min(best, (time.perf_counter() - t0) / iters)
    finally:
        torch.set_num_threads(before)
    return 2 * size**3 / best
