"""What the training stages share: the job a Ray Train worker gets, PEFT and trainer arguments, the worker-side
loop around a TRL trainer (resume, train, final report) and the driver side (fit, copy out, log).

A training stage (`alignpipe.tasks.sft`, `alignpipe.tasks.align`) builds its dataset and its TRL trainer; the rest
is here, once. Nothing here imports Prefect: Ray workers import this module. Nor transformers at import time: the
flow's process imports this module too, and only the workers train (their callbacks: `alignpipe.callbacks`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from alignpipe import kernels, ray_runner, tracking
from alignpipe.config.compute import ComputeConfig
from alignpipe.config.training import PeftConfig, TrainingConfig
from alignpipe.data.formats import load_canonical
from alignpipe.metric_buffer import spool_path
from alignpipe.storage import Storage, join

FINAL_MARKER = "final.json"  # in the last checkpoint: the finished work's summary (its presence means "done")


class TrainJob(BaseModel):
    """What a training worker needs besides its stage's section. Crosses the Ray boundary as JSON and is
    validated again on the worker (`Job.model_validate(config)`)."""

    compute: ComputeConfig
    # where the job's URIs point (compute.storage_path); default: local paths, as a test or benchmark passes them
    storage: Storage = Field(default_factory=lambda: Storage.of(None, "."))
    system_prompt: str | None = None
    tracking_uri: str | None = None     # None: no MLflow run (benchmarks, tests building a trainer directly)
    mlflow_run_id: str | None = None

    @property
    def threads(self) -> int:
        return max(1, int(self.compute.cpus_per_worker))


def peft_config(p: PeftConfig, task_type: str = "CAUSAL_LM"):
    """The PEFT config object for the configured method."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType

    task = TaskType[task_type]
    if p.method == "lora":
        return LoraConfig(r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout, target_modules=p.target_modules,
                          task_type=task)
    if p.method == "ia3":
        targets = p.target_modules if p.target_modules != "all-linear" else ["k_proj", "v_proj", "down_proj"]
        ff = [m for m in targets if m in ("down_proj", "fc2", "mlp.c_proj")]
        return IA3Config(target_modules=targets, feedforward_modules=ff, task_type=task)
    if p.method == "prompt_tuning":
        return PromptTuningConfig(num_virtual_tokens=p.num_virtual_tokens, task_type=task)
    return PrefixTuningConfig(num_virtual_tokens=p.num_virtual_tokens, task_type=task)


def trainer_args(t: TrainingConfig, output_dir: str, use_gpu: bool, dtype: str) -> dict[str, Any]:
    """The TrainingArguments every TRL trainer here shares; a stage adds its trainer's own."""
    return dict(
        output_dir=output_dir,
        max_steps=t.max_steps if t.max_steps > 0 else -1,
        num_train_epochs=t.epochs,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a share of the steps
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=1,  # scratch only: Ray storage keeps `compute.checkpoints_to_keep`
        # TRL defaults to True (~50% slower on CPU); transformers 5 names it activation_checkpointing
        activation_checkpointing=t.gradient_checkpointing,
        use_cpu=not use_gpu,
        bf16=dtype == "bfloat16",  # autocast; the adapter weights themselves stay fp32
        seed=t.seed,
        report_to="none",
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        disable_tqdm=True,
    )


def with_kernels(trainer, compute: ComputeConfig):
    """The trainer with the speed-ups `compute.kernels` enables on this machine (see `alignpipe.kernels`)."""
    kernels.apply_training_kernels(trainer, kernels.select(compute.kernels, use_gpu=compute.use_gpu))
    return trainer


class WorkerRun:
    """One training stage on one Ray Train worker, from the last checkpoint to the final report.

    A stage's `train_loop` reads top to bottom: `WorkerRun(job, stage)`, return at once if `finished`, build the
    trainer with `callbacks` in `scratch`, `prepare` it, `train` it (adding its own figures to `summary`), `finish`.
    """

    def __init__(self, job: TrainJob, stage: str):
        import ray.train
        from ray.train.huggingface.transformers import RayTrainReportCallback

        from alignpipe.callbacks import MlflowStream, ProgressReport

        ray_runner.set_worker_threads(job.threads)
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.rank0 = self.rank == 0
        self.summary: dict[str, float] = {}
        self.resume_dir, self.finished = ray_runner.resume_from_checkpoint(stage, FINAL_MARKER)
        if self.finished:  # this exact work already finished: its result was handed back
            return
        self.scratch = tempfile.mkdtemp(prefix=f"{stage}-scratch-")
        self.stream = MlflowStream(job.tracking_uri, job.mlflow_run_id, spool=spool_path(job.mlflow_run_id, self.rank))
        self.callbacks = [self.stream, RayTrainReportCallback()] + ([ProgressReport(stage)] if self.rank0 else [])

    def rows(self, path: str) -> list[dict[str, Any]]:
        """This worker's canonical rows of `path` (validate's shards: only its own row groups, disjoint across the
        workers; a JSONL file: all of it). With several workers, the summary says whether they were disjoint."""
        rows = load_canonical(path, self.rank, self.world_size)
        if self.world_size > 1:
            self.summary.update(rows_disjoint(rows))
        return rows

    def prepare(self, trainer):
        """Ray Train's wrapping of the trainer; the adapter's size goes to the summary (and to MLflow at step 0).

        With several workers the trainer iterates this worker's own rows (`rank_local`), the same count on each."""
        from ray.train.huggingface.transformers import prepare_trainer

        trainer = prepare_trainer(rank_local(trainer, self.world_size))  # its loss lines and bars reach
        trainable, total = trainer.model.get_nb_trainable_parameters()  # `alignpipe run`'s log file, off the console
        self.summary.update({"trainable_params": trainable, "total_params": total, "trainable_share": trainable / total,
                             "train_rows": len(trainer.train_dataset) * self.world_size})
        if self.rank0:
            self.stream.buffer.log(self.summary, step=0)
        return trainer

    def train(self, trainer) -> None:
        """Train, from the restored checkpoint when there is one."""
        from ray.train.huggingface.transformers import RayTrainReportCallback

        resume = self.resume_dir / RayTrainReportCallback.CHECKPOINT_NAME if self.resume_dir else None
        out = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        runtime = out.metrics.get("train_runtime", 0.0)
        self.summary.update({"train_loss": out.training_loss, "global_step": trainer.state.global_step,
                             "train_runtime_s": runtime})
        if tokens := trainer.state.num_input_tokens_seen:  # counted where the trainer's args ask for it (sft)
            self.summary["train_tokens"] = tokens
            if resume is None and runtime:  # a resumed run's runtime leaves out the steps before its restart
                self.summary["train_tokens_per_s"] = tokens / runtime

    def finish(self, trainer, tokenizer, extra_dirs: dict[str, str] | None = None) -> None:
        """Save the adapter (+ tokenizer and `extra_dirs`) and report it as the last checkpoint, with the summary."""
        self.stream.buffer.drain()  # before the final report: the driver ends the MLflow run right after it
        final_dir = Path(tempfile.mkdtemp(prefix="final-"))
        if self.rank0:
            trainer.save_model(str(final_dir / "adapter"))
            tokenizer.save_pretrained(str(final_dir / "adapter"))
            for name, folder in (extra_dirs or {}).items():
                shutil.copytree(folder, final_dir / name)
            (final_dir / FINAL_MARKER).write_text(json.dumps(self.summary))
        ray_runner.report_final(self.summary, final_dir, self.rank0, self.resume_dir)
        shutil.rmtree(self.scratch, ignore_errors=True)


def rank_local(trainer, world_size: int):
    """With several DDP workers, `trainer` iterates its own dataset whole instead of a slice of it.

    Each worker holds only its rows (`WorkerRun.rows`); the Trainer would shard them again across the processes
    (accelerate) and keep 1/world_size of them. So, as Ray's `prepare_trainer` does for Ray Data iterables, its
    train and eval dataloaders are built over the local datasets, with the trainer's collator and sampling
    strategy; every worker first keeps the same number of rows of each (the smallest worker's, after the
    trainer's own filtering), so the workers step, and gather eval losses, in lockstep. One worker: unchanged.
    """
    if world_size < 2:
        return trainer
    trainer.train_dataset = _equal_count(trainer.train_dataset)
    if trainer.eval_dataset is not None and not isinstance(trainer.eval_dataset, dict):
        trainer.eval_dataset = _equal_count(trainer.eval_dataset)
    base = trainer.__class__

    class RankLocal(base):
        def get_train_dataloader(self):
            return _local_loader(self, self.train_dataset, self.args.per_device_train_batch_size, training=True)

        def get_eval_dataloader(self, eval_dataset=None):
            if isinstance(eval_dataset, str) or isinstance(self.eval_dataset, dict):
                return super().get_eval_dataloader(eval_dataset)
            data = self.eval_dataset if eval_dataset is None else eval_dataset
            return _local_loader(self, data, self.args.per_device_eval_batch_size, training=False)

    RankLocal.__name__ = RankLocal.__qualname__ = base.__name__
    trainer.__class__ = RankLocal
    return trainer


def _equal_count(dataset):
    """The first n rows of `dataset`, n the smallest count over the workers (a collective: call it on every rank)."""
    import torch
    import torch.distributed as dist

    n = torch.tensor([len(dataset)])
    dist.all_reduce(n, op=dist.ReduceOp.MIN)
    return dataset if int(n) == len(dataset) else dataset.select(range(int(n)))


def _local_loader(trainer, dataset, batch_size: int, training: bool):
    """A DataLoader over a worker's own dataset, not sharded again: the Trainer's collator, its sampling strategy
    (group_by_length, else random) seeded by `args.seed`, in order for evaluation."""
    import torch
    from torch.utils.data import DataLoader, RandomSampler, SequentialSampler
    from transformers.trainer_pt_utils import LengthGroupedSampler

    args = trainer.args
    generator = torch.Generator().manual_seed(args.seed)
    if not training:
        sampler = SequentialSampler(dataset)
    elif args.train_sampling_strategy == "group_by_length":
        sampler = LengthGroupedSampler(batch_size * args.gradient_accumulation_steps, dataset=dataset,
                                       generator=generator)
    else:
        sampler = RandomSampler(dataset, generator=generator)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=trainer.data_collator,
                      drop_last=args.dataloader_drop_last and training, num_workers=args.dataloader_num_workers)


def rows_disjoint(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Whether no row was read by two workers (64-bit hashes gathered from every rank; a collective), and how many
    rows they read in all."""
    import hashlib

    import torch.distributed as dist

    mine = {hashlib.blake2b(json.dumps(r, sort_keys=True).encode(), digest_size=8).digest() for r in rows}
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, (len(rows), mine))
    union = set().union(*(hashes for _, hashes in every))
    return {"rows_disjoint": float(len(union) == sum(len(h) for _, h in every)),
            "rows_read": float(sum(n for n, _ in every))}


def fit(train_loop: Callable[[dict], None], job: TrainJob, name: str, out_dir: Path, out_uri: str,
        folders: tuple[str, ...] = ("adapter",)) -> dict[str, float]:
    """Driver side: run `train_loop` on Ray Train (checkpoints in the job's storage), copy the finished `folders`
    from the last checkpoint into `out_dir` (for MLflow) and publish them under `out_uri` (for later stages' workers;
    the same folder on default storage). Returns the workers' final summary."""
    ray_runner.ensure_ray(job.compute)
    path, filesystem = job.storage.ray_storage()
    result = ray_runner.fit(train_loop, job.model_dump(mode="json"), job.compute, name=name, storage=path,
                            filesystem=filesystem)
    with result.checkpoint.as_directory() as ckpt:
        for folder in folders:
            shutil.rmtree(out_dir / folder, ignore_errors=True)
            shutil.copytree(Path(ckpt) / folder, out_dir / folder)
            job.storage.publish(out_dir / folder, join(out_uri, folder))
        return json.loads((Path(ckpt) / FINAL_MARKER).read_text())


def log_result(uri: str, run_id: str, metrics: dict[str, float], out_dir: Path, folders: tuple[str, ...],
               panels: list[tuple[str, tuple[str, ...]]], plot: str) -> None:
    """The final metrics, the curves (one panel per (title, metric keys)) and the output folders, to the stage run."""
    tracking.log_metrics(uri, run_id, {f"final/{k}": v for k, v in metrics.items()})
    _log_curves(uri, run_id, panels, plot)
    for folder in folders:
        tracking.client_for(uri).log_artifacts(run_id, str(out_dir / folder), folder)


def _log_curves(uri: str, run_id: str, panels: list[tuple[str, tuple[str, ...]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels) - 2 * (len(panels) > 1), 3.5), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            points = tracking.metric_history(uri, run_id, key)
            if points:
                ax.plot(*zip(*sorted(points)), "o--" if "eval" in key else "-", label=key)
        ax.set_xlabel("step")
        ax.set_title(title)
        if ax.lines:  # a reused or zero-step run has no curve to label
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    tracking.log_figure(uri, run_id, fig, path)
    plt.close(fig)
