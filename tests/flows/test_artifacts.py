"""The flow-run page's artifacts (flows/artifacts.py), published from a flow on Prefect's test harness."""

import math

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.runtime import flow_run

from alignpipe.flows.artifacts import (artifact_key, evaluation_rows, promotion_markdown, publish_evaluation,
                                       publish_promotion)
from alignpipe.tasks.evaluate import EvalOutput
from alignpipe.tasks.register import RegisterOutput

METRICS = {"base": {"exact_match": 0.1, "perplexity": 12.345678}, "sft": {"exact_match": 0.8, "tokens_per_s": 90.0}}
REGISTERED = RegisterOutput(model_name="smoke-model", version="3", alias="challenger",
                            model_uri="models:/smoke-model/3", model_dir="/m", mlflow_run_id="r", candidate="aligned",
                            promoted=False, decision="version 3 stays @challenger: failed exact_match >= champion + 0.005")


def test_keys_are_what_prefect_accepts():
    assert artifact_key("evaluation", "demo") == "evaluation-demo"
    assert artifact_key("promotion", "My_Pipeline v2") == "promotion-my-pipeline-v2"


def test_one_row_per_model_and_a_column_per_metric():
    rows = evaluation_rows(METRICS)
    assert rows == [{"model": "base", "exact_match": 0.1, "perplexity": 12.3457, "tokens_per_s": None},
                    {"model": "sft", "exact_match": 0.8, "perplexity": None, "tokens_per_s": 90.0}]
    assert math.isnan(evaluation_rows({"base": {"x": math.nan}})[0]["x"])  # Prefect sanitises NaN itself


def test_promotion_says_why_or_that_nothing_was_registered():
    text = promotion_markdown("smoke", REGISTERED)
    assert "| version | 3 |" in text and "@challenger" in text and "**not promoted**" in text
    assert "failed exact_match >= champion + 0.005" in text
    assert "register.enabled` is false" in promotion_markdown("smoke", None)
    # which artifact was registered, and why: the serving choice's decision table under the outcome
    from alignpipe.config.register import ServeConfig
    from alignpipe.serving_choice import choose

    choice = choose(["aligned", "quantized"], {
        "aligned": {"latency_p95_ms": 2083.0, "size_mb": 557.7, "exact_match": 0.83},
        "quantized": {"latency_p95_ms": 3394.0, "size_mb": 220.5, "exact_match": 0.8225}}, ServeConfig())
    text = promotion_markdown("smoke", REGISTERED, choice)
    assert "## Which artifact" in text and "**Registered: `aligned`**" in text
    assert "| quantized | 3394 | 220.5 | 0.8225 | yes | 1.63x worse on latency_p95_ms" in text


def test_both_artifacts_land_on_the_flow_run(prefect_harness):
    @flow
    def publishes(registered: RegisterOutput | None) -> str:
        publish_evaluation("smoke", EvalOutput(metrics=METRICS, table_path="t.md", mlflow_run_id="e"))
        publish_promotion("smoke", registered)
        return str(flow_run.id)

    run_id = publishes(REGISTERED)
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    by_key = {a.key: a for a in found}
    assert set(by_key) == {"evaluation-smoke", "promotion-smoke"}
    assert by_key["evaluation-smoke"].type == "table" and "sft" in by_key["evaluation-smoke"].data
    assert by_key["promotion-smoke"].type == "markdown" and "stays @challenger" in by_key["promotion-smoke"].data
