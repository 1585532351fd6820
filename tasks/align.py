"""Align stage: preference tuning of the SFT model with TRL inside Ray Train (DPO, ORPO, KTO or RLHF).

Reads the SFT adapter and the canonical preference pairs written by `validate`. The SFT adapter is first
merged into the base (a Ray task) and saved: that folder is the reference policy, and a NEW LoRA adapter is
trained on top of it, so "adapter disabled" is exactly the SFT model. Writes the merged folder and the
alignment adapter to the stage's content-addressed output dir; streams curves to the nested `align` run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from alignpipe import ray_runner, tracking
from alignpipe.config import PipelineConfig
from alignpipe.merge import merge_adapter
from alignpipe.runs import RunContext, content_key, dir_digest
from alignpipe.workers.align import train_loop
from alignpipe.workers.sft import FINAL_MARKER

CURVES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


class AlignOutput(BaseModel):
    method: str
    base_path: str              # the SFT adapter merged into the base model: the reference policy
    adapter_dir: str            # the alignment adapter (+ tokenizer), trained on top of base_path
    content_key: str
    mlflow_run_id: str
    metrics: dict[str, float]   # final training metrics; rlhf adds reward_model/accuracy, policy/reward_start|end


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
