"""Evaluate stage: one suite over every artifact (base, sft, aligned, quantized), each in its own Ray task.

Reads the canonical held-out JSONL and each artifact (base folder, adapter, quantized folder); every artifact
gets the same rows and the same greedy decoding. Writes per-row predictions (with each answer's mean token
log-prob), a side-by-side table (markdown and CSV), charts and the cascade report (`alignpipe.cascade`), all
logged to the stage's nested MLflow run. Every rate is a fraction in [0, 1].
"""

from __future__ import annotations

import csv
import json
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from alignpipe import cascade, models, ray_runner, tracking
from alignpipe.config import PipelineConfig
from alignpipe.runs import RunContext, content_key
from alignpipe.workers.evaluate import evaluate_model

HEADLINE = ("exact_match", "json_validity", "field_accuracy")
EFFICIENCY = {"tokens_per_s": "tokens/s (higher is better)", "latency_p95_ms": "latency p95 per request (ms)",
              "peak_rss_mb": "peak RSS (MB)", "size_mb": "size on disk (MB)"}


class ModelSpec(BaseModel):
    label: str                   # "base", "sft", "aligned", "quantized"
    base_path: str
    adapter_dir: str | None = None
    reference_path: str | None = None   # reference policy for the DPO reward margin (aligned: the merged SFT model)
    reference_label: str | None = None  # an earlier artifact of this suite that IS that reference (aligned: "sft"):
                                        # its pair log-probs are reused instead of loading reference_path again
    quantized_dir: str | None = None    # a quantized model folder: loaded instead of base_path (+ adapter)
    quantized_from: str | None = None   # label of the full-precision artifact it was made from (for the cascade)


class EvalOutput(BaseModel):
    metrics: dict[str, dict[str, float]]   # label -> metric -> value
    table_path: str
    mlflow_run_id: str
    cascade: dict[str, Any] | None = None  # best operating point and both ends, when a quantized artifact ran


def comparison_table(results: dict[str, dict[str, float]]) -> tuple[str, list[list[str]]]:
    """Markdown table and CSV rows: one row per metric, one column per model, plus tuned - base."""
    labels = list(results)
    keys = list(dict.fromkeys(k for m in results.values() for k in m if k != "rows"))  # union, first-seen order
    header = ["metric", *labels] + (["delta"] if len(labels) > 1 else [])
    rows = []
    for k in keys:
        vals = [results[label].get(k, float("nan")) for label in labels]
        row = [k, *(f"{v:.4f}" for v in vals)]
        if len(labels) > 1:
            row.append(f"{vals[-1] - vals[0]:+.4f}")
        rows.append(row)
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(md) + "\n", [header, *rows]


def _bar_chart(results: dict[str, dict[str, float]]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in HEADLINE if all(k in m for m in results.values())]
    labels = list(results)
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for j, label in enumerate(labels):
        xs = [i + j * width for i in range(len(keys))]
        bars = ax.bar(xs, [results[label][k] for k in keys], width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks([i + width * (len(labels) - 1) / 2 for i in range(len(keys))], keys)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("fraction of held-out rows")
    ax.set_title("Held-out evaluation")
    ax.legend()
    return fig


def _efficiency_chart(results: dict[str, dict[str, float]]):
    """One panel per cost metric (speed, latency, memory, size), one bar per artifact."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results)
    fig, axes = plt.subplots(1, len(EFFICIENCY), figsize=(3.2 * len(EFFICIENCY), 3.2))
    for ax, (key, title) in zip(axes, EFFICIENCY.items()):
        bars = ax.bar(labels, [results[label].get(key, 0.0) for label in labels],
                      color=[f"C{i}" for i in range(len(labels))])
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=8, rotation=30)
    fig.suptitle("Cost per artifact (same rows, same decoding)")
    fig.tight_layout()
    return fig


def lm_eval_notes(tasks: list[str]) -> str | None:
    """lm-evaluation-harness is optional and not a dependency: say clearly why its tasks did not run."""
    if not tasks:
        return None
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        return (f"evaluate.lm_eval_tasks={tasks}: skipped, lm-evaluation-harness is not installed "
                "(pip install lm-eval, with its task data in the local HF datasets cache; this machine cannot "
                "download it). Nothing else changes.")
    return None


def _run_lm_eval(spec: ModelSpec, tasks: list[str]) -> dict[str, float]:
    """Run lm-eval tasks offline on one artifact; a clear message (not a crash) when their data is not local."""
    import os

    from lm_eval import simple_evaluate  # optional, checked by lm_eval_notes

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    path = spec.quantized_dir or spec.base_path
    args = f"pretrained={path}" + (f",peft={spec.adapter_dir}" if spec.adapter_dir and not spec.quantized_dir else "")
    try:
        out = simple_evaluate(model="hf", model_args=args, tasks=tasks, batch_size=8, device="cpu")
    except Exception as exc:  # noqa: BLE001 - lm-eval raises many types for missing data; report, don't fail the run
        print(f"evaluate: lm-eval tasks {tasks} on {spec.label} did not run: data not available locally? ({exc})")
        return {}
    return {f"lm_eval/{task}/{k.split(',')[0]}": v for task, res in out["results"].items()
            for k, v in res.items() if tracking.is_number(v)}


def _log_table(run_id: str, uri: str, out_dir, name: str, md: str, csv_rows: list[list[str]]) -> None:
    (out_dir / f"{name}.md").write_text(md)
    with (out_dir / f"{name}.csv").open("w", newline="") as f:
        csv.writer(f).writerows(csv_rows)
    client = tracking.client_for(uri)
    client.log_artifact(run_id, str(out_dir / f"{name}.md"), "evaluation")
    client.log_artifact(run_id, str(out_dir / f"{name}.csv"), "evaluation")


def _log_figure(uri: str, run_id: str, fig, path: str) -> None:
    import matplotlib.pyplot as plt

    tracking.log_figure(uri, run_id, fig, path)
    plt.close(fig)


def cache_key(cfg: PipelineConfig, ctx: RunContext, eval_path: str, eval_digest: str, specs: list[ModelSpec],
              preference_eval_path: str | None = None) -> str:
    """The evaluate section (+ the settings it borrows), the held-out digest and every artifact's folders.

    Stage output folders are content-addressed, so an artifact's paths change whenever its weights do.
    """
    section = {"evaluate": cfg.evaluate, "system_prompt": cfg.model.system_prompt, "json": cfg.data.json_targets,
               **cfg.quantize.cpu_runtime(), "beta": cfg.align.beta}
    return content_key("evaluate", section,
                       {"eval": eval_digest, **{s.label: f"{s.base_path}|{s.adapter_dir}|{s.quantized_dir}|"
                                                         f"{s.reference_path}|{s.reference_label}" for s in specs},
                        "preference_eval": str(preference_eval_path)})


def run_evaluate(cfg: PipelineConfig, ctx: RunContext, eval_path: str, eval_digest: str,
                 specs: list[ModelSpec], preference_eval_path: str | None = None) -> EvalOutput:
    """Plain function behind the task: one Ray task per artifact (fresh process), then tables, charts, cascade."""
    import ray

    key = cache_key(cfg, ctx, eval_path, eval_digest, specs, preference_eval_path)
    out_dir = ctx.stage_dir("evaluate", key)
    with tracking.stage_run(ctx.tracking_uri, ctx.parent_run_id, "evaluate", key) as run_id:
        tracking.log_params(ctx.tracking_uri, run_id, cfg.evaluate.model_dump(mode="json"), prefix="evaluate")
        ray_runner.ensure_ray(cfg.compute)
        cpus = ray_runner.task_cpus(cfg.evaluate.cpus)
        settings = {**cfg.evaluate.model_dump(), "threads": max(1, int(cpus)), "json_targets": cfg.data.json_targets,
                    "system_prompt": cfg.model.system_prompt, "dtype": models.dtype_for(cfg.evaluate.precision),
                    **cfg.quantize.cpu_runtime(),
                    "preference_eval_path": preference_eval_path, "beta": cfg.align.beta}
        # ^ resolved here, once, so every model of the run is scored in the same dtype
        tracking.client_for(ctx.tracking_uri).set_tag(run_id, "alignpipe.eval_dtype", settings["dtype"])
        # max_calls=1: each model gets a fresh worker process, so one model's peak RSS cannot hide another's.
        remote = ray.remote(num_cpus=cpus, max_calls=1)(evaluate_model)
        results, rows, logps = {}, {}, {}
        note = lm_eval_notes(cfg.evaluate.lm_eval_tasks)
        if note:
            print(f"evaluate: {note}")
            tracking.client_for(ctx.tracking_uri).set_tag(run_id, "alignpipe.lm_eval", note[:5000])
        for spec in specs:  # one at a time: concurrent runs would share the same cores and skew tokens/s
            print(f"evaluate: {spec.label} on {eval_path}")
            reuse = {"reference_logps": logps[spec.reference_label]} if spec.reference_label in logps else {}
            res = ray_runner.get(remote.remote(spec.model_dump(), eval_path, {**settings, **reuse}))
            logps[spec.label] = res.pop("pair_logps")
            if cfg.evaluate.lm_eval_tasks and not note:
                res["metrics"].update(_run_lm_eval(spec, cfg.evaluate.lm_eval_tasks))
            results[spec.label], rows[spec.label] = res["metrics"], res["predictions"]
            pred_file = out_dir / f"predictions_{spec.label}.jsonl"
            pred_file.write_text("".join(json.dumps(p) + "\n" for p in res["predictions"]))
            tracking.client_for(ctx.tracking_uri).log_artifact(run_id, str(pred_file), "predictions")
            tracking.log_metrics(ctx.tracking_uri, run_id, {f"{spec.label}/{k}": v for k, v in res["metrics"].items()})
        md, csv_rows = comparison_table(results)
        summary = None
        for spec in specs:  # the cascade pairs a quantized artifact with the model it was made from
            if spec.quantized_from in rows:
                summary, cmd, ccsv, fig = cascade.report(rows[spec.label], rows[spec.quantized_from],
                                                         cfg.evaluate.cascade_tolerance,
                                                         (spec.label, spec.quantized_from))
                _log_table(run_id, ctx.tracking_uri, out_dir, "cascade", cmd, ccsv)
                _log_figure(ctx.tracking_uri, run_id, fig, "plots/cascade.png")
                tracking.log_metrics(ctx.tracking_uri, run_id, {f"cascade/{k}": v for k, v in summary.items()})
                md += "\n" + cmd.split("\n\n")[0] + "\n"  # the table the CLI prints ends with the cascade verdict
        _log_table(run_id, ctx.tracking_uri, out_dir, "comparison", md, csv_rows)
        _log_figure(ctx.tracking_uri, run_id, _bar_chart(results), "plots/comparison.png")
        _log_figure(ctx.tracking_uri, run_id, _efficiency_chart(results), "plots/efficiency.png")
        tracking.log_metrics(ctx.tracking_uri, ctx.parent_run_id,
                             {f"eval/{label}/{k}": v for label, m in results.items() for k, v in m.items()})
    return EvalOutput(metrics=results, table_path=str(out_dir / "comparison.md"), mlflow_run_id=run_id,
                      cascade=summary)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(cfg: PipelineConfig, ctx: RunContext, eval_path: str, eval_digest: str,
             specs: list[ModelSpec], preference_eval_path: str | None = None) -> EvalOutput:
    """Score every model on the held-out split with the same decoding."""
    return run_evaluate(cfg, ctx, eval_path, eval_digest, specs, preference_eval_path)
