"""SFT stage: a PEFT adapter (LoRA by default) trained with TRL's SFTTrainer inside Ray Train.

Reads the canonical training JSONL written by `validate`; writes the adapter + tokenizer folder to the
stage's content-addressed output dir, streams curves to the stage's nested MLflow run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from alignpipe import ray_runner, tracking
from alignpipe.config import PipelineConfig
from alignpipe.runs import RunContext, content_key
from alignpipe.workers.sft import FINAL_MARKER, train_loop


class SftOutput(BaseModel):
    adapter_dir: str            # PEFT adapter + tokenizer, loadable with PeftModel.from_pretrained(base, adapter_dir)
    content_key: str
    mlflow_run_id: str
    metrics: dict[str, float]


def loop_settings(cfg: PipelineConfig, base_model: str, train_path: str) -> dict[str, Any]:
    """Everything a training worker needs, as plain data (it crosses process and machine boundaries)."""
    return {"sft": cfg.sft.model_dump(mode="json"), "base_model": base_model,
            "system_prompt": cfg.model.system_prompt, "train_path": train_path, "use_gpu": cfg.compute.use_gpu}


def cache_key(cfg: PipelineConfig, ctx: RunContext, train_path: str, train_digest: str) -> str:
    """The sft and model sections, the worker count, the training data's digest and the base model."""
    return content_key("sft", {"sft": cfg.sft, "model": cfg.model, "compute": cfg.compute.num_workers},
                       {"train": train_digest, "base_model": ctx.base_model})


def run_sft(cfg: PipelineConfig, ctx: RunContext, train_path: str, train_digest: str) -> SftOutput:
    """Plain function behind the task: train on Ray, copy the adapter next to the stage's other outputs."""
    key = cache_key(cfg, ctx, train_path, train_digest)
    with tracking.stage_run(ctx.tracking_uri, ctx.parent_run_id, "sft", key) as run_id:
        tracking.log_params(ctx.tracking_uri, run_id, cfg.sft.model_dump(mode="json"), prefix="sft")
        ray_runner.ensure_ray(cfg.compute)
        loop_config = {**loop_settings(cfg, ctx.base_model, train_path), "tracking_uri": ctx.tracking_uri,
                       "mlflow_run_id": run_id}
        result = ray_runner.fit(train_loop, loop_config, cfg.compute, name=f"sft-{key}",
                                storage=ray_runner.storage_path(cfg.compute, ctx.workdir))
        out_dir = ctx.stage_dir("sft", key)
        adapter_dir = out_dir / "adapter"
        shutil.rmtree(adapter_dir, ignore_errors=True)
        with result.checkpoint.as_directory() as ckpt:
            shutil.copytree(Path(ckpt) / "adapter", adapter_dir)
            metrics = json.loads((Path(ckpt) / FINAL_MARKER).read_text())
        tracking.log_metrics(ctx.tracking_uri, run_id, {f"final/{k}": v for k, v in metrics.items()})
        _log_curves(ctx.tracking_uri, run_id)
        tracking.client_for(ctx.tracking_uri).log_artifacts(run_id, str(adapter_dir), "adapter")
    print(f"sft: {metrics.get('global_step', 0):.0f} steps, train loss {metrics.get('train_loss', float('nan')):.4f}, "
          f"{metrics['trainable_params']:.0f} trainable params ({metrics['trainable_share']:.2%})")
    return SftOutput(adapter_dir=str(adapter_dir), content_key=key, mlflow_run_id=run_id, metrics=metrics)


def _log_curves(uri: str, run_id: str) -> None:
    """Loss curves (train and eval) as a PNG on the stage run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, style in (("loss", "-"), ("eval_loss", "o--")):
        points = tracking.metric_history(uri, run_id, key)
        if points:
            ax.plot(*zip(*sorted(points)), style, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("SFT loss")
    if ax.lines:  # a reused or zero-step run has no curve to label
        ax.legend()
    ax.grid(alpha=0.3)
    tracking.log_figure(uri, run_id, fig, "plots/loss_curve.png")
    plt.close(fig)


@task(name="sft", cache_policy=NO_CACHE)
def sft(cfg: PipelineConfig, ctx: RunContext, train_path: str, train_digest: str) -> SftOutput:
    """Fine-tune the base model with a PEFT adapter on Ray Train."""
    return run_sft(cfg, ctx, train_path, train_digest)
