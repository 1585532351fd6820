"""Evaluate stage: base and tuned models on the held-out split, each in its own Ray task, side by side.

Reads the canonical held-out JSONL and the SFT adapter; writes predictions, a comparison table (markdown
and CSV) and a bar chart, all logged to the stage's nested MLflow run. Every rate is a fraction in [0, 1].
"""

from __future__ import annotations

import csv
import json
import math
import resource
import time
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from alignpipe import chat, models, ray_runner, tracking
from alignpipe.config import PipelineConfig
from alignpipe.data.formats import load_canonical
from alignpipe.merge import load_with_adapter
from alignpipe.runs import RunContext, content_key

HEADLINE = ("exact_match", "json_validity", "field_accuracy")


class ModelSpec(BaseModel):
    label: str                   # "base", "sft", ...
    base_path: str
    adapter_dir: str | None = None
    reference_path: str | None = None   # reference policy for the DPO reward margin (aligned: the merged SFT model)


class EvalOutput(BaseModel):
    metrics: dict[str, dict[str, float]]   # label -> metric -> value
    table_path: str
    mlflow_run_id: str


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


def evaluate_model(spec: dict, eval_path: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Load one model, generate greedily for every held-out prompt, score it. Runs inside a Ray task."""
    ray_runner.set_worker_threads(settings["threads"])
    if spec["adapter_dir"]:  # merged in memory where possible: same outputs, faster decoding
        model, tokenizer = load_with_adapter(spec["base_path"], spec["adapter_dir"], settings["dtype"])
    else:
        model, tokenizer = models.load_model(spec["base_path"], dtype=settings["dtype"]), \
            models.load_tokenizer(spec["base_path"])
    tokenizer.padding_side = "left"
    model.eval()
    rows = load_canonical(eval_path)[: settings["limit"]]
    convs = [chat.split_prompt_answer(chat.with_system(r["messages"], settings["system_prompt"])) for r in rows]
    prompts = [chat.render(tokenizer, msgs, add_generation_prompt=True) for msgs, _ in convs]
    references = [ref for _, ref in convs]

    predictions, gen_tokens, gen_time, latencies = _generate(model, tokenizer, prompts, settings)
    metrics = score(predictions, references, settings["json_targets"])
    n_ppl = settings["perplexity_rows"] or len(prompts)
    metrics["perplexity"] = _perplexity(model, tokenizer, prompts[:n_ppl], references[:n_ppl], settings["batch_size"])
    metrics["tokens_per_s"] = gen_tokens / gen_time if gen_time else 0.0
    metrics["batch_latency_s"] = sum(latencies) / len(latencies) if latencies else 0.0
    metrics["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    metrics["rows"] = len(rows)
    if settings.get("preference_eval_path"):
        metrics.update(_preference_metrics(model, tokenizer, spec, settings))
    return {"label": spec["label"], "metrics": metrics,
            "predictions": [{"prompt": p, "reference": r, "prediction": y}
                            for (p, _), r, y in zip(convs, references, predictions)]}


def _preference_metrics(model, tokenizer, spec: dict, settings: dict[str, Any]) -> dict[str, float]:
    """Held-out preference accuracy; with a reference model, also the mean DPO reward margin against it."""
    from alignpipe.preference import preference_metrics

    reference = models.load_model(spec["reference_path"], dtype=settings["dtype"]) if spec.get("reference_path") else None
    pairs = load_canonical(settings["preference_eval_path"])[: settings["limit"]]
    return preference_metrics(model, tokenizer, pairs, settings["system_prompt"], settings["beta"], reference,
                              settings["batch_size"])


def _generate(model, tokenizer, prompts: list[str], settings: dict[str, Any]):
    """Batched greedy decoding with the KV cache; prompts sorted by length so batches pad little."""
    import torch

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    total_tokens, total_time, latencies = 0, 0.0, []
    eos = tokenizer.eos_token_id
    bs = settings["batch_size"]
    for start in range(0, len(order), bs):
        idx = order[start : start + bs]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=settings["max_new_tokens"], do_sample=False,
                                 eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, use_cache=True)
        elapsed = time.perf_counter() - t0
        total_time += elapsed
        latencies.append(elapsed)
        new = out[:, enc["input_ids"].shape[1] :]
        for row, i in zip(new, idx):
            ids = row.tolist()
            n = ids.index(eos) + 1 if eos in ids else len(ids)
            total_tokens += n
            answers[i] = tokenizer.decode(ids[:n], skip_special_tokens=True).strip()
    return answers, total_tokens, total_time, latencies


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
                        add_special_tokens=False)
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


def comparison_table(results: dict[str, dict[str, float]]) -> tuple[str, list[list[str]]]:
    """Markdown table and CSV rows: one row per metric, one column per model, plus tuned - base."""
    labels = list(results)
    keys = [k for k in dict.fromkeys(k for m in results.values() for k in m) if k != "rows"]  # union, in order
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


def run_evaluate(cfg: PipelineConfig, ctx: RunContext, eval_path: str, eval_digest: str,
                 specs: list[ModelSpec], preference_eval_path: str | None = None) -> EvalOutput:
    """Plain function behind the task: one Ray task per model (fresh process), then table, chart, metrics."""
    import ray

    key = content_key("evaluate", {"evaluate": cfg.evaluate, "system_prompt": cfg.model.system_prompt},
                      {"eval": eval_digest, **{s.label: f"{s.base_path}|{s.adapter_dir}" for s in specs},
                       "preference_eval": str(preference_eval_path)})
    out_dir = ctx.stage_dir("evaluate", key)
    with tracking.stage_run(ctx.tracking_uri, ctx.parent_run_id, "evaluate", key) as run_id:
        tracking.log_params(ctx.tracking_uri, run_id, cfg.evaluate.model_dump(mode="json"), prefix="evaluate")
        ray_runner.ensure_ray(cfg.compute)
        cpus = min(cfg.evaluate.cpus, ray.cluster_resources().get("CPU", 1))
        settings = {**cfg.evaluate.model_dump(), "threads": max(1, int(cpus)), "json_targets": cfg.data.json_targets,
                    "system_prompt": cfg.model.system_prompt, "dtype": models.dtype_for(cfg.evaluate.precision),
                    "preference_eval_path": preference_eval_path, "beta": cfg.align.beta}
        # ^ resolved here, once, so every model of the run is scored in the same dtype
        tracking.client_for(ctx.tracking_uri).set_tag(run_id, "alignpipe.eval_dtype", settings["dtype"])
        # max_calls=1: each model gets a fresh worker process, so one model's peak RSS cannot hide another's.
        remote = ray.remote(num_cpus=cpus, max_calls=1)(evaluate_model)
        results = {}
        for spec in specs:  # one at a time: concurrent runs would share the same cores and skew tokens/s
            print(f"evaluate: {spec.label} on {eval_path}")
            res = ray_runner.get(remote.remote(spec.model_dump(), eval_path, settings))
            results[spec.label] = res["metrics"]
            pred_file = out_dir / f"predictions_{spec.label}.jsonl"
            pred_file.write_text("".join(json.dumps(p) + "\n" for p in res["predictions"]))
            tracking.client_for(ctx.tracking_uri).log_artifact(run_id, str(pred_file), "predictions")
            tracking.log_metrics(ctx.tracking_uri, run_id, {f"{spec.label}/{k}": v for k, v in res["metrics"].items()})
        md, csv_rows = comparison_table(results)
        (out_dir / "comparison.md").write_text(md)
        with (out_dir / "comparison.csv").open("w", newline="") as f:
            csv.writer(f).writerows(csv_rows)
        client = tracking.client_for(ctx.tracking_uri)
        client.log_artifact(run_id, str(out_dir / "comparison.md"), "evaluation")
        client.log_artifact(run_id, str(out_dir / "comparison.csv"), "evaluation")
        fig = _bar_chart(results)
        tracking.log_figure(ctx.tracking_uri, run_id, fig, "plots/comparison.png")
        import matplotlib.pyplot as plt

        plt.close(fig)
        tracking.log_metrics(ctx.tracking_uri, ctx.parent_run_id,
                             {f"eval/{label}/{k}": v for label, m in results.items() for k, v in m.items()})
    return EvalOutput(metrics=results, table_path=str(out_dir / "comparison.md"), mlflow_run_id=run_id)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(cfg: PipelineConfig, ctx: RunContext, eval_path: str, eval_digest: str,
             specs: list[ModelSpec], preference_eval_path: str | None = None) -> EvalOutput:
    """Score every model on the held-out split with the same decoding."""
    return run_evaluate(cfg, ctx, eval_path, eval_digest, specs, preference_eval_path)
