"""Evaluation: the scoring is exact, and every model gets every metric, a table, a chart and predictions."""

import csv
import json

import pytest

from alignpipe import tracking
from alignpipe.tasks.evaluate import score
from alignpipe.tasks.evaluate import ModelSpec, comparison_table, run_evaluate
from testlib import canonical_split, run_context

REF = '{"name": "Ana Lima", "age": 34, "city": "Porto"}'


def test_score_is_strict_about_values_and_types():
    preds = [REF, '{"name": "Ana Lima", "age": "34", "city": "Porto"}', "Sure! " + REF, '{"name": "Ana"}']
    m = score(preds, [REF] * 4, json_targets=True)
    assert m["exact_match"] == 0.25
    assert m["json_validity"] == 0.75            # prose-wrapped JSON is not valid JSON
    assert m["field_accuracy/age"] == 0.25       # "34" (a string) is not 34
    assert m["field_accuracy/name"] == 0.5
    assert m["field_accuracy/city"] == 0.5
    assert m["field_accuracy"] == pytest.approx(5 / 12)
    assert score(["a"], ["a"], json_targets=False) == {"exact_match": 1.0}


def test_comparison_table_has_delta_column():
    md, rows = comparison_table({"base": {"exact_match": 0.1}, "sft": {"exact_match": 0.9}})
    assert rows[0] == ["metric", "base", "sft", "delta"]
    assert rows[1] == ["exact_match", "0.1000", "0.9000", "+0.8000"]
    assert "| exact_match | 0.1000 | 0.9000 | +0.8000 |" in md


def run_metrics(ctx, out):
    return tracking.client_for(ctx.tracking_uri).get_run(out.mlflow_run_id).data.metrics


def test_every_model_gets_every_metric(smoke_cfg, tiny_model, ray_local, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=4, target_modules="all-linear")) \
        .save_pretrained(adapter)
    # sft stands in for a screened challenger of base: served by size with no margin it cannot win (base + its
    # adapter is larger), so it keeps its screen of 4 rows, and its quality is also given on the rows both saw
    cfg = smoke_cfg.model_copy(deep=True)
    cfg.evaluate.screen_rows = 4
    cfg.register_.serve.objective, cfg.register_.serve.margin = "size_mb", 0.0
    ctx = run_context(cfg, tiny_model)
    eval_path, digest = canonical_split(cfg, "eval", tmp_path)
    out = run_evaluate(cfg, ctx, eval_path, digest,
                       [ModelSpec(label="base", base_path=tiny_model),
                        ModelSpec(label="sft", base_path=tiny_model, adapter_dir=str(adapter), quantized_from="base",
                                  screen=True)])

    assert list(out.metrics) == ["base", "sft"]
    for metrics in out.metrics.values():
        for key in ("exact_match", "json_validity", "field_accuracy", "field_accuracy/name", "perplexity",
                    "tokens_per_s", "latency_p50_ms", "latency_p95_ms", "peak_rss_mb", "size_mb", "eval_seconds"):
            assert key in metrics, key
        for key in ("exact_match", "json_validity", "field_accuracy"):
            assert 0.0 <= metrics[key] <= 1.0
        assert metrics["peak_rss_mb"] > 50 and metrics["tokens_per_s"] > 0
        assert metrics["latency_p95_ms"] >= metrics["latency_p50_ms"] > 0 and metrics["size_mb"] > 1
        # the artifact's whole evaluation (a fresh worker, loading, decoding, scoring) outlasts its decoding alone
        assert metrics["eval_seconds"] > metrics["latency_p95_ms"] / 1000
    assert (out.metrics["base"]["rows"], out.metrics["sft"]["rows"]) == (16, 4)
    assert "sft on its first 4 of the 16 held-out rows" in open(out.table_path).read()
    # quality on the rows both saw, for register.serve: base's own figures recomputed on its first 4 rows
    assert set(out.shared) == {"base", "sft"} and out.shared["sft"]["rows"] == out.shared["base"]["rows"] == 4
    assert out.shared["sft"]["exact_match"] == out.metrics["sft"]["exact_match"]
    base_rows = [json.loads(line) for line in open(out.table_path.replace("comparison.md", "predictions_base.jsonl"))]
    assert out.shared["base"]["exact_match"] == sum(r["correct"] for r in base_rows[:4]) / 4
    # LoRA B starts at zero: an untrained adapter must score exactly like its base, row by row.
    sft_rows = [json.loads(line) for line in open(out.table_path.replace("comparison.md", "predictions_sft.jsonl"))]
    assert [r["prediction"] for r in sft_rows] == [r["prediction"] for r in base_rows[:4]]
    assert [r["mean_logprob"] for r in sft_rows] == pytest.approx([r["mean_logprob"] for r in base_rows[:4]], rel=1e-4)
    assert run_metrics(ctx, out)["shared/base/rows"] == 4

    client = tracking.client_for(ctx.tracking_uri)
    paths = {a.path for folder in ("evaluation", "plots", "predictions")
             for a in client.list_artifacts(out.mlflow_run_id, folder)}
    assert {"evaluation/comparison.md", "evaluation/comparison.csv", "plots/comparison.png",
            "predictions/predictions_base.jsonl", "predictions/predictions_sft.jsonl"} <= paths
    assert "plots/efficiency.png" in paths
    first = json.loads(open(out.table_path.replace("comparison.md", "predictions_sft.jsonl")).readline())
    assert first["mean_logprob"] < 0 and isinstance(first["correct"], bool)
    assert out.metrics["sft"]["size_mb"] > out.metrics["base"]["size_mb"]  # base weights + the adapter
    run = client.get_run(out.mlflow_run_id)
    assert run.data.metrics["sft/exact_match"] == out.metrics["sft"]["exact_match"]
    assert "eval/sft/perplexity" in client.get_run(ctx.parent_run_id).data.metrics
    with open(out.table_path.replace(".md", ".csv")) as f:
        assert next(csv.reader(f)) == ["metric", "base", "sft", "delta"]


def test_the_prompted_bases_shared_prefix_is_computed_once_with_the_same_answers(smoke_cfg, tiny_model):
    from alignpipe import chat
    from alignpipe.data.formats import load_canonical
    from alignpipe.models import load_model, load_tokenizer
    from alignpipe.tasks.evaluate import generate, prompted_prompts
    from testlib import DEMO_DATA

    rows = load_canonical(DEMO_DATA / "sft_train.jsonl", limit=8)
    convs = [chat.split_prompt_answer(chat.with_system(r["messages"], "Extract.")) for r in rows]
    examples = [chat.with_system(r["messages"], "Extract.") for r in rows[:2]]
    instructions = chat.task_instructions("Extract.", convs[0][1])
    prompts, prefix = prompted_prompts(load_tokenizer(tiny_model), [m for m, _ in convs[2:]], instructions, examples)
    assert prefix and instructions in prefix and convs[0][1] in prefix and convs[1][1] in prefix  # told and shown
    assert all(p.startswith(prefix) and convs[i + 2][0][-1]["content"] in p[len(prefix):] for i, p in enumerate(prompts))

    model, tokenizer = load_model(tiny_model).eval(), load_tokenizer(tiny_model)
    tokenizer.padding_side = "left"
    e = smoke_cfg.evaluate.model_copy(update={"batch_size": 4})
    whole = generate(model, tokenizer, prompts, e)
    cached = generate(model, tokenizer, prompts, e, prefix=prefix)
    assert cached[0] == whole[0] and cached[2] == whole[2]  # the same answers, token for token
    assert cached[1] == pytest.approx(whole[1], abs=1e-4)
    with pytest.raises(ValueError, match="shared prefix"):
        generate(model, tokenizer, prompts, e, prefix="not the start")
