"""SFT inside a Ray Train worker: TRL's SFTTrainer with a PEFT adapter, checkpoints reported to Ray.

The driver side (`tasks.sft`: cache key, MLflow run, copying the result) hands `train_loop` a plain-data config.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from alignpipe import chat, models, ray_runner
from alignpipe.config.sft import PeftConfig
from alignpipe.data.formats import load_canonical
from alignpipe.lm_head import use_compact_lm_head
from alignpipe.metric_buffer import MetricBuffer, spool_path
from alignpipe.swiglu import use_recomputing_swiglu

FINAL_MARKER = "final.json"


def peft_config(p: PeftConfig):
    """The PEFT config object for the configured method."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType

    if p.method == "lora":
        return LoraConfig(r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout, target_modules=p.target_modules,
                          task_type=TaskType.CAUSAL_LM)
    if p.method == "ia3":
        targets = p.target_modules if p.target_modules != "all-linear" else ["k_proj", "v_proj", "down_proj"]
        ff = [m for m in targets if m in ("down_proj", "fc2", "mlp.c_proj")]
        return IA3Config(target_modules=targets, feedforward_modules=ff, task_type=TaskType.CAUSAL_LM)
    if p.method == "prompt_tuning":
        return PromptTuningConfig(num_virtual_tokens=p.num_virtual_tokens, task_type=TaskType.CAUSAL_LM)
    return PrefixTuningConfig(num_virtual_tokens=p.num_virtual_tokens, task_type=TaskType.CAUSAL_LM)


def build_datasets(tokenizer, rows: list[dict], system_prompt: str | None, max_length: int, eval_fraction: float,
                   seed: int):
    """Tokenize canonical rows with assistant-only loss masks; split off a validation slice."""
    from datasets import Dataset

    encoded = [chat.tokenize_for_sft(tokenizer, chat.with_system(r["messages"], system_prompt), max_length)
               for r in rows]
    encoded = [e for e in encoded if any(e["assistant_masks"])]  # truncated away entirely: nothing to learn
    random.Random(seed).shuffle(encoded)
    n_eval = int(len(encoded) * eval_fraction)
    train = Dataset.from_list(encoded[n_eval:])
    return train, (Dataset.from_list(encoded[:n_eval]) if n_eval else None)


class MlflowStream(TrainerCallback):
    """Streams the Trainer's logs to an MLflow run as training goes, with tokens/s between logs.

    Points go through a `MetricBuffer`, so a tracking server that is down or slow never stalls training;
    the end of training waits (bounded) for them to be written.

    Args:
        uri: MLflow tracking URI.
        run_id: the stage's MLflow run.
        spool: local JSONL file keeping the unwritten points across a worker restart (see `metric_buffer`).
        buffer: an existing buffer to share (one per run and process), instead of a new one.
    """

    def __init__(self, uri: str, run_id: str, spool: Path | None = None, buffer: MetricBuffer | None = None):
        self.uri, self.run_id = uri, run_id
        self.buffer = buffer or MetricBuffer(uri, run_id, spool)
        self._last = (time.perf_counter(), 0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        metrics = {k.replace("train_", "train/") if k.startswith("train_") else k: v for k, v in logs.items()}
        now, tokens = time.perf_counter(), logs.get("num_tokens")
        if tokens is not None and "loss" in logs:
            t0, n0 = self._last
            if tokens > n0 and now > t0:
                metrics["tokens_per_s"] = (tokens - n0) / (now - t0)
            self._last = (now, tokens)
        self.buffer.log(metrics, step=state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.buffer.drain()  # what this run logged is in MLflow before anyone reads it back


def final_eval_loss(trainer) -> float:
    """Eval loss of the weights training ended with.

    The Trainer evaluates at the last step by itself (the demo's third eval pass, ~11 s on 2 cores, repeated it):
    that entry is reused unless the best checkpoint was reloaded at the end, which changes the weights.
    """
    if not trainer.args.load_best_model_at_end:
        last = next((e for e in reversed(trainer.state.log_history) if "eval_loss" in e), None)
        if last is not None and last.get("step") == trainer.state.global_step:
            return last["eval_loss"]
    return trainer.evaluate()["eval_loss"]


def build_trainer(config: dict[str, Any], output_dir: str, callbacks: list, log_progress: bool = True):
    """The TRL SFTTrainer for `config` (the loop config `run_sft` builds); used by Ray workers and benchmarks."""
    from transformers import EarlyStoppingCallback
    from trl import SFTConfig, SFTTrainer

    s = config["sft"]
    dtype = models.dtype_for(s["precision"])
    tokenizer = models.load_tokenizer(config["base_model"])
    model = models.load_model(config["base_model"], dtype=dtype, quantized_base=s["quantized_base"])
    if s["quantized_base"]:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=s["gradient_checkpointing"])
    train_ds, eval_ds = build_datasets(tokenizer, load_canonical(config["train_path"]), config["system_prompt"],
                                       s["max_length"], s["eval_fraction"], s["seed"])
    use_gpu = config["use_gpu"]
    longest = max((len(ids) for ids in train_ds["input_ids"]), default=0)
    model.set_attn_implementation(models.training_attention(s["attention"], use_gpu, longest))
    args = SFTConfig(
        output_dir=output_dir,
        max_steps=s["max_steps"] if s["max_steps"] > 0 else -1,
        num_train_epochs=s["epochs"],
        per_device_train_batch_size=s["batch_size"],
        per_device_eval_batch_size=s["batch_size"],
        gradient_accumulation_steps=s["grad_accum"],
        learning_rate=s["learning_rate"],
        lr_scheduler_type=s["lr_scheduler"],
        warmup_steps=s["warmup_ratio"],
        logging_steps=s["logging_steps"],
        eval_strategy="steps" if eval_ds is not None else "no",
        eval_steps=s["eval_steps"],
        save_strategy="steps",
        save_steps=s["save_steps"],
        save_total_limit=1,  # scratch only: Ray storage keeps `checkpoints_to_keep`
        load_best_model_at_end=bool(s["early_stopping_patience"] and eval_ds is not None),
        metric_for_best_model="eval_loss",
        # TRL defaults to True (~50% slower on CPU); transformers 5 names it activation_checkpointing (the old
        # name still works but warns in every worker)
        activation_checkpointing=s["gradient_checkpointing"],
        use_cpu=not use_gpu,
        bf16=dtype == "bfloat16",  # autocast; the PEFT weights themselves stay fp32
        max_length=s["max_length"],
        seed=s["seed"],
        report_to="none",
        dataloader_num_workers=0,
        train_sampling_strategy="group_by_length",  # batches of similar length: less padding to compute
        ddp_find_unused_parameters=False,
        disable_tqdm=not log_progress,
    )
    if args.load_best_model_at_end:
        callbacks = [*callbacks, EarlyStoppingCallback(early_stopping_patience=s["early_stopping_patience"])]
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, peft_config=peft_config(PeftConfig(**s["peft"])),
                         callbacks=callbacks)
    use_compact_lm_head(trainer)  # CPU: TRL's fused head scores every position in fp32 (~55% of a step)
    use_recomputing_swiglu(trainer.model)  # one MLP activation less kept per layer (see alignpipe.swiglu)
    return trainer, tokenizer


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: build the model and data, train, report checkpoints, save the adapter."""
    import ray.train
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer

    ray_runner.set_worker_threads(config["threads"])
    rank0 = ray.train.get_context().get_world_rank() == 0
    s = config["sft"]

    resume_dir, finished = ray_runner.resume_from_checkpoint("sft", FINAL_MARKER)
    if finished:  # this exact work already finished: its result was handed back
        return

    scratch = tempfile.mkdtemp(prefix="sft-scratch-")
    stream = MlflowStream(config["tracking_uri"], config["mlflow_run_id"],
                          spool=spool_path(config["mlflow_run_id"], ray.train.get_context().get_world_rank()))
    trainer, tokenizer = build_trainer(config, scratch, [stream, RayTrainReportCallback()], log_progress=rank0)
    trainer = prepare_trainer(trainer)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    summary: dict[str, float] = {"trainable_params": trainable, "total_params": total,
                                 "trainable_share": trainable / total, "train_rows": len(trainer.train_dataset)}
    if rank0:
        stream.buffer.log(summary, step=0)
    if s["max_steps"] != 0:
        resume = resume_dir / RayTrainReportCallback.CHECKPOINT_NAME if resume_dir else None
        out = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        summary.update({"train_loss": out.training_loss, "global_step": trainer.state.global_step,
                        "train_runtime_s": out.metrics.get("train_runtime", 0.0)})
        if trainer.eval_dataset is not None:
            summary["eval_loss"] = final_eval_loss(trainer)
        if ray.train.get_context().get_world_size() > 1:  # DDP kept every rank's weights identical?
            summary["ranks_in_sync"] = float(ray_runner.ranks_in_sync(trainer.model))
    stream.buffer.drain()  # before the final report: the driver ends the MLflow run right after it
    final_dir = Path(tempfile.mkdtemp(prefix="sft-final-"))
    if rank0:
        trainer.save_model(str(final_dir / "adapter"))
        tokenizer.save_pretrained(str(final_dir / "adapter"))
        (final_dir / FINAL_MARKER).write_text(json.dumps(summary))
    ray_runner.report_final(summary, final_dir, rank0, resume_dir)
    shutil.rmtree(scratch, ignore_errors=True)
