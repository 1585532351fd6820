"""Evaluate stage: one suite over every artifact (base, sft, aligned, quantized), each in its own Ray task.

Reads the canonical held-out JSONL and each artifact (base folder, adapter, quantized folder) from storage; every
artifact gets the same rows and the same greedy decoding, on CUDA with `compute.use_gpu`. Writes per-row
predictions (with each answer's mean token log-prob; also published to storage), a side-by-side table (markdown and
CSV), charts and the cascade report (`alignpipe.cascade`), all logged to the stage's nested MLflow run. Every rate is
a fraction in [0, 1]. The driver side (`run_evaluate`) and what each artifact's Ray task runs (`evaluate_model`) are
both here.
"""

from __future__ import annotations

import csv
import json
import math
import resource
import time
from typing import Any

from pydantic import BaseModel, Field

from alignpipe import cascade, chat, models, progress, ray_runner, serving_choice, tracking
from alignpipe.config import PipelineConfig
from alignpipe.config.evaluate import EvaluateConfig
from alignpipe.config.quantize import QuantizeConfig
from alignpipe.data.formats import load_canonical
from alignpipe.errors import ConfigError
from alignpipe.kernels import int8_cpu
from alignpipe.merge import load_with_adapter
from alignpipe.runs import RunContext, content_key
from alignpipe.storage import Storage

HEADLINE = ("exact_match", "json_validity", "field_accuracy")
EFFICIENCY = {"tokens_per_s": "tokens/s (higher is better)", "latency_p95_ms": "latency p95 per request (ms)",
              "peak_rss_mb": "peak RSS (MB)", "size_mb": "size on disk (MB)",
              "eval_seconds": "evaluation wall time (s, its rows)"}


class ModelSpec(BaseModel):
    label: str                   # "base", "sft", "aligned", "quantized"
    base_path: str
    adapter_dir: str | None = None
    reference_path: str | None = None   # reference policy for the DPO reward margin (aligned: the merged SFT model)
    reference_label: str | None = None  # an earlier artifact of this suite that IS that reference (aligned: "sft"):
                                        # its pair log-probs are reused instead of loading reference_path again
    quantized_dir: str | None = None    # a quantized model folder: loaded instead of base_path (+ adapter)
    quantized_from: str | None = None   # label of the full-precision artifact it was made from (for the cascade)
    screen: bool = False                # not the verdict: first `evaluate.screen_rows` rows (see run_evaluate)
    rival: str | None = None            # screened: every row too when, on its rows, it beats this earlier
                                        # artifact on exact match (the plain base against the prompted base)
    few_shot: int | None = None         # the prompted base: the task and schema in a system turn and this many
                                        # training conversations in context (`EvalJob.instructions`, `.examples`)


class EvalOutput(BaseModel):
    metrics: dict[str, dict[str, float]]   # label -> metric -> value
    table_path: str
    mlflow_run_id: str
    cascade: dict[str, Any] | None = None  # best operating point and both ends, when a quantized artifact ran
    # a screened quantized model and the model it was made from, scored on the rows both saw (label -> metric ->
    # value, with "rows"); empty when both saw every row. register.serve compares their quality on these.
    shared: dict[str, dict[str, float]] = Field(default_factory=dict)


class EvalJob(BaseModel):
    """What each artifact's Ray task gets: the evaluate section itself and what it borrows from the others."""

    evaluate: EvaluateConfig
    quantize: QuantizeConfig = QuantizeConfig()  # how an int8_dynamic artifact runs on CPU
    kernels: str = "auto"                        # compute.kernels
    dtype: str                                   # resolved on the driver: every model of a run in the same dtype
    threads: int = 1
    json_targets: bool = False
    system_prompt: str | None = None
    preference_eval_path: str | None = None
    instructions: str | None = None              # the prompted base's system turn (chat.task_instructions)
    examples: list[list[dict[str, str]]] = Field(default_factory=list)  # its in-context training conversations
    beta: float = 0.1                            # align.beta: the DPO reward margin's scale
    use_gpu: bool = False                        # compute.use_gpu: every model runs on CUDA
    # where the URIs of the specs and paths point (compute.storage_path); default: local paths
    storage: Storage = Field(default_factory=lambda: Storage.of(None, "."))


def job_for(cfg: PipelineConfig, threads: int, preference_eval_path: str | None = None,
            storage: Storage | None = None) -> EvalJob:
    return EvalJob(evaluate=cfg.evaluate, quantize=cfg.quantize, kernels=cfg.compute.kernels,
                   dtype=models.dtype_for(cfg.evaluate.precision), threads=threads,
                   json_targets=cfg.data.json_targets, system_prompt=cfg.model.system_prompt,
                   preference_eval_path=preference_eval_path, beta=cfg.align.beta, use_gpu=cfg.compute.use_gpu,
                   **({"storage": storage} if storage else {}))


def comparison_table(results: dict[str, dict[str, float]]) -> tuple[str, list[list[str]]]:
    """Markdown table and CSV rows: one row per metric, one column per model, plus tuned - base.

    The first row is the held-out rows each model was scored on; where they differ (screened artifacts), a note
    under the table says which models saw fewer rows.
    """
    labels = list(results)
    keys = list(dict.fromkeys(k for m in results.values() for k in m if k != "rows"))  # union, first-seen order
    header = ["metric", *labels] + (["delta"] if len(labels) > 1 else [])
    rows = []
    counts = [results[label].get("rows") for label in labels]
    if any(c is not None for c in counts):
        rows.append(["rows", *("-" if c is None else str(int(c)) for c in counts)] + ([""] if len(labels) > 1 else []))
    for k in keys:
        vals = [results[label].get(k, float("nan")) for label in labels]
        row = [k, *(f"{v:.4f}" for v in vals)]
        if len(labels) > 1:
            row.append(f"{vals[-1] - vals[0]:+.4f}")
        rows.append(row)
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    most = max((c for c in counts if c is not None), default=None)
    fewer = [f"{label} on its first {int(c)}" for label, c in zip(labels, counts) if c is not None and c < most]
    if len(labels) > 1:
        md += ["", f"delta: {labels[-1]} minus {labels[0]}."]
    if fewer:
        md += ["", f"Screened (not the registered model, nor what it is compared with): {', '.join(fewer)} of the "
                   f"{int(most)} held-out rows; the others on all {int(most)}."]
    return "\n".join(md) + "\n", [header, *rows]


def _bar_chart(results: dict[str, dict[str, float]]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in HEADLINE if all(k in m for m in results.values())]
    labels = list(results)
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(8.5, 3.5))
    for j, label in enumerate(labels):
        xs = [i + j * width for i in range(len(keys))]
        rows = results[label].get("rows")
        name = f"{label} ({rows:.0f} rows)" if rows else label  # screened models are scored on fewer rows
        bars = ax.bar(xs, [results[label][k] for k in keys], width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks([i + width * (len(labels) - 1) / 2 for i in range(len(keys))], keys)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("fraction of held-out rows")
    ax.set_title("Held-out evaluation")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)  # beside the bars, never over them
    fig.tight_layout()
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
              preference_eval_path: str | None = None, train_path: str | None = None) -> str:
    """The evaluate section (+ the settings it borrows), the held-out digest and every artifact's folders.

    Stage output folders are content-addressed, so an artifact's paths change whenever its weights do. The
    prompted base's instructions and in-context examples are part of it (read from `train_path`).
    """
    in_context = prompted_base_context(cfg, ctx, train_path, specs)
    section = {"evaluate": cfg.evaluate, "system_prompt": cfg.model.system_prompt, "json": cfg.data.json_targets,
               **cfg.quantize.cpu_runtime(cfg.compute.kernels), "beta": cfg.align.beta,
               "serve": cfg.register_.serve}  # decides whether a screened challenger gets every row
    return content_key("evaluate", section,
                       {"eval": eval_digest, **{s.label: f"{s.base_path}|{s.adapter_dir}|{s.quantized_dir}|"
                                                         f"{s.reference_path}|{s.reference_label}|{s.screen}|"
                                                         f"{s.rival}|{s.few_shot}"
                                                for s in specs},
                        "preference_eval": str(preference_eval_path),
                        "in_context": json.dumps(in_context, sort_keys=True)})  # the prompted base's instructions
                                                                                # and examples


def run_evaluate(cfg: PipelineConfig, ctx: RunContext, eval_path: str, eval_digest: str,
                 specs: list[ModelSpec], preference_eval_path: str | None = None,
                 train_path: str | None = None) -> EvalOutput:
    """Plain function behind the task: one Ray task per artifact (fresh process), then tables, charts, cascade.

    Specs marked `screen` are scored on the first `evaluate.screen_rows` held-out rows. A screened challenger (a
    quantized form of an artifact scored before it) is scored again on every row when, on its rows, it is within
    `register.serve`'s margin of that artifact on the serving objective, so the artifact that can be registered is
    always judged on every row; one that is slower beyond the margin cannot be, and keeps its screen. A screened
    spec with a `rival` (the plain base, against the prompted base) is scored again on every row when, on its
    rows, its exact match is above the rival's on the same rows.

    A `few_shot` spec (the prompted base) reads its in-context examples from the first rows of `train_path`.
    """
    import ray

    in_context = prompted_base_context(cfg, ctx, train_path, specs)
    key = cache_key(cfg, ctx, eval_path, eval_digest, specs, preference_eval_path, train_path)
    out_dir = ctx.stage_dir("evaluate", key)
    with tracking.stage_run(ctx.tracking_uri, ctx.parent_run_id, "evaluate", key) as run_id:
        tracking.log_params(ctx.tracking_uri, run_id, cfg.evaluate.model_dump(mode="json"), prefix="evaluate")
        dtype, why = models.precision_choice(cfg.evaluate.precision)  # what job_for resolves for every model below
        tracking.log_params(ctx.tracking_uri, run_id, {"chosen": dtype, "reason": why}, prefix="precision")
        print(f"evaluate: {why}")
        ray_runner.ensure_ray(cfg.compute)
        cpus = ray_runner.task_cpus(cfg.evaluate.cpus, cfg.compute.resources)
        job = job_for(cfg, max(1, int(cpus)), preference_eval_path, ctx.storage).model_copy(update=in_context or {})
        if in_context:
            print(f"evaluate: prompted base: {in_context['instructions']!r} and {len(in_context['examples'])} "
                  "training conversations in context")
        tracking.client_for(ctx.tracking_uri).set_tag(run_id, "alignpipe.eval_dtype", job.dtype)
        # max_calls=1: each model gets a fresh worker process, so one model's peak RSS cannot hide another's.
        remote = ray.remote(**ray_runner.task_options(cfg.compute, cpus))(evaluate_model)
        results, rows, logps = {}, {}, {}
        note = lm_eval_notes(cfg.evaluate.lm_eval_tasks)
        if note:
            print(f"evaluate: {note}")
            tracking.client_for(ctx.tracking_uri).set_tag(run_id, "alignpipe.lm_eval", note[:5000])
        screen = cfg.evaluate.screen_rows or None
        for spec in specs:  # one at a time: concurrent runs would share the same cores and skew tokens/s
            cap = (screen if spec.screen else None) if spec.few_shot is None else cfg.evaluate.prompted_base.rows
            print(f"evaluate: {spec.label} on {eval_path}" + (f" (first {cap} rows" + (": screened)" if spec.screen
                                                                                      else ")") if cap else ""))
            # its preference pairs are screened too, unless a later artifact reuses them as its DPO reference
            pairs_cap = cap if cap and not any(s.reference_label == spec.label for s in specs) else None
            started = time.perf_counter()
            res = ray_runner.get(remote.remote(spec, eval_path, job, logps.get(spec.reference_label), cap, pairs_cap))
            rival = results.get(spec.quantized_from or "")
            if cap and rival and res["metrics"]["rows"] < rival["rows"] and cfg.register_.enabled \
                    and serving_choice.within_reach(res["metrics"], rival, cfg.register_.serve):
                print(f"evaluate: {spec.label} is within reach of {spec.quantized_from} on "
                      f"{cfg.register_.serve.objective} over {cap} rows: scoring it on every row")
                res = ray_runner.get(remote.remote(spec, eval_path, job, logps.get(spec.reference_label)))
            elif cap and res["metrics"]["rows"] == cap and spec.rival in rows \
                    and beats(res["predictions"], rows[spec.rival], job.json_targets):
                print(f"evaluate: {spec.label} beats {spec.rival} on exact match over its {cap} rows: "
                      "scoring it on every row")
                res = ray_runner.get(remote.remote(spec, eval_path, job, logps.get(spec.reference_label)))
            # what scoring this artifact cost the run: its worker's start, loading, every row it was scored on
            res["metrics"]["eval_seconds"] = time.perf_counter() - started
            logps[spec.label] = res.pop("pair_logps")
            if cfg.evaluate.lm_eval_tasks and not note:
                res["metrics"].update(_run_lm_eval(local_spec(spec, ctx.storage), cfg.evaluate.lm_eval_tasks))
            results[spec.label], rows[spec.label] = res["metrics"], res["predictions"]
            pred_file = out_dir / f"predictions_{spec.label}.jsonl"
            pred_file.write_text("".join(json.dumps(p) + "\n" for p in res["predictions"]))
            ctx.storage.publish(pred_file, ctx.stage_uri("evaluate", key, pred_file.name))
            tracking.client_for(ctx.tracking_uri).log_artifact(run_id, str(pred_file), "predictions")
            tracking.log_metrics(ctx.tracking_uri, run_id, {f"{spec.label}/{k}": v for k, v in res["metrics"].items()})
        md, csv_rows = comparison_table(results)
        summary, shared = None, {}
        for spec in specs:  # the cascade pairs a quantized artifact with the model it was made from
            if spec.quantized_from in rows:
                costs = (cascade.request_cost(results[spec.label]), cascade.request_cost(results[spec.quantized_from]))
                n = min(len(rows[spec.label]), len(rows[spec.quantized_from]))  # a screened challenger: its rows
                if n < max(len(rows[spec.label]), len(rows[spec.quantized_from])):
                    shared = {label: {**score_rows(rows[label][:n], cfg.data.json_targets), "rows": n}
                              for label in (spec.quantized_from, spec.label)}
                    tracking.log_metrics(ctx.tracking_uri, run_id, {f"shared/{label}/{k}": v for label, m in
                                                                    shared.items() for k, v in m.items()})
                summary, cmd, ccsv, fig = cascade.report(rows[spec.label][:n], rows[spec.quantized_from][:n],
                                                         cfg.evaluate.cascade_tolerance,
                                                         (spec.label, spec.quantized_from), costs)
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
                      cascade=summary, shared=shared)


def prompted_base_context(cfg: PipelineConfig, ctx: RunContext, train_path: str | None,
                          specs: list[ModelSpec]) -> dict[str, Any] | None:
    """The prompted base's system turn and in-context examples (the first k training conversations), or None
    when no spec asks for them."""
    k = max((s.few_shot for s in specs if s.few_shot is not None), default=None)
    if k is None:
        return None
    if train_path is None:
        raise ValueError("a few_shot spec (the prompted base) needs the training split: pass train_path")
    rows = load_canonical(ctx.local(train_path), limit=max(k, 1))
    examples = [chat.with_system(r["messages"], cfg.model.system_prompt) for r in rows]
    instructions = cfg.evaluate.prompted_base.instructions or chat.task_instructions(
        cfg.model.system_prompt, chat.split_prompt_answer(examples[0])[1] if cfg.data.json_targets else None)
    return {"instructions": instructions, "examples": examples[:k]}


def beats(mine: list[dict], theirs: list[dict], json_targets: bool) -> bool:
    """Is a screened artifact's exact match, on its rows, above another's on the same rows? (On a tie the other,
    scored on every row already, stays the comparison.)"""
    n = min(len(mine), len(theirs))
    return score_rows(mine[:n], json_targets)["exact_match"] > score_rows(theirs[:n], json_targets)["exact_match"]


def score_rows(predictions: list[dict], json_targets: bool) -> dict[str, float]:
    """`score` of saved prediction rows (each with its prediction and reference), e.g. a subset of them."""
    return score([p["prediction"] for p in predictions], [p["reference"] for p in predictions], json_targets)


# --- in each artifact's Ray task ---------------------------------------------------------------------------------

def score(predictions: list[str], references: list[str], json_targets: bool) -> dict[str, float]:
    """Exact match always; JSON validity and per-field accuracy when answers are JSON objects."""
    n = max(len(references), 1)
    out = {"exact_match": sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / n}
    if not json_targets:
        return out
    parsed = [_as_object(p) for p in predictions]
    out["json_validity"] = sum(p is not None for p in parsed) / n
    hits: dict[str, list[bool]] = {}
    for pred, ref in zip(parsed, references):
        for key, value in (_as_object(ref) or {}).items():
            hits.setdefault(key, []).append(pred is not None and key in pred and pred[key] == value
                                            and type(pred[key]) is type(value))
    for key, values in hits.items():
        out[f"field_accuracy/{key}"] = sum(values) / len(values)
    if hits:
        out["field_accuracy"] = sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values())
    return out


def evaluate_model(spec: ModelSpec, eval_path: str, job: EvalJob,
                   reference_logps: dict | None = None, rows_cap: int | None = None,
                   pairs_cap: int | None = None) -> dict[str, Any]:
    """Load one model, generate greedily for every held-out prompt, score it. Runs inside a Ray task.

    `reference_logps`: the pair log-probs of `spec.reference_label`, when the suite scored that model already.
    `rows_cap`: score only the first N held-out rows (a screened artifact; `evaluate.limit` still applies).
    `pairs_cap`: score only the first N held-out preference pairs (`evaluate.preference_rows` still applies).
    """
    e = job.evaluate
    ray_runner.set_worker_threads(job.threads)
    device = _device(job.use_gpu)
    spec = local_spec(spec, job.storage)  # every folder it names, fetched to this node
    if spec.quantized_dir:  # a saved quantized folder: transformers rebuilds it from its quantization_config
        fused = (device == "cpu" and int8_cpu.resolve_cpu_kernel(job.quantize.cpu_kernel, job.kernels) == "fbgemm"
                 and int8_cpu.is_int8_dynamic(spec.quantized_dir))
        # bitsandbytes places its layers while loading; on a GPU every quantized folder loads straight onto it
        model = models.load_model(spec.quantized_dir, dtype="float32" if fused else job.dtype,
                                  device_map={"": device} if device != "cpu" else None)
        tokenizer = models.load_tokenizer(spec.quantized_dir)
        if fused:
            int8_cpu.use_fbgemm_linears(model, job.quantize.per_token_modules)
    elif spec.adapter_dir:  # merged in memory where possible: same outputs, faster decoding
        model, tokenizer = load_with_adapter(spec.base_path, spec.adapter_dir, job.dtype)
    else:
        model, tokenizer = models.load_model(spec.base_path, dtype=job.dtype), models.load_tokenizer(spec.base_path)
    if not spec.quantized_dir:
        model.to(device)
    tokenizer.padding_side = "left"
    model.eval()
    caps = [n for n in (e.limit, rows_cap) if n]
    rows = load_canonical(job.storage.fetch(eval_path))[: min(caps) if caps else None]
    convs = [chat.split_prompt_answer(chat.with_system(r["messages"], job.system_prompt)) for r in rows]
    prefix = ""
    if spec.few_shot is not None:  # the prompted base: told the task, shown k training conversations
        prompts, prefix = prompted_prompts(tokenizer, [msgs for msgs, _ in convs], job.instructions or "",
                                           job.examples[: spec.few_shot])
    else:
        prompts = [chat.render(tokenizer, msgs, add_generation_prompt=True) for msgs, _ in convs]
    references = [ref for _, ref in convs]

    predictions, logprobs, gen_tokens, gen_time, latencies = generate(model, tokenizer, prompts, e,
                                                                       progress.generation_reporter(spec.label), prefix)
    metrics = score(predictions, references, job.json_targets)
    if spec.few_shot is None:  # the prompted base's would measure its in-context examples as much as the model
        n_ppl = e.perplexity_rows or len(prompts)
        metrics["perplexity"] = _perplexity(model, tokenizer, prompts[:n_ppl], references[:n_ppl], e.batch_size)
    metrics["tokens_per_s"] = gen_tokens / gen_time if gen_time else 0.0
    metrics["latency_p50_ms"] = _percentile(latencies, 0.50) * 1000
    metrics["latency_p95_ms"] = _percentile(latencies, 0.95) * 1000
    metrics["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    metrics["size_mb"] = size_on_disk(spec) / 1e6
    metrics["rows"] = len(rows)
    pair_logps = None
    if job.preference_eval_path and spec.few_shot is None:  # preference pairs are scored without a task prompt
        preference, pair_logps = _preference_metrics(model, tokenizer, spec, job, reference_logps, pairs_cap)
        metrics.update(preference)
    return {"label": spec.label, "metrics": metrics, "pair_logps": pair_logps,
            "predictions": [{"prompt": p, "reference": r, "prediction": y, "mean_logprob": lp,
                             "correct": y.strip() == r.strip()}
                            for (p, _), r, y, lp in zip(convs, references, predictions, logprobs)]}


def prompted_prompts(tokenizer, prompts: list[list[dict[str, str]]], instructions: str,
                     examples: list[list[dict[str, str]]]) -> tuple[list[str], str]:
    """The prompted base's rendered prompts (`chat.few_shot`), and the text they all start with (the instructions
    and examples; "" if the chat template does not keep it whole), which decoding computes once."""
    rendered = [chat.render(tokenizer, chat.few_shot(msgs, instructions, examples), add_generation_prompt=True)
                for msgs in prompts]
    prefix = chat.render(tokenizer, chat.few_shot([], instructions, examples))
    return rendered, prefix if all(p.startswith(prefix) for p in rendered) else ""


def local_spec(spec: ModelSpec, storage: Storage) -> ModelSpec:
    """`spec` with every folder it names fetched from storage to this node (unchanged on local storage)."""
    fields = ("base_path", "adapter_dir", "reference_path", "quantized_dir")
    return spec.model_copy(update={f: storage.fetch(v) for f in fields if (v := getattr(spec, f))})


def _device(use_gpu: bool) -> str:
    """`cuda` with compute.use_gpu (said plainly when this worker has no CUDA), else `cpu`."""
    import torch

    if not use_gpu:
        return "cpu"
    if not torch.cuda.is_available():
        raise ConfigError(f"compute.use_gpu is true, but this Ray worker sees no CUDA device (torch "
                          f"{torch.__version__}, built for CUDA {torch.version.cuda or 'none: a CPU-only build'}); "
                          "run evaluation on a GPU node, or set compute.use_gpu=false")
    return "cuda"


def size_on_disk(spec: ModelSpec) -> int:
    """Bytes of the weights an artifact is served from: the quantized folder, or base (+ adapter) weights."""
    from pathlib import Path

    folders = [spec.quantized_dir] if spec.quantized_dir else [spec.base_path, spec.adapter_dir]
    return sum(f.stat().st_size for d in folders if d and Path(d).is_dir()
               for f in Path(d).iterdir() if f.suffix in (".safetensors", ".bin"))


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: every value reported was observed)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _preference_metrics(model, tokenizer, spec: ModelSpec, job: EvalJob, reference: dict | None,
                        pairs_cap: int | None = None):
    """Held-out preference accuracy; with a reference, also the mean DPO reward margin against it.

    The reference's log-probs are `reference` when the suite already scored that model (the sft artifact, for
    aligned), else computed from `spec.reference_path` loaded here. Returns (metrics, the
    policy's own pair log-probs, for a later artifact that uses this one as its reference).
    """
    from alignpipe.preference import metrics_from_logps, pair_logps

    e = job.evaluate
    caps = [n for n in (e.limit, e.preference_rows, pairs_cap) if n]
    pairs = load_canonical(job.storage.fetch(job.preference_eval_path))[: min(caps) if caps else None]
    policy = pair_logps(model, tokenizer, pairs, job.system_prompt, e.batch_size)
    if reference is None and spec.reference_path:
        ref_model = models.load_model(spec.reference_path, dtype=job.dtype).to(model.device).eval()
        reference = pair_logps(ref_model, tokenizer, pairs, job.system_prompt, e.batch_size)
        del ref_model
    return {**metrics_from_logps(policy, job.beta, reference), "preference_pairs": len(pairs)}, policy


def generate(model, tokenizer, prompts: list[str], e: EvaluateConfig, on_batch=None, prefix: str = ""):
    """Batched greedy decoding with the KV cache; prompts sorted by length so batches pad little.

    `prefix`, when every prompt starts with it (the prompted base's instructions and examples), is run through the
    model once and its keys and values reused by every batch, as a server caches a shared prompt prefix; each
    batch computes only what follows it (left-padded after the prefix, the padding masked out).

    Returns answers, each answer's mean token log-prob (its own confidence: the cascade's signal), generated
    tokens, decoding time, and one latency per request: the wall time of the batch that served it. `on_batch`, if
    given, is called after each batch with (rows done, rows in all, tokens so far, decoding seconds so far).
    """
    import copy

    import torch

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    logprobs: list[float] = [0.0] * len(prompts)
    total_tokens, total_time, latencies = 0, 0.0, []
    eos = tokenizer.eos_token_id
    bs = e.batch_size
    if prefix and not all(p.startswith(prefix) for p in prompts):
        raise ValueError("every prompt must start with the shared prefix")
    head, head_cache = None, None
    if prefix:
        from transformers import DynamicCache

        head = tokenizer(prefix, return_tensors="pt", add_special_tokens=False)["input_ids"].to(model.device)
        with torch.inference_mode():
            head_cache = model(input_ids=head, past_key_values=DynamicCache(), use_cache=True).past_key_values
    for start in range(0, len(order), bs):
        idx = order[start : start + bs]
        enc = tokenizer([prompts[i][len(prefix):] for i in idx], return_tensors="pt", padding=True,
                        add_special_tokens=False).to(model.device)
        extra = {}
        if head is not None:  # [prefix][padding][own tokens]: the prefix from the cache, the padding masked
            enc = {"input_ids": torch.cat([head.expand(len(idx), -1), enc["input_ids"]], dim=1),
                   "attention_mask": torch.cat([torch.ones_like(head).expand(len(idx), -1), enc["attention_mask"]],
                                               dim=1)}
            extra["past_key_values"] = copy.deepcopy(head_cache)
            extra["past_key_values"].batch_repeat_interleave(len(idx))
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**enc, **extra, max_new_tokens=e.max_new_tokens, do_sample=False,
                                 eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, use_cache=True,
                                 output_logits=True, return_dict_in_generate=True)
        elapsed = time.perf_counter() - t0
        total_time += elapsed
        latencies += [elapsed] * len(idx)
        new = out.sequences[:, enc["input_ids"].shape[1] :]
        # log-prob of each chosen token under the raw (unprocessed) logits, one step at a time (small peak RSS)
        chosen = torch.stack([step.float().log_softmax(-1).gather(-1, new[:, j, None]).squeeze(-1)
                              for j, step in enumerate(out.logits)], dim=1)
        for row, lp, i in zip(new, chosen, idx):
            ids = row.tolist()
            n = ids.index(eos) + 1 if eos in ids else len(ids)
            total_tokens += n
            answers[i] = tokenizer.decode(ids[:n], skip_special_tokens=True).strip()
            logprobs[i] = lp[:n].mean().item() if n else float("-inf")
        if on_batch is not None:
            on_batch(start + len(idx), len(prompts), total_tokens, total_time)
    return answers, logprobs, total_tokens, total_time, latencies


def _perplexity(model, tokenizer, prompts: list[str], references: list[str], batch_size: int) -> float:
    """exp(mean negative log-likelihood) of the reference answers (and end-of-turn) given their prompts.

    Left padding puts every answer at the end of its row, so only the last positions need vocabulary logits.
    """
    import torch

    end = tokenizer.eos_token or ""
    nll, count = 0.0, 0
    for start in range(0, len(prompts), batch_size):
        ps, rs = prompts[start : start + batch_size], references[start : start + batch_size]
        answers = [len(tokenizer(r + end, add_special_tokens=False)["input_ids"]) for r in rs]
        enc = tokenizer([p + r + end for p, r in zip(ps, rs)], return_tensors="pt", padding=True,
                        add_special_tokens=False).to(model.device)
        keep = max(answers) + 1
        labels = enc["input_ids"][:, -keep:].clone()
        for j, n in enumerate(answers):
            labels[j, : keep - n] = -100
        with torch.inference_mode():
            logits = model(**enc, logits_to_keep=keep).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100,
                                                 reduction="sum")
        nll += loss.item()
        count += int((labels[:, 1:] != -100).sum())
    return math.exp(nll / count) if count else float("nan")


def _as_object(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None
    return value if isinstance(value, dict) else None
