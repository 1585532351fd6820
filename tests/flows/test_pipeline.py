"""The whole `smoke` pipeline as a real Prefect flow (test harness), real MLflow, local Ray, tiny model.

The end-to-end run doubles as the credential-leak check: it runs against a real `mlflow server` whose URI carries
a password, with secrets planted in the environment variables people really set (HF_TOKEN,
MLFLOW_TRACKING_PASSWORD, AWS_SECRET_ACCESS_KEY, ...) and in a free-text config value. The flow must succeed with
them, and none may appear in MLflow (runs, models, artifacts, the raw database), the workdir (Prefect result
cache, Ray storage, summaries), stdout/stderr or the Prefect flow-run logs. (One flow run for both: each costs
minutes of the suite on 2 cores.)
"""

import base64
import json
import os
import secrets as pysecrets
import subprocess
import sys
from pathlib import Path

import pytest

from alignpipe import ray_runner, tracking
from alignpipe.errors import DataValidationError
from alignpipe.flows.pipeline import alignpipe_pipeline
from testlib import PIPELINES

pytestmark = pytest.mark.slow

SECRET_ENV = ("HF_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "AWS_SECRET_ACCESS_KEY",
              "AWS_SESSION_TOKEN", "PREFECT_API_KEY", "WANDB_API_KEY", "OPENAI_API_KEY", "DATABRICKS_TOKEN",
              "ACME_SERVICE_SECRET")


def _overrides(tmp_path, tiny_model, mlflow_uri, **extra):
    return {"workdir": str(tmp_path / "work"), "model.name": tiny_model, "tracking.mlflow_uri": mlflow_uri, **extra}


def _mlflow_texts(client) -> list[str]:
    """Every param, tag, metric name, dataset source and description in the store, as strings."""
    from mlflow.entities import ViewType

    out = []
    experiments = client.search_experiments(view_type=ViewType.ALL)
    for exp in experiments:
        out += [exp.name, exp.artifact_location, *map(str, exp.tags.items())]
    ids = [e.experiment_id for e in experiments]
    for run in client.search_runs(ids, run_view_type=ViewType.ALL):
        out += [*map(str, run.data.params.items()), *map(str, run.data.tags.items()), *run.data.metrics]
        out += [str(d.dataset) for d in (run.inputs.dataset_inputs if run.inputs else [])]
    for model in client.search_logged_models(ids):
        out += [*map(str, model.params.items()), *map(str, model.tags.items()), model.name]
    for rm in client.search_registered_models():
        out += [rm.description or "", *map(str, rm.tags.items()), *map(str, rm.aliases.items())]
        for mv in client.search_model_versions(f"name = '{rm.name}'"):
            out += [mv.description or "", mv.source or "", *map(str, mv.tags.items())]
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _flow_run_logs(flow_run_ids: list[str]) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # logs are shipped in the background; send what is queued before reading
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=flow_run_ids)))
    return [log.message for log in logs]


def test_smoke_flow_end_to_end(prefect_harness, tiny_model, mlflow_server, tmp_path, monkeypatch, capfd):
    url, db_file, artifact_root = mlflow_server.url, mlflow_server.root / "mlflow.db", mlflow_server.root / "mlartifacts"
    planted = {name: f"plant{name.lower()[:6]}{pysecrets.token_hex(12)}" for name in SECRET_ENV}
    for name, value in planted.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")  # MLflow sends basic auth with the env password
    uri_password = f"uripw{pysecrets.token_hex(12)}"
    secret_uri = url.replace("http://", f"http://alice:{uri_password}@")
    overrides = _overrides(tmp_path, tiny_model, secret_uri,
                           description=f"smoke run; support key {planted['ACME_SERVICE_SECRET']}",
                           **{"evaluate.screen_rows": 4})  # smoke's 16 held-out rows: screening shows
    # Ray workers inherit the environment of the Ray instance: start a fresh one that sees the secrets.
    ray_runner.shutdown()
    try:
        summary = alignpipe_pipeline(pipeline="smoke", overrides=overrides, config_file=str(PIPELINES))
        client = tracking.client_for(url)
        _check_stages_runs_and_model(summary, client, url, tmp_path)
        _check_prefect_artifacts(summary)
        again, changed = _check_reruns_use_the_cache(summary, client, overrides)
        logs = _flow_run_logs([summary["flow_run_id"], again["flow_run_id"], changed["flow_run_id"]])
    finally:
        ray_runner.shutdown()  # later tests get a Ray without the planted environment
    out, err = capfd.readouterr()

    needles = {**planted, "tracking URI password": uri_password,
               "basic-auth header": base64.b64encode(f"alice:{planted['MLFLOW_TRACKING_PASSWORD']}".encode()).decode()}
    texts = {"mlflow store": "\n".join(_mlflow_texts(client)), "stdout": out, "stderr": err,
             "prefect flow-run logs": "\n".join(logs)}
    blobs = {"mlflow sqlite file": db_file.read_bytes(), **_files(artifact_root), **_files(tmp_path / "work")}
    # The search covered what it claims to: a registered model, artifacts, Ray storage, cache, logs, output.
    # (log_prints sends the stages' prints to the Prefect logs; stdout carries the Ray workers' output)
    assert any("registered smoke-model version" in m for m in logs)
    assert "RayTrainWorker" in out
    assert any("/ray_results/" in p for p in blobs) and any("/cache/" in p for p in blobs)
    assert any(p.endswith("model_card.md") for p in blobs) and any("stage sft: running" in m for m in logs)

    found = [(what, where) for what, value in needles.items() for where, text in texts.items() if value in text]
    found += [(what, where) for what, value in needles.items() for where, blob in blobs.items()
              if value.encode() in blob]
    assert not found, f"planted secrets found (secret, where): {found}"

    # Still recorded, with the password masked: where the store is, and the free-text field.
    params = client.get_run(summary["mlflow_run_id"]).data.params
    assert params["tracking.mlflow_uri"] == url.replace("http://", "http://alice:***@")
    assert params["description"] == "smoke run; support key ***"
    assert summary["mlflow_ui"].startswith(f"mlflow ui --backend-store-uri {url.replace('http://', 'http://alice:***@')}")


def _check_prefect_artifacts(summary):
    """The flow-run page shows the evaluation table and the promotion decision (flows/artifacts.py)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[summary["flow_run_id"]])))
    by_key = {a.key: a for a in found}
    assert set(by_key) == {"evaluation-smoke", "promotion-smoke"}, by_key
    table = by_key["evaluation-smoke"]
    assert table.type == "table" and [row["model"] for row in json.loads(table.data)] == list(summary["metrics"])
    promotion = by_key["promotion-smoke"]
    assert promotion.type == "markdown" and summary["registered"]["decision"] in promotion.data


def _check_stages_runs_and_model(summary, client, mlflow_uri, tmp_path):
    """Every stage ran; one parent run with a nested run per stage, their metrics, artifacts and plots; a
    registered version with lineage that loads and generates in a fresh process."""
    assert [s["stage"] for s in summary["stages"]] == ["prepare", "validate", "sft", "align", "quantize", "evaluate",
                                                       "register"]
    assert all(s["status"] == "done" for s in summary["stages"])
    assert (tmp_path / "work" / "runs" / f"{summary['flow_run_id']}.json").is_file()

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
    assert list(summary["metrics"]) == ["prompted_base", "base", "sft", "aligned", "quantized"]
    # Screened: sft (an intermediate) on the first 4 rows; the int8 challenger too, then on every row, as it can
    # win on size (smoke's serving objective); the plain base too, and only there, as the tiny model's 0 exact
    # match does not beat the prompted base's. Smoke's prompted base: 8 rows, k=1. Aligned (the verdict) on every row.
    assert {label: m["rows"] for label, m in summary["metrics"].items()} == {
        "prompted_base": 8, "base": 4, "sft": 4, "aligned": 16, "quantized": 16}
    assert "| rows | 8 | 4 | 4 | 16 | 16 |" in summary["table"] and "sft on its first 4 of the 16" in summary["table"]
    assert "delta: quantized minus prompted_base." in summary["table"]
    evaluated = by_stage["evaluate"].data.metrics
    for label in ("prompted_base", "base", "sft", "aligned", "quantized"):
        for metric in ("exact_match", "json_validity", "field_accuracy", "perplexity", "tokens_per_s",
                       "latency_p50_ms", "latency_p95_ms", "peak_rss_mb", "size_mb"):
            assert f"{label}/{metric}" in evaluated or (label, metric) == ("prompted_base", "perplexity"), \
                (label, metric)  # the prompted base's would measure its in-context examples
        assert evaluated[f"{label}/latency_p95_ms"] >= evaluated[f"{label}/latency_p50_ms"] > 0
    assert evaluated["quantized/size_mb"] < evaluated["aligned/size_mb"]
    assert {"plots/comparison.png", "plots/efficiency.png", "plots/cascade.png"} <= artifacts(by_stage["evaluate"], "plots")
    assert {"evaluation/comparison.md", "evaluation/comparison.csv", "evaluation/cascade.md",
            "evaluation/cascade.csv"} <= artifacts(by_stage["evaluate"], "evaluation")
    assert "| exact_match |" in summary["table"] and "| metric | prompted_base | base | sft | aligned | quantized |" in \
        summary["table"]
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
    choice = summary["serving_choice"]  # smoke serves by size: the int8 model wins and is what was registered
    assert [c["label"] for c in choice["candidates"]] == ["aligned", "quantized"] and choice["winner"] == "quantized"
    assert json.loads(version.tags["serving_choice"])["winner"] == "quantized"

    # The registered (int8) model loads and generates in a fresh process that knows nothing of alignpipe, with
    # the fused int8 linears evaluate scored it with (int8_cpu.py ships with the model).
    code = (
        "import json, sys, mlflow\n"
        f"m = mlflow.pyfunc.load_model('models:/{reg['model_name']}@challenger')\n"
        "out = m.predict(['Ana Lima is 34 and lives in Porto.'])\n"
        "fused = sum('quantized.dynamic' in type(x).__module__ for x in m.unwrap_python_model().model.modules())\n"
        "print(json.dumps({'out': list(out), 'alignpipe': 'alignpipe' in sys.modules, 'fused': fused}))\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result["out"]) == 1 and isinstance(result["out"][0], str) and not result["alignpipe"]
    assert result["fused"] == 10, result  # the tiny model's 2 layers x 7 linears, less down_proj and o_proj


def _check_reruns_use_the_cache(summary, client, overrides):
    """Unchanged: every stage comes from the content-keyed cache. Only evaluate's settings changed: evaluate alone
    runs again."""
    reg = summary["registered"]
    # Re-run unchanged: every stage is served from the content-keyed cache; register finds the same weights.
    again = alignpipe_pipeline(pipeline="smoke", overrides=overrides, config_file=str(PIPELINES))
    status = {s["stage"]: s["status"] for s in again["stages"]}
    assert status == {"prepare": "done", "validate": "cached", "sft": "cached", "align": "cached",
                      "quantize": "cached", "evaluate": "cached", "register": "done"}
    assert again["registered"]["version"] == reg["version"] and again["registered"]["reused"]
    assert again["metrics"] == summary["metrics"]
    assert client.get_run(again["mlflow_run_id"]).data.tags["alignpipe.cached_stages"] == \
        "validate,sft,align,quantize,evaluate"

    # Only the evaluation settings change: evaluate runs again, the training stages stay cached.
    changed = alignpipe_pipeline(pipeline="smoke", overrides={**overrides, "evaluate.max_new_tokens": 12,
                                 # fewer models to score: only the stages' statuses are read from this run
                                 "evaluate.compare_base": False, "evaluate.screen_rows": 0},
                                 config_file=str(PIPELINES))
    status = {s["stage"]: s["status"] for s in changed["stages"]}
    assert status == {"prepare": "done", "validate": "cached", "sft": "cached", "align": "cached",
                      "quantize": "cached", "evaluate": "done", "register": "done"}
    return again, changed


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
