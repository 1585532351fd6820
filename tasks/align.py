"""Align stage: preference tuning of the SFT model with TRL inside Ray Train (DPO, ORPO, KTO or RLHF).

Reads the SFT adapter and the canonical preference pairs written by `validate`. The SFT adapter is first
merged into the base (a Ray task) and saved: that folder is the reference policy, and a NEW LoRA adapter is
trained on top of it, so "adapter disabled" is exactly the SFT model. Writes the merged folder and the
alignment adapter to the stage's content-addressed output dir; streams curves to the nested `align` run.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from alignpipe import models, ray_runner, tracking
from alignpipe.config import PipelineConfig
from alignpipe.config.sft import PeftConfig
from alignpipe.data.formats import load_canonical
from alignpipe.data.preference import as_conversations, to_unpaired
from alignpipe.merge import merge_adapter
from alignpipe.metric_buffer import spool_path
from alignpipe.runs import RunContext, content_key, dir_digest
from tasks.sft import FINAL_MARKER, MlflowStream, peft_config

CURVES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
REWARD_MARKER = "reward.json"


class AlignOutput(BaseModel):
    method: str
    base_path: str              # the SFT adapter merged into the base model: the reference policy
    adapter_dir: str            # the alignment adapter (+ tokenizer), trained on top of base_path
    content_key: str
    mlflow_run_id: str
    metrics: dict[str, float]   # final training metrics; rlhf adds reward_model/accuracy, policy/reward_start|end


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
        gradient_checkpointing=a["gradient_checkpointing"],
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
    from datasets import Dataset

    prompts = Dataset.from_list([{"prompt": as_conversations(row, config["system_prompt"])["prompt"]}
                                 for row in load_canonical(config["preference_path"])]).shuffle(seed=a["seed"])
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
                          processing_class=tokenizer, reward_processing_classes=tokenizer,
                          peft_config=peft_config(PeftConfig(**a["peft"])), callbacks=callbacks)
    return trainer, tokenizer


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: train the method's adapter, report checkpoints, save the adapter."""
    import ray.train
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer

    ray_runner.set_worker_threads(config["threads"])
    ray_runner.drop_single_worker_process_group()
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
        out = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        summary.update({"train_loss": out.training_loss, "global_step": trainer.state.global_step,
                        "train_runtime_s": out.metrics.get("train_runtime", 0.0)})
        rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
        if rewards:  # rlhf: the policy's mean reward per logged step, first and last
            summary.update({"policy/reward_start": rewards[0], "policy/reward_end": rewards[-1]})
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


def merge_sft(base_model: str, sft_adapter_dir: str, out_dir: Path) -> str:
    """The reference policy: the SFT adapter folded into the base, saved once per content key (a Ray task)."""
    import ray

    if (out_dir / "config.json").is_file():
        return str(out_dir)
    merge = ray.remote(num_cpus=1, max_calls=1)(merge_adapter)
    return ray_runner.get(merge.remote(base_model, sft_adapter_dir, str(out_dir)))


def cache_key(cfg: PipelineConfig, ctx: RunContext, sft_adapter_dir: str, preference_path: str,
              preference_digest: str, preference_eval_path: str | None = None) -> str:
    """The align and model sections, the worker count, the pairs' digest and the SFT adapter's digest."""
    return content_key("align", {"align": cfg.align, "model": cfg.model, "compute": cfg.compute.num_workers},
                       {"preference": preference_digest, "sft_adapter": dir_digest(sft_adapter_dir),
                        "base_model": ctx.base_model, "preference_eval": str(preference_eval_path)})


def run_align(cfg: PipelineConfig, ctx: RunContext, sft_adapter_dir: str, preference_path: str,
              preference_digest: str, preference_eval_path: str | None = None) -> AlignOutput:
    """Plain function behind the task: merge the SFT model, train the alignment adapter on Ray, log it all."""
    key = cache_key(cfg, ctx, sft_adapter_dir, preference_path, preference_digest, preference_eval_path)
    out_dir = ctx.stage_dir("align", key)
    with tracking.stage_run(ctx.tracking_uri, ctx.parent_run_id, "align", key) as run_id:
        tracking.log_params(ctx.tracking_uri, run_id, cfg.align.model_dump(mode="json"), prefix="align")
        ray_runner.ensure_ray(cfg.compute)
        reference = merge_sft(ctx.base_model, sft_adapter_dir, out_dir / "sft_merged")
        loop_config = {"align": cfg.align.model_dump(mode="json"), "reference_path": reference,
                       "preference_path": preference_path, "preference_eval_path": preference_eval_path,
                       "system_prompt": cfg.model.system_prompt, "use_gpu": cfg.compute.use_gpu,
                       "reward_adapter_dir": str(out_dir / "reward_adapter") if cfg.align.method == "rlhf" else None,
                       "tracking_uri": ctx.tracking_uri, "mlflow_run_id": run_id}
        result = ray_runner.fit(train_loop, loop_config, cfg.compute, name=f"align-{key}",
                                storage=ray_runner.storage_path(cfg.compute, ctx.workdir))
        adapter_dir = out_dir / "adapter"
        shutil.rmtree(adapter_dir, ignore_errors=True)
        with result.checkpoint.as_directory() as ckpt:
            shutil.copytree(Path(ckpt) / "adapter", adapter_dir)
            metrics = json.loads((Path(ckpt) / FINAL_MARKER).read_text())
        tracking.log_metrics(ctx.tracking_uri, run_id, {f"final/{k}": v for k, v in metrics.items()})
        _log_curves(ctx.tracking_uri, run_id, cfg.align.method)
        client = tracking.client_for(ctx.tracking_uri)
        client.set_tag(run_id, "alignpipe.reference_path", reference)
        client.log_artifacts(run_id, str(adapter_dir), "adapter")
        if cfg.align.method == "rlhf":
            client.log_artifacts(run_id, str(out_dir / "reward_adapter"), "reward_adapter")
    print(f"align ({cfg.align.method}): {metrics.get('global_step', 0):.0f} steps, "
          f"train loss {metrics.get('train_loss', float('nan')):.4f}")
    return AlignOutput(method=cfg.align.method, base_path=reference, adapter_dir=str(adapter_dir), content_key=key,
                       mlflow_run_id=run_id, metrics=metrics)


def _log_curves(uri: str, run_id: str, method: str) -> None:
    """The alignment curves as one PNG: loss and DPO rewards, or reward-model accuracy and policy reward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("reward_model/loss", "reward_model/accuracy", "reward_model/eval_accuracy", "reward", "loss") \
        if method == "rlhf" else CURVES
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for key in keys:
        points = tracking.metric_history(uri, run_id, key)
        if points:
            ax = axes[0] if "loss" in key else axes[1]
            ax.plot(*zip(*sorted(points)), "-", label=key)
    for ax, title in zip(axes, ("loss", "rewards" if method != "rlhf" else "reward model accuracy / policy reward")):
        ax.set_xlabel("step")
        ax.set_title(f"{method}: {title}")
        if ax.lines:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    tracking.log_figure(uri, run_id, fig, "plots/align_curves.png")
    plt.close(fig)


@task(name="align", cache_policy=NO_CACHE)
def align(cfg: PipelineConfig, ctx: RunContext, sft_adapter_dir: str, preference_path: str, preference_digest: str,
          preference_eval_path: str | None = None) -> AlignOutput:
    """Align the SFT model on preference pairs (a new adapter on the merged SFT model) on Ray Train."""
    return run_align(cfg, ctx, sft_adapter_dir, preference_path, preference_digest, preference_eval_path)
