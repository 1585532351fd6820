"""Align stage: preference tuning of the SFT model with TRL inside Ray Train (DPO, ORPO, KTO or RLHF).

Reads the SFT adapter and the validated preference pairs (Parquet shards written by `validate`), from storage.
The SFT adapter is first merged into the base (a Ray task) and published: that folder is the reference policy, and a NEW adapter is
trained on top of it, so "adapter disabled" is exactly the SFT model. Publishes the merged folder and the alignment
adapter under the stage's content-addressed folder in storage; streams curves to the nested `align` run. The
driver side (`run_align`) and what each Ray Train worker runs (`train_loop`) are both here; what they share with
`sft` is `alignpipe.training`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from alignpipe import merge, models, ray_runner, tracking, training
from alignpipe.config import PipelineConfig
from alignpipe.config.align import AlignConfig
from alignpipe.data.formats import load_canonical
from alignpipe.data.preference import as_conversations, to_unpaired
from alignpipe.errors import ConfigError
from alignpipe.runs import RunContext, content_key, data_digest, dir_digest
from alignpipe.storage import join

REWARD_MARKER = "reward.json"
DPO_CURVES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
RLHF_CURVES = ("reward_model/loss", "reward_model/accuracy", "reward_model/eval_accuracy", "reward", "loss")


class AlignOutput(BaseModel):
    method: str
    base_path: str              # URI of the SFT adapter merged into the base model: the reference policy
    adapter_dir: str            # URI of the alignment adapter (+ tokenizer), trained on top of base_path
    content_key: str
    mlflow_run_id: str
    metrics: dict[str, float]   # final training metrics; rlhf adds reward_model/accuracy, policy/reward_start|end


class AlignJob(training.TrainJob):
    """What a training worker gets: the `align` section itself, the reference policy and the validated pairs."""

    align: AlignConfig
    reference_path: str
    preference_path: str
    preference_eval_path: str | None = None
    reward_adapter_dir: str | None = None  # rlhf: URI where the reward model's adapter is kept across restarts


# --- driver side -------------------------------------------------------------------------------------------------

def cache_key(cfg: PipelineConfig, ctx: RunContext, sft_adapter_dir: str, preference_path: str,
              preference_digest: str, preference_eval_path: str | None = None) -> str:
    """The align and model sections, the worker count, the digest of the pairs the workers read (the shards
    themselves; `preference_digest` is the source file's) and the SFT adapter's digest."""
    return content_key("align", {"align": cfg.align, "model": cfg.model, "compute": cfg.compute.num_workers},
                       {"preference": data_digest(ctx.local(preference_path)), "source": preference_digest,
                        "sft_adapter": dir_digest(ctx.local(sft_adapter_dir)),
                        "base_model": ctx.base_model, "preference_eval": str(preference_eval_path)})


def run_align(cfg: PipelineConfig, ctx: RunContext, sft_adapter_dir: str, preference_path: str,
              preference_digest: str, preference_eval_path: str | None = None) -> AlignOutput:
    """Merge the SFT model (the reference), train the alignment adapter on Ray, log it all."""
    a = cfg.align
    key = cache_key(cfg, ctx, sft_adapter_dir, preference_path, preference_digest, preference_eval_path)
    reward_dir = reward_adapter_dir(cfg, ctx, key)  # a reward model to reuse is checked before any work
    out_dir = ctx.stage_dir("align", key)
    folders = ("adapter", "reward_adapter") if a.method == "rlhf" else ("adapter",)
    with tracking.stage_run(ctx.tracking_uri, ctx.parent_run_id, "align", key) as run_id:
        tracking.log_params(ctx.tracking_uri, run_id, a.model_dump(mode="json"), prefix="align")
        dtype, why = models.precision_choice(a.precision)  # the workers choose the same: said once, here
        tracking.log_params(ctx.tracking_uri, run_id, {"chosen": dtype, "reason": why}, prefix="precision")
        print(f"align: {why}")
        ray_runner.ensure_ray(cfg.compute)
        reference = merge.merge_on_ray(ctx.storage, ctx.base_model, sft_adapter_dir,
                                       ctx.stage_uri("align", key, "sft_merged"), cfg.compute)
        job = AlignJob(align=a, compute=cfg.compute, storage=ctx.storage, system_prompt=cfg.model.system_prompt,
                       reference_path=reference, preference_path=preference_path,
                       preference_eval_path=preference_eval_path, reward_adapter_dir=reward_dir,
                       tracking_uri=ctx.tracking_uri, mlflow_run_id=run_id)
        metrics = training.fit(train_loop, job, f"align-{key}", out_dir, ctx.stage_uri("align", key), folders)
        tracking.client_for(ctx.tracking_uri).set_tag(run_id, "alignpipe.reference_path", reference)
        panels = ([(f"{a.method}: loss", tuple(k for k in RLHF_CURVES if "loss" in k)),
                   (f"{a.method}: reward model accuracy / policy reward", tuple(k for k in RLHF_CURVES if "loss" not in k))]
                  if a.method == "rlhf" else
                  [(f"{a.method}: loss", ("loss",)), (f"{a.method}: rewards", DPO_CURVES[1:])])
        training.log_result(ctx.tracking_uri, run_id, metrics, out_dir, folders, panels, "plots/align_curves.png")
    print(f"align ({a.method}): {metrics.get('global_step', 0):.0f} steps, "
          f"train loss {metrics.get('train_loss', float('nan')):.4f}")
    return AlignOutput(method=a.method, base_path=reference, adapter_dir=ctx.stage_uri("align", key, "adapter"),
                       content_key=key,
                       mlflow_run_id=run_id, metrics=metrics)


def reward_adapter_dir(cfg: PipelineConfig, ctx: RunContext, key: str) -> str | None:
    """rlhf: where the reward model's adapter is kept (this stage's folder), or the trained one to reuse
    (`align.rlhf.reward_adapter`), which must hold a reward model."""
    if cfg.align.method != "rlhf":
        return None
    reuse = cfg.align.rlhf.reward_adapter
    if reuse is None:
        return ctx.stage_uri("align", key, "reward_adapter")
    if not ctx.storage.exists(join(reuse, REWARD_MARKER)):
        raise ConfigError(f"align.rlhf.reward_adapter={reuse!r} holds no trained reward model ({REWARD_MARKER}): "
                          "point it at the `reward_adapter` folder of an earlier rlhf align stage, or unset it")
    return reuse


# --- on each Ray Train worker ------------------------------------------------------------------------------------

def train_loop(config: dict) -> None:
    """Train the method's adapter (rlhf: the reward model first), report checkpoints, save the adapter."""
    job = AlignJob.model_validate(config)
    a = job.align
    run = training.WorkerRun(job, "align")
    if run.finished:
        return
    extra = None
    if a.method == "rlhf":
        reward_model, reward_dir = _reward_model(job, run)
        trainer, tokenizer = build_policy_trainer(job, reward_model, run.scratch, run.callbacks)
        extra = {"reward_adapter": reward_dir}  # rank 0's copy goes into the final checkpoint
    else:
        rows = run.rows(job.storage.fetch(job.preference_path))  # this worker's own share of the rows
        trainer, tokenizer = build_trainer(job, run.scratch, run.callbacks, rows)
    trainer = run.prepare(trainer)
    if a.max_steps != 0:
        policy_eval = a.method == "rlhf" and trainer.eval_dataset is not None
        if policy_eval and run.resume_dir is None:  # a resumed run has trained already: its start is not the SFT model
            run.summary["policy/reward_start"] = policy_reward(trainer, a.seed)
        run.train(trainer)
        if policy_eval:
            run.summary["policy/reward_end"] = policy_reward(trainer, a.seed)
        if run.world_size > 1:  # DDP kept every rank's weights identical?
            run.summary["ranks_in_sync"] = float(ray_runner.ranks_in_sync(trainer.model))
    tokenizer.padding_side = "right"
    run.finish(trainer, tokenizer, extra if run.rank0 else None)


def build_trainer(job: AlignJob, output_dir: str, callbacks: list, rows: list[dict] | None = None):
    """The TRL trainer of `align.method` (dpo, orpo or kto) on the merged SFT model, trained on `rows` (default:
    every preference pair); rlhf has its own two."""
    a, use_gpu = job.align, job.compute.use_gpu
    dtype = models.dtype_for(a.precision)
    reference = job.storage.fetch(job.reference_path)
    tokenizer = models.load_tokenizer(reference)
    model = models.load_model(reference, dtype=dtype)
    model.set_attn_implementation(models.training_attention(a.attention, use_gpu, a.max_length))
    rows = load_canonical(job.storage.fetch(job.preference_path)) if rows is None else rows
    common = training.trainer_args(a, output_dir, use_gpu, dtype)
    peft = training.peft_config(a.peft)
    if a.method == "dpo":
        from trl import DPOConfig, DPOTrainer

        # ref_model=None with a PEFT model: TRL computes the reference with the adapter disabled, i.e. the
        # merged SFT model itself; no second copy of the weights is kept.
        # sft_loss_weight > 0: TRL sums the sigmoid (DPO) loss and the chosen answers' NLL with these weights (RPO)
        losses = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, a.sft_loss_weight]} \
            if a.sft_loss_weight else {}
        args = DPOConfig(**common, beta=a.beta, max_length=a.max_length, precompute_ref_log_probs=False, **losses)
        trainer = DPOTrainer(model=model, ref_model=None, args=args,
                             train_dataset=pairs_dataset(rows, job.system_prompt, a.seed), processing_class=tokenizer,
                             peft_config=peft, callbacks=callbacks)
    elif a.method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        args = ORPOConfig(**common, beta=a.beta, max_length=a.max_length)
        trainer = ORPOTrainer(model=model, args=args, train_dataset=pairs_dataset(rows, job.system_prompt, a.seed),
                              processing_class=tokenizer, peft_config=peft, callbacks=callbacks)
    elif a.method == "kto":
        from datasets import Dataset
        from trl import KTOConfig, KTOTrainer

        unpaired = Dataset.from_list(to_unpaired([as_conversations(r, job.system_prompt) for r in rows]))
        args = KTOConfig(**common, beta=a.beta, max_length=a.max_length)
        trainer = KTOTrainer(model=model, ref_model=None, args=args, train_dataset=unpaired.shuffle(seed=a.seed),
                             processing_class=tokenizer, peft_config=peft, callbacks=callbacks)
    else:
        raise ValueError(f"build_trainer does not build {a.method!r}")
    return training.with_kernels(trainer, job.compute), tokenizer


def pairs_dataset(rows: list[dict], system_prompt: str | None, seed: int):
    """Canonical pairs -> TRL conversational preference rows (prompt/chosen/rejected), shuffled."""
    from datasets import Dataset

    examples = [as_conversations(r, system_prompt) for r in rows]
    random.Random(seed).shuffle(examples)
    return Dataset.from_list(examples)


def train_reward_model(job: AlignJob, output_dir: str, callbacks: list) -> tuple[Any, Any, dict[str, float]]:
    """rlhf, phase 1: a LoRA reward model (TRL RewardTrainer) on the merged SFT model, scored on held-out pairs.

    Returns:
        (trainer, tokenizer, {"reward_model/accuracy": held-out share of pairs ranked right, ...}).
    """
    from trl import RewardConfig, RewardTrainer

    a, r = job.align, job.align.rlhf
    dtype = models.dtype_for(a.precision)
    reference = job.storage.fetch(job.reference_path)
    tokenizer = models.load_tokenizer(reference)
    model = _scorer(reference, dtype, tokenizer)
    rows = load_canonical(job.storage.fetch(job.preference_path))
    held = load_canonical(job.storage.fetch(job.preference_eval_path)) if job.preference_eval_path else None
    if held is None:  # no held-out pairs configured: hold back a slice of the training pairs
        rows = rows[:]
        random.Random(a.seed).shuffle(rows)
        n_eval = max(1, int(len(rows) * a.eval_fraction))
        rows, held = rows[n_eval:], rows[:n_eval]
    phase = a.model_copy(update={"max_steps": r.reward_steps, "learning_rate": r.reward_learning_rate})
    args = RewardConfig(**{**training.trainer_args(phase, output_dir, job.compute.use_gpu, dtype),
                           "save_strategy": "no"}, max_length=a.max_length)
    trainer = RewardTrainer(model=model, args=args, train_dataset=pairs_dataset(rows, job.system_prompt, a.seed),
                            eval_dataset=pairs_dataset(held, job.system_prompt, a.seed), processing_class=tokenizer,
                            peft_config=training.peft_config(a.peft.model_copy(update={"method": "lora"}), "SEQ_CLS"),
                            callbacks=callbacks)
    trainer.train()
    scores = trainer.evaluate()
    return trainer, tokenizer, {"reward_model/accuracy": scores["eval_accuracy"],
                                "reward_model/margin": scores.get("eval_margin", float("nan")),
                                "reward_model/eval_pairs": float(len(held))}


def build_policy_trainer(job: AlignJob, reward_model, output_dir: str, callbacks: list):
    """rlhf, phase 2: RLOO (or GRPO) of a new adapter on the merged SFT model, rewarded by the reward model."""
    from datasets import Dataset

    a, r = job.align, job.align.rlhf
    dtype = models.dtype_for(a.precision)
    reference = job.storage.fetch(job.reference_path)
    tokenizer = models.load_tokenizer(reference)
    tokenizer.padding_side = "left"  # generation pads on the left
    model = models.load_model(reference, dtype=dtype)
    model.set_attn_implementation(models.training_attention(a.attention, job.compute.use_gpu, a.max_length))

    def prompts_of(rows):
        return Dataset.from_list([{"prompt": as_conversations(row, job.system_prompt)["prompt"]} for row in rows])

    prompts = prompts_of(load_canonical(job.storage.fetch(job.preference_path))).shuffle(seed=a.seed)
    # policy/reward_start and _end: the same prompts (held-out pairs' where configured) answered before and after
    fixed = (prompts_of(load_canonical(job.storage.fetch(job.preference_eval_path))) if job.preference_eval_path
             else prompts)
    eval_prompts = fixed.select(range(min(r.eval_prompts, len(fixed)))) if r.eval_prompts else None
    k = r.num_generations
    phase = a.model_copy(update={"max_steps": r.policy_steps, "learning_rate": r.policy_learning_rate,
                                 "batch_size": k * max(1, a.batch_size // k)})  # whole groups of k answers per batch
    common = training.trainer_args(phase, output_dir, job.compute.use_gpu, dtype)
    policy = dict(num_generations=k, max_completion_length=r.max_new_tokens, temperature=r.temperature,
                  beta=r.kl_beta)
    if r.policy_optimizer == "rloo":
        from trl import RLOOConfig, RLOOTrainer

        trainer_cls, args = RLOOTrainer, RLOOConfig(**common, **policy)
    else:
        from trl import GRPOConfig, GRPOTrainer

        trainer_cls, args = GRPOTrainer, GRPOConfig(**common, **policy)
    trainer = trainer_cls(model=model, reward_funcs=reward_model, args=args, train_dataset=prompts,
                          eval_dataset=eval_prompts, processing_class=tokenizer, reward_processing_classes=tokenizer,
                          peft_config=training.peft_config(a.peft), callbacks=callbacks)
    return training.with_kernels(trainer, job.compute), tokenizer


def policy_reward(trainer, seed: int) -> float:
    """The policy's mean reward on the trainer's fixed eval prompts (num_generations sampled answers each), with
    the same seed every time: the training curve's `reward` is one batch of different prompts per step, too
    noisy to compare its first and last points."""
    from transformers import set_seed

    set_seed(seed)
    return trainer.evaluate()["eval_reward"]


def _reward_model(job: AlignJob, run: training.WorkerRun):
    """rlhf phase 1, done once: reuse the reward adapter published in storage when a restarted run finds it, else
    train it (rank 0 publishes it). Returns the merged reward model and a local copy of its adapter.

    Its curves go through the run's stream buffer (one buffer and spool file per run and worker), prefixed.
    """
    from peft import PeftModel

    from alignpipe.callbacks import MlflowStream

    if job.storage.exists(job.reward_adapter_dir):
        saved = Path(job.storage.fetch(job.reward_adapter_dir))
        if (saved / REWARD_MARKER).is_file():
            reference = job.storage.fetch(job.reference_path)
            base = _scorer(reference, models.dtype_for(job.align.precision), models.load_tokenizer(reference))
            run.summary.update(json.loads((saved / REWARD_MARKER).read_text()))
            return PeftModel.from_pretrained(base, str(saved)).merge_and_unload().eval(), str(saved)
    prefixed = MlflowStream(job.tracking_uri, job.mlflow_run_id, buffer=run.stream.buffer, prefix="reward_model/")
    trainer, _, scores = train_reward_model(job, str(Path(run.scratch) / "reward"), [prefixed])
    run.summary.update(scores)  # evaluate() above already streamed them as reward_model/eval_accuracy, ...
    saved = Path(run.scratch) / "reward_adapter"
    if run.rank0:
        trainer.save_model(str(saved))
        (saved / REWARD_MARKER).write_text(json.dumps(scores))
        job.storage.publish(saved, job.reward_adapter_dir)
    model = trainer.model.merge_and_unload() if hasattr(trainer.model, "merge_and_unload") else trainer.model
    return model.eval(), str(saved)


def _scorer(path: str, dtype: str, tokenizer):
    """The merged SFT model with a fresh one-output head: the reward model's starting point."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=getattr(torch, dtype))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model
