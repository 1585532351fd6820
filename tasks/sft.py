"""SFT stage: a PEFT adapter (LoRA by default) trained with TRL's SFTTrainer inside Ray Train.

Reads the validated training rows (Parquet shards written by `validate`) and the base model, both from storage
(`alignpipe.storage`: the workdir, or object storage on a cluster); publishes the adapter + tokenizer folder under the stage's
content-addressed folder there and streams curves to the stage's nested MLflow run. The driver side (`run_sft`) and
what each Ray Train worker runs (`train_loop`) are both here; what they share with `align` is `alignpipe.training`.
"""

from __future__ import annotations

import random

from pydantic import BaseModel

from alignpipe import chat, models, ray_runner, tracking, training
from alignpipe.config import PipelineConfig
from alignpipe.config.sft import SftConfig
from alignpipe.data.formats import load_canonical
from alignpipe.runs import RunContext, content_key, data_digest


class SftOutput(BaseModel):
    adapter_dir: str            # URI in storage of the PEFT adapter + tokenizer (PeftModel.from_pretrained(base, it))
    content_key: str
    mlflow_run_id: str
    metrics: dict[str, float]


class SftJob(training.TrainJob):
    """What a training worker gets: the `sft` section itself, the base model and the validated training rows."""

    sft: SftConfig
    base_model: str             # URIs in the job's storage (or a hub id for the base)
    train_path: str


def job_for(cfg: PipelineConfig, base_model: str, train_path: str, **run) -> SftJob:
    return SftJob(sft=cfg.sft, compute=cfg.compute, system_prompt=cfg.model.system_prompt, base_model=base_model,
                  train_path=train_path, **run)


# --- driver side -------------------------------------------------------------------------------------------------

def cache_key(cfg: PipelineConfig, ctx: RunContext, train_path: str, train_digest: str) -> str:
    """The sft and model sections, the worker count, the digest of the training rows the workers read (the shards
    themselves; `train_digest` is the source file's) and the base model."""
    return content_key("sft", {"sft": cfg.sft, "model": cfg.model, "compute": cfg.compute.num_workers},
                       {"train": data_digest(ctx.local(train_path)), "source": train_digest,
                        "base_model": ctx.base_model})


def run_sft(cfg: PipelineConfig, ctx: RunContext, train_path: str, train_digest: str) -> SftOutput:
    """Train on Ray, publish the adapter in storage (and keep a copy next to the stage's other outputs), log it all."""
    key = cache_key(cfg, ctx, train_path, train_digest)
    out_dir = ctx.stage_dir("sft", key)
    with tracking.stage_run(ctx.tracking_uri, ctx.parent_run_id, "sft", key) as run_id:
        tracking.log_params(ctx.tracking_uri, run_id, cfg.sft.model_dump(mode="json"), prefix="sft")
        # the workers make the same choice (models.dtype_for) on their machine: said once here, not once per worker
        dtype, why = models.precision_choice(cfg.sft.precision)
        tracking.log_params(ctx.tracking_uri, run_id, {"chosen": dtype, "reason": why}, prefix="precision")
        print(f"sft: {why}")
        job = job_for(cfg, ctx.base_model, train_path, storage=ctx.storage, tracking_uri=ctx.tracking_uri,
                      mlflow_run_id=run_id)
        metrics = training.fit(train_loop, job, f"sft-{key}", out_dir, ctx.stage_uri("sft", key))
        training.log_result(ctx.tracking_uri, run_id, metrics, out_dir, ("adapter",),
                            [("SFT loss", ("loss", "eval_loss"))], "plots/loss_curve.png")
    print(f"sft: {metrics.get('global_step', 0):.0f} steps, train loss {metrics.get('train_loss', float('nan')):.4f}, "
          f"{metrics['trainable_params']:.0f} trainable params ({metrics['trainable_share']:.2%})")
    return SftOutput(adapter_dir=ctx.stage_uri("sft", key, "adapter"), content_key=key, mlflow_run_id=run_id,
                     metrics=metrics)


# --- on each Ray Train worker ------------------------------------------------------------------------------------

def train_loop(config: dict) -> None:
    """Build the model and data, train, report checkpoints, save the adapter."""
    job = SftJob.model_validate(config)
    run = training.WorkerRun(job, "sft")
    if run.finished:
        return
    rows = run.rows(job.storage.fetch(job.train_path))  # this worker's own share of the rows
    trainer, tokenizer = build_trainer(job, run.scratch, run.callbacks, log_progress=run.rank0, rows=rows)
    trainer = run.prepare(trainer)
    if job.sft.max_steps != 0:
        run.train(trainer)
        if trainer.eval_dataset is not None:
            run.summary["eval_loss"] = final_eval_loss(trainer)
        if run.world_size > 1:  # DDP kept every rank's weights identical?
            run.summary["ranks_in_sync"] = float(ray_runner.ranks_in_sync(trainer.model))
    run.finish(trainer, tokenizer)


def build_trainer(job: SftJob, output_dir: str, callbacks: list, log_progress: bool = True,
                  rows: list[dict] | None = None):
    """The TRL SFTTrainer for `job` on `rows` (default: every training row); used by Ray workers, tests and
    benchmarks. With several workers each passes its own rows, and its share of `sft.eval_max_rows`."""
    from transformers import EarlyStoppingCallback
    from trl import SFTConfig, SFTTrainer

    s, use_gpu = job.sft, job.compute.use_gpu
    dtype = models.dtype_for(s.precision)
    base = job.storage.fetch(job.base_model)
    tokenizer = models.load_tokenizer(base)
    model = models.load_model(base, dtype=dtype, quantized_base=s.quantized_base)
    if s.quantized_base:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=s.gradient_checkpointing)
    rows = load_canonical(job.storage.fetch(job.train_path)) if rows is None else rows
    eval_cap = -(-s.eval_max_rows // job.compute.num_workers) if s.eval_max_rows else None  # each worker's share
    train_ds, eval_ds = build_datasets(tokenizer, rows, job.system_prompt, s.max_length, s.eval_fraction, s.seed,
                                       eval_cap)
    longest = max((len(ids) for ids in train_ds["input_ids"]), default=0)
    model.set_attn_implementation(models.training_attention(s.attention, use_gpu, longest))
    args = SFTConfig(
        **{**training.trainer_args(s, output_dir, use_gpu, dtype), "disable_tqdm": not log_progress},
        eval_strategy="steps" if eval_ds is not None else "no",
        eval_steps=s.eval_steps,
        load_best_model_at_end=bool(s.early_stopping_patience and eval_ds is not None),
        metric_for_best_model="eval_loss",
        max_length=s.max_length,
        train_sampling_strategy="group_by_length",  # batches of similar length: less padding to compute
        include_num_input_tokens_seen="non_padding",  # the run's tokens/s: the Trainer's count over its runtime
    )
    if args.load_best_model_at_end:
        callbacks = [*callbacks, EarlyStoppingCallback(early_stopping_patience=s.early_stopping_patience)]
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, peft_config=training.peft_config(s.peft), callbacks=callbacks)
    return training.with_kernels(trainer, job.compute), tokenizer


def build_datasets(tokenizer, rows: list[dict], system_prompt: str | None, max_length: int, eval_fraction: float,
                   seed: int, eval_max_rows: int | None = None):
    """Tokenize canonical rows with assistant-only loss masks; split off a validation slice (`eval_fraction` of the
    rows, at most `eval_max_rows`)."""
    from datasets import Dataset

    encoded = [chat.tokenize_for_sft(tokenizer, chat.with_system(r["messages"], system_prompt), max_length)
               for r in rows]
    encoded = [e for e in encoded if any(e["assistant_masks"])]  # truncated away entirely: nothing to learn
    random.Random(seed).shuffle(encoded)
    n_eval = min(int(len(encoded) * eval_fraction), eval_max_rows or len(encoded))
    train = Dataset.from_list(encoded[n_eval:])
    return train, (Dataset.from_list(encoded[:n_eval]) if n_eval else None)


def final_eval_loss(trainer) -> float:
    """Eval loss of the weights training ended with: the Trainer's own eval at the last step when there was one
    (it evaluates there by itself), unless the best checkpoint was reloaded at the end, which changes the weights."""
    if not trainer.args.load_best_model_at_end:
        last = next((e for e in reversed(trainer.state.log_history) if "eval_loss" in e), None)
        if last is not None and last.get("step") == trainer.state.global_step:
            return last["eval_loss"]
    return trainer.evaluate()["eval_loss"]
