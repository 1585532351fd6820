"""Evaluation settings (same decoding for every model compared)."""

from pydantic import Field

from alignpipe.config.base import Section


class EvaluateConfig(Section):
    batch_size: int = Field(16, ge=1, description="Prompts per generation batch (greedy, KV cache on).")
    max_new_tokens: int = Field(64, ge=1, description="Generation budget per answer.")
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N held-out rows.")
    perplexity_rows: int | None = Field(128, ge=1, description="Held-out rows scored for perplexity (None = all).")
    compare_base: bool = Field(True, description="Also evaluate the untuned base model, side by side.")
    cpus: float = Field(2, gt=0, description="CPUs reserved by each evaluation Ray task (= torch threads).")
