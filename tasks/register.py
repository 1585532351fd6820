"""Register stage: merge the SFT adapter into the base model and register it as a new MLflow model version.

Reads the adapter folder written by `sft`; writes the merged model to the stage's output dir, logs it as a
"models from code" pyfunc (`alignpipe/serving/chat_model.py`) into the nested `register` run, registers a
version tagged with the run's lineage and metrics, and points the configured alias (`@challenger`) at it.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib.metadata import version as package_version

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from alignpipe import ray_runner, tracking
from alignpipe.config import PipelineConfig
from alignpipe.errors import AlignpipeError
from alignpipe.merge import merge_adapter
from alignpipe.runs import RunContext, content_key, dir_digest
from alignpipe.serving import CHAT_MODEL_CODE

DEFAULT_EXAMPLE = "Ana Lima is 34 and lives in Porto."
NOT_TAGS = {"input_example"}  # lineage keys that are inputs to this stage, not lineage
READY_TIMEOUT_S = 300


class RegisterOutput(BaseModel):
    model_name: str
    version: str
    alias: str
    model_uri: str              # "models:/<name>/<version>"
    merged_dir: str             # merged safetensors model + tokenizer, as logged
    mlflow_run_id: str          # the nested `register` run the model was logged into


def pip_requirements() -> list[str]:
    """What the served model needs, pinned to this environment (mlflow's inference would add torchvision)."""
    import mlflow
    import torch
    import transformers

    return [
        f"mlflow=={mlflow.__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
        f"transformers=={transformers.__version__}",
        f"tokenizers=={package_version('tokenizers')}",
        f"safetensors=={package_version('safetensors')}",
        "pandas",
    ]


def signature(max_new_tokens: int):
    """Prompts (strings) in, answers (strings) out; `max_new_tokens` may be overridden per request."""
    from mlflow.models import infer_signature

    return infer_signature([DEFAULT_EXAMPLE], ["answer"], params={"max_new_tokens": max_new_tokens})


@contextmanager
def fluent_run(uri: str, run_id: str):
    """Make `run_id` the active run on `uri` for mlflow's fluent API, then put the global tracking URI back.

    `mlflow.pyfunc.log_model` only logs into the active run, and the SQL model registry resolves
    `models:/m-<id>` sources through the global tracking URI; everything else here uses explicit clients.
    """
    import mlflow

    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)  # also exports MLFLOW_TRACKING_URI; set_tracking_uri(None) unsets it again
    try:
        with mlflow.start_run(run_id=run_id):
            yield
    finally:
        mlflow.set_tracking_uri(previous)


def register_model(cfg: PipelineConfig, ctx: RunContext, adapter_dir: str, lineage: dict[str, str],
                   metrics: dict[str, float]) -> RegisterOutput:
    """Merge, log, register, tag and alias one model version.

    Args:
        cfg: The pipeline config (`register`, `tracking.registered_model`, `model.system_prompt`).
        ctx: The flow run's context (tracking URI, parent run, base model, workdir).
        adapter_dir: PEFT adapter folder from `sft`.
        lineage: Tags for the version: config/data digests, git commit, stage run ids, flow run id.
            An `input_example` key, if present, is used as the logged input example instead of a tag.
        metrics: Evaluation metrics of the tuned model, tagged as `metrics.<name>`.

    Returns:
        The registered version and where its merged weights are.
    """
    import mlflow
    import ray

    name, alias = cfg.tracking.registered_model, cfg.register_.alias
    key = content_key("register", {"register": cfg.register_.model_dump(mode="json"), "registered_model": name},
                      {"adapter": dir_digest(adapter_dir), "base": ctx.base_model})
    client = tracking.client_for(ctx.tracking_uri)
    with tracking.stage_run(ctx.tracking_uri, ctx.parent_run_id, "register", key) as run_id:
        # Loading and merging the full model is heavy work: a Ray task, so the flow process stays light.
        ray_runner.ensure_ray(cfg.compute)
        merge = ray.remote(num_cpus=1, max_calls=1)(merge_adapter)
        merged_dir = ray_runner.get(merge.remote(ctx.base_model, adapter_dir, str(ctx.stage_dir("register", key) / "merged")))
        weights = dir_digest(merged_dir)
        tags = {k: str(v) for k, v in lineage.items() if k not in NOT_TAGS}
        tags["weights_digest"] = weights
        tags.update({f"metrics.{k}": str(float(v)) for k, v in metrics.items() if tracking.is_number(v)})
        with fluent_run(ctx.tracking_uri, run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(CHAT_MODEL_CODE),
                artifacts={"model": merged_dir},
                model_config={"system_prompt": cfg.model.system_prompt,
                              "max_new_tokens": cfg.evaluate.max_new_tokens},
                signature=signature(cfg.evaluate.max_new_tokens),
                input_example=[lineage.get("input_example") or DEFAULT_EXAMPLE],
                pip_requirements=pip_requirements(),
            )
            # Still inside: the SQL registry looks the logged model up through the *global* tracking URI.
            version = _create_version(client, name, info, run_id, tags, _description(cfg, ctx, lineage, metrics))
        client.set_registered_model_alias(name, alias, version)
        for k, v in {"registered_model": name, "registered_version": version, "registered_alias": alias,
                     "weights_digest": weights}.items():
            client.set_tag(run_id, k, v)
    print(f"registered {name} version {version} as @{alias} (models:/{name}@{alias})")
    return RegisterOutput(model_name=name, version=version, alias=alias, model_uri=f"models:/{name}/{version}",
                          merged_dir=merged_dir, mlflow_run_id=run_id)


def _create_version(client, name: str, info, run_id: str, tags: dict[str, str], description: str) -> str:
    """A new version of `name` (created on first use) from a logged model, once the registry reports it READY."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="Fine-tuned by alignpipe.")
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    mv = client.create_model_version(name, info.model_uri, run_id=run_id, tags=tags, description=description,
                                     model_id=info.model_id)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while mv.status == "PENDING_REGISTRATION" and time.monotonic() < deadline:
        time.sleep(1)
        mv = client.get_model_version(name, mv.version)
    if mv.status != "READY":
        raise RuntimeError(f"model {name} version {mv.version} is {mv.status}: {mv.status_message}")
    return str(mv.version)


def _description(cfg: PipelineConfig, ctx: RunContext, lineage: dict[str, str], metrics: dict[str, float]) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if tracking.is_number(v)) or "none"
    return (f"Fine-tuned by alignpipe pipeline '{cfg.name}' ({cfg.sft.peft.method} SFT, adapter merged into the "
            f"weights) from base model {cfg.model.name}, registered {when} by flow run {ctx.run_id} "
            f"(git {lineage.get('git_commit', 'unknown')}). Evaluation: {shown}. Serve with "
            f"mlflow.pyfunc.load_model('models:/{cfg.tracking.registered_model}@{cfg.register_.alias}').")


def _retry_unless_user_error(task, task_run, state) -> bool:
    """Retry tracking-server hiccups; an AlignpipeError (e.g. an unmergeable adapter) fails the same way again."""
    try:
        state.result()
    except AlignpipeError:
        return False
    except Exception:
        return True
    return False


@task(name="register", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 20],
      retry_condition_fn=_retry_unless_user_error)
def register(cfg: PipelineConfig, ctx: RunContext, adapter_dir: str, lineage: dict[str, str],
             metrics: dict[str, float]) -> RegisterOutput:
    """Merge the adapter and register the model as a new version aliased `register.alias`; never cached."""
    return register_model(cfg, ctx, adapter_dir, lineage, metrics)
