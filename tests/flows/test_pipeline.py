"""The whole `smoke` pipeline as a real Prefect flow (test harness), real MLflow, local Ray, tiny model."""

import json
import os
import subprocess
import sys

import pytest

from alignpipe import tracking
from alignpipe.errors import DataValidationError
from flows.pipeline import alignpipe_pipeline
from testlib import PIPELINES

pytestmark = pytest.mark.slow


def _overrides(tmp_path, tiny_model, mlflow_uri, **extra):
    return {"workdir": str(tmp_path / "work"), "model.name": tiny_model, "tracking.mlflow_uri": mlflow_uri, **extra}


def test_smoke_flow_end_to_end(prefect_harness, ray_local, tiny_model, mlflow_uri, tmp_path):
    summary = alignpipe_pipeline(pipeline="smoke", overrides=_overrides(tmp_path, tiny_model, mlflow_uri),
                                 config_file=str(PIPELINES))
    assert [s["stage"] for s in summary["stages"]] == ["prepare", "validate", "sft", "align", "quantize", "evaluate",
                                                       "register"]
    assert all(s["status"] == "done" for s in summary["stages"])
    assert (tmp_path / "work" / "runs" / f"{summary['flow_run_id']}.json").is_file()

    client = tracking.client_for(mlflow_uri)
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[tracking.TAG_FLOW_RUN] == summary["flow_run_id"] != ""
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_stage = {r.data.tags[tracking.TAG_STAGE]: r for r in children}
    assert set(by_stage) == {"validate", "sft", "align", "quantize", "evaluate", "register"}
    for run in by_stage.values():
        assert run.info.status == "FINISHED"
        assert run.data.tags[tracking.TAG_FLOW_RUN] == summary["flow_run_id"]
        assert run.data.tags[tracking.TAG_CONTENT_KEY]

    def artifacts(run, folder):
        return {a.path for a in client.list_artifacts(run.info.run_id, folder)}

    assert "data_docs" in {a.path for a in client.list_artifacts(by_stage["validate"].info.run_id)}
    assert "adapter/adapter_model.safetensors" in artifacts(by_stage["sft"], "adapter")
    assert {"loss", "learning_rate", "grad_norm", "tokens_per_s", "trainable_share"} <= set(by_stage["sft"].data.metrics)
    # align: a nested run with the DPO curves, the adapter, and the aligned model scored beside base and SFT
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(
        by_stage["align"].data.metrics)
    assert "adapter/adapter_model.safetensors" in artifacts(by_stage["align"], "adapter")
    assert "plots/align_curves.png" in artifacts(by_stage["align"], "plots")
    for label in ("base", "sft", "aligned"):
        assert 0.0 <= by_stage["evaluate"].data.metrics[f"{label}/preference_accuracy"] <= 1.0
    assert "aligned/reward_margin" in by_stage["evaluate"].data.metrics
    # One suite over every artifact: every metric for each, side by side, with charts and the cascade report.
    assert list(summary["metrics"]) == ["base", "sft", "aligned", "quantized"]
    evaluated = by_stage["evaluate"].data.metrics
    for label in ("base", "sft", "aligned", "quantized"):
        for metric in ("exact_match", "json_validity", "field_accuracy", "perplexity", "tokens_per_s",
                       "latency_p50_ms", "latency_p95_ms", "peak_rss_mb", "size_mb"):
            assert f"{label}/{metric}" in evaluated, (label, metric)
        assert evaluated[f"{label}/latency_p95_ms"] >= evaluated[f"{label}/latency_p50_ms"] > 0
    assert evaluated["quantized/size_mb"] < evaluated["aligned/size_mb"]
    assert {"plots/comparison.png", "plots/efficiency.png", "plots/cascade.png"} <= artifacts(by_stage["evaluate"], "plots")
    assert {"evaluation/comparison.md", "evaluation/comparison.csv", "evaluation/cascade.md",
            "evaluation/cascade.csv"} <= artifacts(by_stage["evaluate"], "evaluation")
    assert "| exact_match |" in summary["table"] and "| metric | base | sft | aligned | quantized |" in summary["table"]
    cascade = summary["cascade"]
    assert (cascade["quantized"], cascade["full"]) == ("quantized", "aligned")
    assert cascade["quantized_accuracy"] == summary["metrics"]["quantized"]["exact_match"]
    assert cascade["full_accuracy"] == summary["metrics"]["aligned"]["exact_match"]
    assert by_stage["quantize"].data.metrics["linear_ratio"] <= 0.30
    assert summary["quantized"]["model_dir"].endswith("quantized")

    reg = summary["registered"]
    version = client.get_model_version_by_alias(reg["model_name"], "challenger")
    assert str(version.version) == reg["version"]
    assert version.tags["flow_run_id"] == summary["flow_run_id"]
    assert version.tags["run_id.sft"] == by_stage["sft"].info.run_id
    assert version.tags["run_id.align"] == by_stage["align"].info.run_id  # the aligned model is the one registered
    assert {"config_digest", "git_commit", "data_digest.sft", "data_digest.eval"} <= set(version.tags)
    assert version.tags["run_id.validate"] == by_stage["validate"].info.run_id
    assert version.tags["promotion.decision"] in ("promoted", "rejected")  # gates ran; the summary says which
    assert summary["promotion"] == reg["decision"] and f"version {reg['version']}" in reg["decision"]

    # The registered model loads and generates in a fresh process that knows nothing of alignpipe.
    code = (
        "import json, sys, mlflow\n"
        f"m = mlflow.pyfunc.load_model('models:/{reg['model_name']}@challenger')\n"
        "out = m.predict(['Ana Lima is 34 and lives in Porto.'])\n"
        "print(json.dumps({'out': list(out), 'alignpipe': 'alignpipe' in sys.modules}))\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result["out"]) == 1 and isinstance(result["out"][0], str) and not result["alignpipe"]

    # Re-run unchanged: every stage is served from the content-keyed cache; register finds the same weights.
    again = alignpipe_pipeline(pipeline="smoke", overrides=_overrides(tmp_path, tiny_model, mlflow_uri),
                               config_file=str(PIPELINES))
    status = {s["stage"]: s["status"] for s in again["stages"]}
    assert status == {"prepare": "done", "validate": "cached", "sft": "cached", "align": "cached",
                      "quantize": "cached", "evaluate": "cached", "register": "done"}
    assert again["registered"]["version"] == reg["version"] and again["registered"]["reused"]
    assert again["metrics"] == summary["metrics"]
    assert client.get_run(again["mlflow_run_id"]).data.tags["alignpipe.cached_stages"] == \
        "validate,sft,align,quantize,evaluate"

    # Only the evaluation settings change: evaluate runs again, the training stages stay cached.
    changed = alignpipe_pipeline(
        pipeline="smoke", overrides=_overrides(tmp_path, tiny_model, mlflow_uri, **{"evaluate.max_new_tokens": 12}),
        config_file=str(PIPELINES))
    status = {s["stage"]: s["status"] for s in changed["stages"]}
    assert status == {"prepare": "done", "validate": "cached", "sft": "cached", "align": "cached",
                      "quantize": "cached", "evaluate": "done", "register": "done"}


def test_bad_data_stops_the_flow_before_training(prefect_harness, ray_local, tiny_model, mlflow_uri, tmp_path):
    bad = tmp_path / "bad.jsonl"
    rows = [{"messages": [{"role": "user", "content": "Mail ana@example.com"},
                          {"role": "assistant", "content": "not json"}]}] * 3
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataValidationError) as exc:
        alignpipe_pipeline(pipeline="smoke",
                           overrides=_overrides(tmp_path, tiny_model, mlflow_uri, **{"data.sft.path": str(bad)}),
                           config_file=str(PIPELINES))
    msg = str(exc.value)
    assert "e-mail" in msg.lower() and "line 1" in msg and "json" in msg.lower()
    client = tracking.client_for(mlflow_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    stages = {r.data.tags.get(tracking.TAG_STAGE) for r in runs}
    assert "sft" not in stages and "register" not in stages
    assert client.search_registered_models() == []
    parent = [r for r in runs if tracking.TAG_STAGE not in r.data.tags]
    assert len(parent) == 1 and parent[0].info.status == "FAILED"
