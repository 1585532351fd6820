"""Alignment settings: preference tuning of the SFT model (DPO, ORPO, KTO) or RLHF (reward model + RLOO/GRPO)."""

from typing import Literal

from pydantic import Field

from alignpipe.config.base import Section
from alignpipe.config.training import TrainingConfig, default


class RlhfConfig(Section):
    reward_steps: int = Field(60, ge=1, description="Optimizer steps of the reward model (TRL RewardTrainer).")
    reward_learning_rate: float = Field(1e-3, gt=0, description="Peak learning rate of the reward model's LoRA.")
    reward_adapter: str | None = Field(
        None, description="Reuse a trained reward model instead of training one: the `reward_adapter` folder (path "
        "or URI) of an earlier rlhf align stage on the same SFT model. Policies of several seeds then share one "
        "reward model (training one again with the same seed need not give the same weights).")
    policy_optimizer: Literal["rloo", "grpo"] = Field(
        "rloo", description="Policy optimiser against the reward model: TRL RLOOTrainer or GRPOTrainer.")
    policy_steps: int = Field(20, ge=1, description="Optimizer steps of the policy.")
    policy_learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate of the policy's LoRA.")
    num_generations: int = Field(4, ge=2, description="Sampled answers per prompt (the RLOO/GRPO group).")
    max_new_tokens: int = Field(32, ge=1, description="Longest sampled answer.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the policy's answers.")
    kl_beta: float = Field(0.05, ge=0, description="KL penalty towards the reference (the SFT model).")
    eval_prompts: int = Field(
        32, ge=0, description="Fixed prompts (held-out pairs' prompts where data.preference_eval is set) the policy "
        "answers before and after training, same seed both times: policy/reward_start and _end. 0 = skip.")


class AlignConfig(TrainingConfig):
    method: Literal["dpo", "orpo", "kto", "rlhf", "none"] = Field(
        "dpo", description="dpo | orpo | kto | rlhf (reward model + RLOO/GRPO) | none (skip the stage). Defaults "
        "to dpo when data.preference is set, none otherwise.")
    beta: float = Field(0.1, gt=0, description="DPO/KTO temperature (strength of the pull to the reference); "
                        "ORPO's odds-ratio weight.")
    sft_loss_weight: float = Field(
        0.0, ge=0, description="dpo: add the SFT loss (mean NLL of the chosen answer) with this weight, as in RPO. "
        "Plain DPO can lower the chosen answer's own likelihood while widening the margin; this keeps it up.")
    learning_rate: float = default("learning_rate", 5e-5)
    warmup_ratio: float = default("warmup_ratio", 0.1)
    max_length: int = default("max_length", 256)
    eval_fraction: float = Field(0.1, ge=0, lt=0.5, description="rlhf: share of pairs held back to score the "
                                 "reward model when data.preference_eval is not set.")
    rlhf: RlhfConfig = Field(default_factory=RlhfConfig, description="Settings of method: rlhf.")
