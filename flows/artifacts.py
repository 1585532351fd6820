"""What a flow run shows on its Prefect page: the evaluation table and the promotion decision as artifacts.

Reads the evaluate and register stages' outputs; writes Prefect artifacts (keyed per pipeline, so the UI's
Artifacts page keeps each pipeline's history) to the server of the current flow run.
"""

from __future__ import annotations

import re
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from alignpipe.serving_choice import ServingChoice
from alignpipe.tasks.evaluate import EvalOutput
from alignpipe.tasks.register import RegisterOutput


def artifact_key(kind: str, pipeline: str) -> str:
    """`<kind>-<pipeline>` in what Prefect allows in a key: lowercase letters, digits and dashes."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", f"{kind}-{pipeline}".lower())).strip("-")


def evaluation_rows(metrics: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """One row per evaluated model label, one column per metric (blank where a model has no such metric)."""
    columns = list(dict.fromkeys(k for m in metrics.values() for k in m))
    return [{"model": label, **{k: _cell(m.get(k)) for k in columns}} for label, m in metrics.items()]


def promotion_markdown(pipeline: str, registered: RegisterOutput | None, choice: ServingChoice | None = None) -> str:
    """The register stage's outcome in a few lines: version, alias, promoted or not, and why; then which artifact
    was registered and why (the serving choice's decision table), when there was a choice."""
    if registered is None:
        return f"# Promotion: {pipeline}\n\nNothing registered: `register.enabled` is false for this pipeline.\n"
    verdict = "promoted" if registered.promoted else "not promoted"
    return (f"# Promotion: {pipeline}\n\n"
            f"| | |\n|---|---|\n"
            f"| model | `{registered.model_name}` |\n"
            f"| version | {registered.version}{' (reused: same weights)' if registered.reused else ''} |\n"
            f"| alias | @{registered.alias} |\n"
            f"| candidate | {registered.candidate} |\n"
            f"| outcome | **{verdict}** |\n"
            f"| model URI | `{registered.model_uri}` |\n\n"
            f"{registered.decision or 'no decision recorded'}\n"
            + (f"\n## Which artifact\n\n{choice.markdown()}" if choice else ""))


def publish_evaluation(pipeline: str, scores: EvalOutput) -> None:
    """The side-by-side evaluation table on the current flow run (call from inside the flow)."""
    create_table_artifact(evaluation_rows(scores.metrics), key=artifact_key("evaluation", pipeline),
                          description=f"Evaluation of {pipeline}: each model side by side on the held-out data")


def publish_promotion(pipeline: str, registered: RegisterOutput | None, choice: ServingChoice | None = None) -> None:
    """The promotion decision on the current flow run; None = register was disabled (said so)."""
    create_markdown_artifact(promotion_markdown(pipeline, registered, choice), key=artifact_key("promotion", pipeline),
                             description=f"Registration and promotion decision of {pipeline}")


def _cell(value: float | None) -> float | None:
    return round(value, 4) if isinstance(value, float) else value
