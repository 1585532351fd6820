"""Settings every training stage shares (sft and align extend `TrainingConfig`): PEFT, schedule, batch, precision."""

from copy import copy
from typing import Any, Literal

from pydantic import Field
from pydantic.fields import FieldInfo

from alignpipe.config.base import Section


class PeftConfig(Section):
    method: Literal["lora", "prompt_tuning", "prefix_tuning", "ia3"] = Field("lora", description="PEFT method.")
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Modules that get adapters (LoRA, IA3)."
    )
    num_virtual_tokens: int = Field(16, ge=1, description="Virtual tokens (prompt and prefix tuning).")


class TrainingConfig(Section):
    peft: PeftConfig = Field(default_factory=PeftConfig, description="The adapter this stage trains.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training rows (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps; -1 = use epochs; 0 = no training.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: str = Field("cosine", description="transformers scheduler name.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps spent warming up.")
    batch_size: int = Field(8, ge=1, description="Rows (sft) or pairs (align) per worker and step.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    max_length: int = Field(512, ge=8, description="Truncate tokenized rows to this many tokens.")
    save_steps: int = Field(50, ge=1, description="Checkpoint (to Ray storage) every N steps.")
    logging_steps: int = Field(5, ge=1, description="Log curves to MLflow every N steps.")
    seed: int = Field(42, description="Seed for data order and adapter init.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16 = frozen weights in bfloat16 + autocast (adapter weights stay fp32); auto = bf16 "
        "where the hardware computes it natively (CUDA, or CPUs with AVX512-BF16/AMX), else fp32.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory (~50% slower on CPU).")
    attention: Literal["auto", "sdpa", "eager"] = Field(
        "auto", description="Attention kernel while training: auto = eager on CPU when no row is longer than "
        "256 tokens (faster per step at short rows), sdpa otherwise (GPU, or longer rows: eager keeps every "
        "[batch, heads, len, len] score matrix for the backward).")


def default(field: str, value: Any) -> FieldInfo:
    """A `TrainingConfig` field with its constraints and help text, and another default (for a subclass)."""
    info = copy(TrainingConfig.model_fields[field])
    info.default = value
    return info
