"""Evaluation settings (same decoding for every model compared)."""

from typing import Literal

from pydantic import Field

from alignpipe.config.base import Section


class EvaluateConfig(Section):
    batch_size: int = Field(16, ge=1, description="Prompts per generation batch (greedy, KV cache on).")
    max_new_tokens: int = Field(64, ge=1, description="Generation budget per answer.")
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N held-out rows.")
    perplexity_rows: int | None = Field(128, ge=1, description="Held-out rows scored for perplexity (None = all).")
    preference_rows: int | None = Field(
        128, ge=1, description="Held-out preference pairs scored for preference accuracy and reward margin "
        "(None = all; `limit` caps them too). Each pair costs two forward passes per artifact.")
    screen_rows: int = Field(
        64, ge=0, description="Artifacts that are not the verdict (an intermediate model such as sft before "
        "align, and the quantized challenger) are scored on the first N held-out rows only; the challenger gets "
        "every row when, on those rows, it is within register.serve's margin of the model it was made from on "
        "the serving objective (it could be registered). A screened artifact's preference pairs are capped at N "
        "too, unless a later artifact reuses them as its DPO reference. The base model and the last trained model always get "
        "every row. 0 = every artifact on every row.")
    compare_base: bool = Field(True, description="Also evaluate the untuned base model, side by side.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Weights dtype while evaluating; auto = bf16 where computed natively (~3x faster "
        "decoding on AVX512-BF16 CPUs), else fp32. Every model in one run is evaluated with the same precision.")
    cpus: float = Field(2, gt=0, description="CPUs reserved by each evaluation Ray task (= torch threads).")
    cascade_tolerance: float = Field(
        0.01, ge=0, le=1, description="Cascade report: best operating point = the cheapest (measured decoding cost) "
        "with exact match at most this far below the full model's; the full model alone is one of the points.")
    lm_eval_tasks: list[str] = Field(
        default_factory=list, description="Optional lm-evaluation-harness tasks per artifact (needs lm-eval installed "
        "and the task data in the local cache; skipped with a message otherwise).")
