"""Supervised fine-tuning settings (TRL SFTTrainer + PEFT)."""

from typing import Literal

from pydantic import Field, model_validator

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


class SftConfig(Section):
    peft: PeftConfig = Field(default_factory=PeftConfig)
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps; -1 = use epochs; 0 = no training.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: str = Field("cosine", description="transformers scheduler name.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps spent warming up.")
    batch_size: int = Field(8, ge=1, description="Per-worker batch size.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    max_length: int = Field(512, ge=8, description="Truncate tokenized conversations to this length.")
    eval_fraction: float = Field(0.05, ge=0, lt=0.5, description="Share of training rows held back for eval loss.")
    eval_steps: int = Field(50, ge=1, description="Compute the eval loss every N steps.")
    early_stopping_patience: int | None = Field(None, ge=1, description="Stop after N evals without improvement.")
    save_steps: int = Field(50, ge=1, description="Checkpoint (to Ray storage) every N steps.")
    logging_steps: int = Field(5, ge=1, description="Log metrics to MLflow every N steps.")
    seed: int = Field(42, description="Seed for data order and adapter init.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16 = frozen weights in bfloat16 + autocast (LoRA weights stay fp32); auto = bf16 "
        "where the hardware computes it natively (CUDA, or CPUs with AVX512-BF16/AMX), else fp32.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory (~50% slower on CPU).")
    attention: Literal["auto", "sdpa", "eager"] = Field(
        "auto", description="Attention kernel while training: auto = eager on CPU when no row is longer than "
        "256 tokens (~18% faster per step at ~80-token rows), sdpa otherwise (GPU, or longer rows: eager keeps "
        "every [batch, heads, len, len] score matrix for the backward).")
    quantized_base: Literal["nf4"] | None = Field(None, description="QLoRA: load the base in 4-bit (GPU only).")

    @model_validator(mode="after")
    def _save_divides_eval(self):
        if self.early_stopping_patience and self.save_steps % self.eval_steps:
            raise ValueError(
                f"early stopping needs save_steps ({self.save_steps}) to be a multiple of eval_steps "
                f"({self.eval_steps}); set sft.save_steps to {self.eval_steps * max(1, self.save_steps // self.eval_steps)}"
            )
        return self
