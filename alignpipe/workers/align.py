"""Preference tuning inside a Ray Train worker: TRL's DPO/ORPO/KTO trainers, or RLHF (reward model, then
RLOO/GRPO), each training a new adapter on the merged SFT model. The driver side is `tasks.align`.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from alignpipe import models, ray_runner
from alignpipe.config.sft import PeftConfig
from alignpipe.data.formats import load_canonical
from alignpipe.data.preference import as_conversations, to_unpaired
from alignpipe.lm_head import use_compact_lm_head
from alignpipe.metric_buffer import spool_path
from alignpipe.swiglu import use_recomputing_swiglu
from alignpipe.workers.sft import FINAL_MARKER, MlflowStream, peft_config

REWARD_MARKER = "reward.json"


def pairs_dataset(rows: list[dict], system_prompt: str | None, seed: int):
    """Canonical pairs -> TRL conversational preference rows (prompt/chosen/rejected), shuffled."""
    from datasets import Dataset

    examples = [as_conversations(r, system_prompt) for r in rows]
    random.Random(seed).shuffle(examples)
    return Dataset.from_list(examples)


def trainer_args(a: dict[str, Any], output_dir: str, use_gpu: bool, dtype: str) -> dict[str, Any]:
    """The TrainingArguments every TRL trainer here shares (as `sft`: bf16 autocast where native, no tqdm noise)."""
    return dict(
        output_dir=output_dir,
        max_steps=a["max_steps"] if a["max_steps"] > 0 else -1,
        num_train_epochs=a["epochs"],
        per_device_train_batch_size=a["batch_size"],
        per_device_eval_batch_size=a["batch_size"],
        gradient_accumulation_steps=a["grad_accum"],
        learning_rate=a["learning_rate"],
        lr_scheduler_type=a["lr_scheduler"],
        warmup_steps=a["warmup_ratio"],
        logging_steps=a["logging_steps"],
        save_strategy="steps",
        save_steps=a["save_steps"],
        save_total_limit=1,
        activation_checkpointing=a["gradient_checkpointing"],  # transformers 5 name; overrides TRL's default True
        use_cpu=not use_gpu,
        bf16=dtype == "bfloat16",
        seed=a["seed"],
        report_to="none",
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        disable_tqdm=True,
    )


def build_trainer(config: dict[str, Any], output_dir: str, callbacks: list):
    """The TRL trainer of `align.method` (dpo, orpo or kto) on the merged SFT model; rlhf has its own two."""
    a = config["align"]
    dtype = models.dtype_for(a["precision"])
    tokenizer = models.load_tokenizer(config["reference_path"])
    model = models.load_model(config["reference_path"], dtype=dtype)
    model.set_attn_implementation(models.training_attention(a["attention"], config["use_gpu"], a["max_length"]))
    rows = load_canonical(config["preference_path"])
    train = pairs_dataset(rows, config["system_prompt"], a["seed"])
    common = trainer_args(a, output_dir, config["use_gpu"], dtype)
    peft = peft_config(PeftConfig(**a["peft"]))
    if a["method"] == "dpo":
        from trl import DPOConfig, DPOTrainer

        # ref_model=None with a PEFT model: TRL computes the reference with the adapter disabled, i.e. the
        # merged SFT model itself; no second copy of the weights is kept.
        # sft_loss_weight > 0: TRL sums the sigmoid (DPO) loss and the chosen answers' NLL with these weights (RPO)
        losses = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, a["sft_loss_weight"]]} \
            if a["sft_loss_weight"] else {}
        args = DPOConfig(**common, beta=a["beta"], max_length=a["max_length"], precompute_ref_log_probs=False,
                         **losses)
        trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=train, processing_class=tokenizer,
                             peft_config=peft, callbacks=callbacks)
    elif a["method"] == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        args = ORPOConfig(**common, beta=a["beta"], max_length=a["max_length"])
        trainer = ORPOTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                              peft_config=peft, callbacks=callbacks)
    elif a["method"] == "kto":
        from datasets import Dataset
        from trl import KTOConfig, KTOTrainer

        unpaired = Dataset.from_list(to_unpaired([as_conversations(r, config["system_prompt"]) for r in rows]))
        args = KTOConfig(**common, beta=a["beta"], max_length=a["max_length"])
        trainer = KTOTrainer(model=model, ref_model=None, args=args, train_dataset=unpaired.shuffle(seed=a["seed"]),
                             processing_class=tokenizer, peft_config=peft, callbacks=callbacks)
    else:
        raise ValueError(f"build_trainer does not build {a['method']!r}")
    use_compact_lm_head(trainer)  # CPU: only the answer tokens go through the LM head (see alignpipe.lm_head)
    use_recomputing_swiglu(trainer.model)  # one MLP activation less kept per layer (see alignpipe.swiglu)
    return trainer, tokenizer


def train_reward_model(config: dict[str, Any], output_dir: str, callbacks: list) -> tuple[Any, Any, dict[str, float]]:
    """rlhf, phase 1: a LoRA reward model (TRL RewardTrainer) on the merged SFT model, scored on held-out pairs.

    Returns:
        (trainer, tokenizer, {"reward_model/accuracy": held-out share of pairs ranked right, ...}).
    """
    from peft import LoraConfig, TaskType
    from trl import RewardConfig, RewardTrainer

    a, r = config["align"], config["align"]["rlhf"]
    dtype = models.dtype_for(a["precision"])
    tokenizer = models.load_tokenizer(config["reference_path"])
    model = _scorer(config["reference_path"], dtype, tokenizer)
    rows = load_canonical(config["preference_path"])
    held = load_canonical(config["preference_eval_path"]) if config.get("preference_eval_path") else None
    if held is None:  # no held-out pairs configured: hold back a slice of the training pairs
        rows = rows[:]
        random.Random(a["seed"]).shuffle(rows)
        n_eval = max(1, int(len(rows) * a["eval_fraction"]))
        rows, held = rows[n_eval:], rows[:n_eval]
    common = trainer_args({**a, "max_steps": r["reward_steps"], "learning_rate": r["reward_learning_rate"]},
                          output_dir, config["use_gpu"], dtype)
    p = a["peft"]
    peft = LoraConfig(r=p["r"], lora_alpha=p["alpha"], lora_dropout=p["dropout"], target_modules=p["target_modules"],
                      task_type=TaskType.SEQ_CLS)
    args = RewardConfig(**{**common, "save_strategy": "no"}, max_length=a["max_length"])
    trainer = RewardTrainer(model=model, args=args, train_dataset=pairs_dataset(rows, config["system_prompt"], a["seed"]),
                            eval_dataset=pairs_dataset(held, config["system_prompt"], a["seed"]),
                            processing_class=tokenizer, peft_config=peft, callbacks=callbacks)
    trainer.train()
    scores = trainer.evaluate()
    return trainer, tokenizer, {"reward_model/accuracy": scores["eval_accuracy"],
                                "reward_model/margin": scores.get("eval_margin", float("nan")),
                                "reward_model/eval_pairs": float(len(held))}


def build_policy_trainer(config: dict[str, Any], reward_model, output_dir: str, callbacks: list):
    """rlhf, phase 2: RLOO (or GRPO) of a new LoRA on the merged SFT model, rewarded by the reward model."""
    a, r = config["align"], config["align"]["rlhf"]
    dtype = models.dtype_for(a["precision"])
    tokenizer = models.load_tokenizer(config["reference_path"])
    tokenizer.padding_side = "left"  # generation pads on the left
    model = models.load_model(config["reference_path"], dtype=dtype)
    model.set_attn_implementation(models.training_attention(a["attention"], config["use_gpu"], a["max_length"]))
    from datasets import Dataset

    def prompts_of(rows):
        return Dataset.from_list([{"prompt": as_conversations(row, config["system_prompt"])["prompt"]} for row in rows])

    prompts = prompts_of(load_canonical(config["preference_path"])).shuffle(seed=a["seed"])
    # policy/reward_start and _end: the same prompts (held-out pairs' where configured) answered before and after
    held = config.get("preference_eval_path")
    fixed = prompts_of(load_canonical(held)) if held else prompts
    eval_prompts = fixed.select(range(min(r["eval_prompts"], len(fixed)))) if r["eval_prompts"] else None
    k = r["num_generations"]
    common = trainer_args({**a, "max_steps": r["policy_steps"], "learning_rate": r["policy_learning_rate"],
                           "batch_size": k * max(1, a["batch_size"] // k)},  # whole groups of k answers per batch
                          output_dir, config["use_gpu"], dtype)
    policy = dict(num_generations=k, max_completion_length=r["max_new_tokens"], temperature=r["temperature"],
                  beta=r["kl_beta"])
    if r["policy_optimizer"] == "rloo":
        from trl import RLOOConfig, RLOOTrainer

        trainer_cls, args = RLOOTrainer, RLOOConfig(**common, **policy)
    else:
        from trl import GRPOConfig, GRPOTrainer

        trainer_cls, args = GRPOTrainer, GRPOConfig(**common, **policy)
    trainer = trainer_cls(model=model, reward_funcs=reward_model, args=args, train_dataset=prompts,
                          eval_dataset=eval_prompts,
                          processing_class=tokenizer, reward_processing_classes=tokenizer,
                          peft_config=peft_config(PeftConfig(**a["peft"])), callbacks=callbacks)
    use_compact_lm_head(trainer)
    use_recomputing_swiglu(trainer.model)
    return trainer, tokenizer


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: train the method's adapter, report checkpoints, save the adapter."""
    import ray.train
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer

    ray_runner.set_worker_threads(config["threads"])
    rank0 = ray.train.get_context().get_world_rank() == 0
    a = config["align"]

    resume_dir, finished = ray_runner.resume_from_checkpoint("align", FINAL_MARKER)
    if finished:  # this exact work already finished: its result was handed back
        return

    scratch = tempfile.mkdtemp(prefix="align-scratch-")
    stream = MlflowStream(config["tracking_uri"], config["mlflow_run_id"],
                          spool=spool_path(config["mlflow_run_id"], ray.train.get_context().get_world_rank()))
    summary: dict[str, float] = {}
    if a["method"] == "rlhf":
        reward_model = _reward_model(config, scratch, rank0, summary, stream)
        trainer, tokenizer = build_policy_trainer(config, reward_model, scratch, [stream, RayTrainReportCallback()])
    else:
        trainer, tokenizer = build_trainer(config, scratch, [stream, RayTrainReportCallback()])
    trainer = prepare_trainer(trainer)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    summary.update({"trainable_params": trainable, "total_params": total, "trainable_share": trainable / total,
                    "train_rows": len(trainer.train_dataset)})
    if rank0:
        stream.buffer.log(summary, step=0)
    if a["max_steps"] != 0:
        resume = resume_dir / RayTrainReportCallback.CHECKPOINT_NAME if resume_dir else None
        policy_eval = a["method"] == "rlhf" and trainer.eval_dataset is not None
        if policy_eval and resume is None:  # a resumed run has trained already: its start is not the SFT model's
            summary["policy/reward_start"] = policy_reward(trainer, a["seed"])
        out = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        summary.update({"train_loss": out.training_loss, "global_step": trainer.state.global_step,
                        "train_runtime_s": out.metrics.get("train_runtime", 0.0)})
        if policy_eval:
            summary["policy/reward_end"] = policy_reward(trainer, a["seed"])
    stream.buffer.drain()  # before the final report: the driver ends the MLflow run right after it
    final_dir = Path(tempfile.mkdtemp(prefix="align-final-"))
    if rank0:
        trainer.save_model(str(final_dir / "adapter"))
        tokenizer.padding_side = "right"
        tokenizer.save_pretrained(str(final_dir / "adapter"))
        if config.get("reward_adapter_dir"):
            shutil.copytree(config["reward_adapter_dir"], final_dir / "reward_adapter")
        (final_dir / FINAL_MARKER).write_text(json.dumps(summary))
    ray_runner.report_final(summary, final_dir, rank0, resume_dir)
    shutil.rmtree(scratch, ignore_errors=True)


def policy_reward(trainer, seed: int) -> float:
    """The policy's mean reward on the trainer's fixed eval prompts (num_generations sampled answers each), with
    the same seed every time. The training curve's `reward` is one batch of different prompts per step: its
    first and last points differed by more than the policy changed (std ~2.8 within a batch on the demo)."""
    from transformers import set_seed

    set_seed(seed)
    return trainer.evaluate()["eval_reward"]


def _reward_model(config: dict[str, Any], scratch: str, rank0: bool, summary: dict[str, float],
                  stream: MlflowStream):
    """rlhf phase 1, done once: reuse the saved reward adapter when a restarted run finds it, else train it.

    Its curves go through `stream`'s buffer: one buffer (and spool file) per run and worker.
    """
    from peft import PeftModel

    saved = Path(config["reward_adapter_dir"])
    if (saved / REWARD_MARKER).is_file():
        tokenizer = models.load_tokenizer(config["reference_path"])
        base = _scorer(config["reference_path"], models.dtype_for(config["align"]["precision"]), tokenizer)
        summary.update(json.loads((saved / REWARD_MARKER).read_text()))
        return PeftModel.from_pretrained(base, str(saved)).merge_and_unload().eval()
    prefixed = PrefixedStream(config["tracking_uri"], config["mlflow_run_id"], "reward_model/", buffer=stream.buffer)
    trainer, _, scores = train_reward_model(config, str(Path(scratch) / "reward"), [prefixed])
    summary.update(scores)  # evaluate() above already streamed them as reward_model/eval_accuracy, ...
    if rank0:
        shutil.rmtree(saved, ignore_errors=True)
        trainer.save_model(str(saved))
        (saved / REWARD_MARKER).write_text(json.dumps(scores))
    model = trainer.model.merge_and_unload() if hasattr(trainer.model, "merge_and_unload") else trainer.model
    return model.eval()


def _scorer(path: str, dtype: str, tokenizer):
    """The merged SFT model with a fresh one-output head: the reward model's starting point."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=getattr(torch, dtype))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


class PrefixedStream(MlflowStream):
    """MlflowStream that files the reward model's curves (loss, accuracy) under their own prefix."""

    def __init__(self, uri: str, run_id: str, prefix: str, buffer=None):
        super().__init__(uri, run_id, buffer=buffer)
        self.prefix = prefix

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs={f"{self.prefix}{k}": v for k, v in (logs or {}).items()}, **kwargs)
