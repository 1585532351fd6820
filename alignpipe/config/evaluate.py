"""Evaluation settings (same decoding for every model compared)."""

from typing import Literal

from pydantic import Field

from alignpipe.config.base import Section


class PromptedBaseConfig(Section):
    """The base model told the task: the strongest untuned baseline (in-context learning instead of fine-tuning)."""

    enabled: bool = Field(True, description="Also score the base model with the task, the answers' JSON schema and "
                          "k training conversations in context; gates and 'beats base' use the better base.")
    k: int = Field(8, ge=0, le=64, description="Training conversations shown in context (the first k of the "
                   "validated training split). Chosen on a development slice: bench/PROTOCOL.md, issue 30.")
    rows: int | None = Field(None, ge=1, description="Score it on the first N held-out rows only (None = all).")
    instructions: str | None = Field(
        None, description="Its system turn; None = model.system_prompt plus the exact JSON schema of the training "
        "answers (their keys and types) when data.json_targets.")


class EvaluateConfig(Section):
    batch_size: int = Field(16, ge=1, description="Prompts per generation batch (greedy, KV cache on).")
    max_new_tokens: int = Field(64, ge=1, description="Generation budget per answer.")
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N held-out rows.")
    perplexity_rows: int | None = Field(128, ge=1, description="Held-out rows scored for perplexity (None = all).")
    preference_rows: int | None = Field(
        128, ge=1, description="Held-out preference pairs scored for preference accuracy and reward margin "
        "(None = all; `limit` caps them too). Each pair costs two forward passes per artifact.")
    screen_rows: int = Field(
        64, ge=0, description="Artifacts that are not the verdict are scored on the first N held-out rows only: an "
        "intermediate model (sft before align); the quantized challenger, which gets every row when, on those rows, "
        "it is within register.serve's margin of the model it was made from on the serving objective (it could be "
        "registered); the plain base model when the prompted base is on, which gets every row when, on those rows, "
        "it beats the prompted base. Their preference pairs are capped at N too, unless a later "
        "artifact reuses them as its DPO reference. The better base and the last trained model always get every "
        "row. 0 = every artifact on every row.")
    compare_base: bool = Field(True, description="Also evaluate the untuned base model, side by side.")
    prompted_base: PromptedBaseConfig = Field(default_factory=PromptedBaseConfig)
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
