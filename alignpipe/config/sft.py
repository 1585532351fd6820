"""Supervised fine-tuning settings (TRL SFTTrainer + PEFT); the shared training fields are in `training.py`."""

from typing import Literal

from pydantic import Field, model_validator

from alignpipe.config.training import PeftConfig, TrainingConfig

__all__ = ["PeftConfig", "SftConfig"]


class SftConfig(TrainingConfig):
    eval_fraction: float = Field(0.05, ge=0, lt=0.5, description="Share of training rows held back for eval loss.")
    eval_max_rows: int = Field(
        200, ge=1, description="At most this many of the held-back rows go through the eval loss (eval_fraction of "
        "a large dataset would make each eval longer than the training steps between them).")
    eval_steps: int = Field(50, ge=1, description="Compute the eval loss every N steps.")
    early_stopping_patience: int | None = Field(None, ge=1, description="Stop after N evals without improvement.")
    quantized_base: Literal["nf4"] | None = Field(None, description="QLoRA: load the base in 4-bit (GPU only).")

    @model_validator(mode="after")
    def _save_divides_eval(self):
        if self.early_stopping_patience and self.save_steps % self.eval_steps:
            raise ValueError(
                f"early stopping needs save_steps ({self.save_steps}) to be a multiple of eval_steps "
                f"({self.eval_steps}); set sft.save_steps to {self.eval_steps * max(1, self.save_steps // self.eval_steps)}"
            )
        return self
