"""Register stage: log the chosen artifact as an MLflow pyfunc, register it (once per weights digest), gate it.

Reads the artifact `register.serve` chose (alignpipe.serving_choice): merged or quantized weights, or base + adapter
(merged here on Ray, or kept as adapter plus a pinned base reference when `register.adapter_only`), the evaluation
metrics and the decision table. Writes the model card, the decision table (`serving_choice.md`) and the logged model
into the nested `register` run, the evaluation as that logged model's metrics, a model version tagged with the run's
lineage and the decision (`serving_choice`, JSON), `@challenger` on it, and `@champion` when every gate in
`register.gates` passes (alignpipe.registry).
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version as package_version
from pathlib import Path
from typing import Any

from pydantic import BaseModel

import alignpipe
from alignpipe import ray_runner, registry, secrets, tracking
from alignpipe.kernels import int8_cpu
from alignpipe.config import PipelineConfig
from alignpipe.errors import AlignpipeError
from alignpipe.merge import merge_on_ray
from alignpipe.model_card import model_card
from alignpipe.runs import RunContext, content_key, dir_digest, file_digest
from alignpipe.serving import CHAT_MODEL_CODE
from alignpipe.serving_choice import ServingChoice

DEFAULT_EXAMPLE = "Ana Lima is 34 and lives in Porto."
NOT_TAGS = {"input_example"}  # lineage keys that are inputs to this stage, not lineage
QUANT_PACKAGES = {"torchao": ("torchao",), "bitsandbytes": ("bitsandbytes", "accelerate")}  # by quant_method
READY_TIMEOUT_S = 300
DESCRIPTION_MAX = 4900        # the registry stores at most 5000 characters of description
_FLUENT = threading.RLock()   # the global tracking URI is process-wide: one fluent run at a time per process


class RegisterOutput(BaseModel):
    model_name: str
    version: str
    alias: str                    # the alias every new version gets (`register.alias`, "challenger")
    model_uri: str                # "models:/<name>/<version>"
    model_dir: str                # what was logged: merged / quantized weights, or the adapter
    mlflow_run_id: str            # the nested `register` run
    candidate: str                # evaluation label of the registered artifact
    reused: bool = False          # an identical version (same weights digest) existed; the run points to it
    promoted: bool = False
    decision: str = ""            # one line: promoted / stays challenger and why


class Artifact(BaseModel):
    """What gets logged: a folder, how to serve it, and what to pin."""
    model_dir: str
    digest: str
    description: str
    model_config_extra: dict[str, Any] = {}
    requirements_extra: list[str] = []
    code_paths: list[str] = []    # files the pyfunc imports beside chat_model.py


def pip_requirements(extra: list[str] = ()) -> list[str]:
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
        f"pandas=={package_version('pandas')}",
        *extra,
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

    with _FLUENT:
        previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
        mlflow.set_tracking_uri(uri)  # also exports MLFLOW_TRACKING_URI; set_tracking_uri(None) unsets it again
        try:
            with mlflow.start_run(run_id=run_id):
                yield
        finally:
            mlflow.set_tracking_uri(previous)


def register_model(cfg: PipelineConfig, ctx: RunContext, base_path: str, adapter_dir: str | None,
                   quantized_dir: str | None, metrics: dict[str, dict[str, float]], candidate: str,
                   lineage: dict[str, str], choice: ServingChoice | None = None) -> RegisterOutput:
    """Log, register (unless the same weights are already registered), tag, alias and gate one model.

    Args:
        cfg: The pipeline config (`register`, `tracking.registered_model`, `model`, `data`, `sft`).
        ctx: The flow run's context (tracking URI, parent run, workdir).
        base_path: Base model folder; the model itself when there is neither adapter nor quantized folder.
        adapter_dir: PEFT adapter trained on `base_path`, or None.
        quantized_dir: A folder `AutoModelForCausalLM.from_pretrained` loads (quantization ran), or None.
        metrics: Evaluation metrics, label -> metric -> value; `metrics[candidate]` are the registered
            artifact's; the gates compare with the better base (`registry.better_base`: plain or prompted).
        candidate: Label of the registered artifact ("sft", "aligned", "quantized").
        lineage: Tags for the version: config/data digests, git commit, stage run ids, flow run id.
            An `input_example` key, if present, is used as the logged input example instead of a tag.
        choice: Why `candidate` was chosen among the trained artifacts (the decision table), or None.

    Returns:
        The registered (or reused) version and the promotion decision.
    """
    import mlflow

    name, alias = cfg.tracking.registered_model, cfg.register_.alias
    uri = ctx.tracking_uri
    inputs = {"base": base_path, "adapter": dir_digest(ctx.local(adapter_dir)) if adapter_dir else "",
              "quantized": dir_digest(ctx.local(quantized_dir)) if quantized_dir else ""}
    key = content_key("register", {"register": cfg.register_.model_dump(mode="json"), "registered_model": name},
                      inputs)
    client = tracking.client_for(uri)
    with tracking.stage_run(uri, ctx.parent_run_id, "register", key) as run_id:
        art = _artifact(cfg, ctx, key, base_path, adapter_dir, quantized_dir)
        lineage = {**_stage_run_ids(client, ctx), **lineage}
        tags = _lineage_tags(cfg, lineage, candidate, art)
        if choice is not None:
            tags["serving_choice"] = choice.model_dump_json()  # the whole table: versions hold 100k per tag
            _log_choice(client, run_id, ctx.stage_dir("register", key), choice)
        numbers = {label: {k: float(v) for k, v in m.items() if tracking.is_number(v)} for label, m in metrics.items()}
        _log_datasets(client, run_id, cfg, lineage)
        registry.ensure_model(client, name)
        existing = registry.find_by_digest(client, name, art.digest)
        if existing is None:
            champion = registry.alias_version(client, name, registry.CHAMPION)
            card = secrets.redact(model_card(
                cfg, name, candidate, metrics,
                (str(champion.version), registry.version_metrics(client, champion)[0]) if champion else None,
                {**lineage, **tags}, art.description + (f" Chosen to serve: {choice.reason}." if choice else "")))
            card_path = ctx.stage_dir("register", key) / "model_card.md"
            card_path.write_text(card)
            client.log_artifact(run_id, str(card_path))
            tags["model_card"] = f"runs:/{run_id}/model_card.md"
            with fluent_run(uri, run_id):
                info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=str(CHAT_MODEL_CODE),
                    artifacts={"model": art.model_dir, "model_card": str(card_path)},
                    model_config={"system_prompt": cfg.model.system_prompt,
                                  "max_new_tokens": cfg.evaluate.max_new_tokens, **art.model_config_extra},
                    signature=signature(cfg.evaluate.max_new_tokens),
                    input_example=[lineage.get("input_example") or DEFAULT_EXAMPLE],
                    pip_requirements=pip_requirements(art.requirements_extra),
                    code_paths=art.code_paths or None,
                )
                # before the version exists, so no reader ever finds a version without its metrics
                registry.log_version_metrics(client, run_id, info.model_id, numbers.get(candidate, {}),
                                             registry.better_base(numbers, cfg.register_.primary_metric)[1])
                # Under the lock, so two runs with the same weights can't both create a version; still inside
                # the fluent run: the SQL registry resolves the logged model through the *global* tracking URI.
                with registry.registry_lock(client, uri, name, lock_url=cfg.register_.lock_url,
                                            lease_s=cfg.register_.lock_lease_seconds):
                    existing = registry.find_by_digest(client, name, art.digest)
                    if existing is None:
                        version = _create_version(client, name, info, run_id, tags, _description(card, run_id))
                        registry.move_alias(client, name, alias, version, f"flow run {ctx.run_id}",
                                            f"registered by pipeline {cfg.name}")
        if existing is not None:  # same weights already registered: no duplicate, the run points to it
            version = str(existing.version)
            client.set_tag(run_id, "duplicate_of", f"models:/{name}/{version}")
            out = RegisterOutput(model_name=name, version=version, alias=alias, model_uri=f"models:/{name}/{version}",
                                 model_dir=art.model_dir, mlflow_run_id=run_id, candidate=candidate, reused=True,
                                 promoted=existing.tags.get("promotion.decision") in ("promoted", "forced"),
                                 decision=f"same weights as version {version}; nothing new registered")
        else:
            out = RegisterOutput(model_name=name, version=version, alias=alias, model_uri=f"models:/{name}/{version}",
                                 model_dir=art.model_dir, mlflow_run_id=run_id, candidate=candidate,
                                 decision="not checked (register.promote is false)")
            if cfg.register_.promote:
                decision = registry.promote(client, uri, name, version, gates=cfg.register_.gates,
                                            primary_metric=cfg.register_.primary_metric,
                                            actor=f"flow run {ctx.run_id}", reason=f"pipeline {cfg.name} gates",
                                            lock_url=cfg.register_.lock_url, lease_s=cfg.register_.lock_lease_seconds)
                out.promoted, out.decision = decision.promoted, decision.summary()
        for k, v in {"registered_model": name, "registered_version": out.version, "registered_alias": alias,
                     "weights_digest": art.digest, "promotion": out.decision}.items():
            client.set_tag(run_id, k, secrets.redact(v))
    print(f"registered {name} version {out.version} as @{alias} (models:/{name}@{alias}); {out.decision}")
    return out


def _artifact(cfg: PipelineConfig, ctx: RunContext, key: str, base_path: str, adapter_dir: str | None,
              quantized_dir: str | None) -> Artifact:
    """Pick (and for base + adapter, build) the folder to log, its weights digest and serving settings.

    The folder logged is a copy on the driver of what sits in storage: MLflow uploads it to its own artifact store."""
    if quantized_dir:
        quantized_dir = ctx.local(quantized_dir)
        qcfg = json.loads((Path(quantized_dir) / "config.json").read_text()).get("quantization_config") or {}
        method = str(qcfg.get("quant_method", "")).lower()
        # the serving host rebuilds the layers from the quantization_config: pin the library that wrote them
        # (bitsandbytes loads through accelerate, which transformers does not require)
        extra = [_pin(package) for package in QUANT_PACKAGES.get(method, ())]
        runtime, code = {}, []
        if cfg.quantize.cpu_kernel != "torchao" and int8_cpu.is_int8_dynamic(quantized_dir, here=False):
            # served on CPU as evaluate scored it: the serving host resolves the kernel (int8_cpu.py ships along)
            runtime, code = cfg.quantize.cpu_runtime(cfg.compute.kernels), [int8_cpu.__file__]
        return Artifact(model_dir=quantized_dir, digest=dir_digest(quantized_dir), requirements_extra=extra,
                        model_config_extra=runtime, code_paths=code,
                        description=f"Quantized weights ({method or 'unknown method'}).")
    if adapter_dir and cfg.register_.adapter_only:
        adapter_dir = ctx.local(adapter_dir)
        local_base = ctx.local(base_path)
        base_digest = dir_digest(local_base) if Path(local_base).is_dir() else base_path
        digest = registry_digest(dir_digest(adapter_dir), base_digest)
        return Artifact(model_dir=adapter_dir, digest=digest, requirements_extra=[_pin("peft")],
                        model_config_extra={"base_model": base_path, "base_model_digest": base_digest},
                        description=f"PEFT adapter only, applied at load time to base model `{base_path}` "
                                    f"(sha256 {base_digest[:16]}): the serving host needs that base model.")
    if adapter_dir:
        ray_runner.ensure_ray(cfg.compute)
        merged = ctx.local(merge_on_ray(ctx.storage, base_path, adapter_dir, ctx.stage_uri("register", key, "merged"),
                                        cfg.compute))
        return Artifact(model_dir=merged, digest=dir_digest(merged),
                        description="Merged weights (adapter folded into the base model; loads without peft).")
    base_path = ctx.local(base_path)
    return Artifact(model_dir=base_path, digest=dir_digest(base_path), description="Full model weights.")


def registry_digest(*parts: str) -> str:
    import hashlib

    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _pin(package: str) -> str:
    try:
        return f"{package}=={package_version(package)}"
    except PackageNotFoundError:
        raise AlignpipeError(f"the registered model needs {package}, which is not installed here; "
                             f"pip install {package} (pinned in requirements.lock)") from None


def _lineage_tags(cfg: PipelineConfig, lineage: dict[str, str], candidate: str, art: Artifact) -> dict[str, str]:
    """Version tags: lineage, lock-file digest, seeds, the weights digest (the metrics go on the logged model)."""
    tags = {k: str(v) for k, v in lineage.items() if k not in NOT_TAGS}
    lock = Path(alignpipe.__file__).resolve().parent.parent / "requirements.lock"
    tags["lock_digest"] = file_digest(lock) if lock.is_file() else "unknown"
    tags["seed.sft"] = str(cfg.sft.seed)
    for stage in ("align", "quantize"):  # sections other stages add; recorded when they carry a seed
        seed = getattr(getattr(cfg, stage, None), "seed", None)
        if seed is not None:
            tags[f"seed.{stage}"] = str(seed)
    tags.update({"weights_digest": art.digest, "candidate": candidate, "pipeline": cfg.name})
    return {k: secrets.redact(v) for k, v in tags.items()}  # lineage carries user-set text (paths, names)


def _log_choice(client, run_id: str, out_dir: Path, choice: ServingChoice) -> None:
    """The decision table as `serving_choice.md` in the register run, its one-line reason as a run tag."""
    path = Path(out_dir) / "serving_choice.md"
    path.write_text(choice.markdown())
    client.log_artifact(run_id, str(path))
    client.set_tag(run_id, "serving_choice", f"{choice.winner}: {choice.reason}"[:4000])


def _stage_run_ids(client, ctx: RunContext) -> dict[str, str]:
    """`run_id.<stage>` for every stage run of this flow run so far (whatever stages the flow has)."""
    runs = client.search_runs([ctx.experiment_id], f"tags.mlflow.parentRunId = '{ctx.parent_run_id}'")
    out = {"run_id.parent": ctx.parent_run_id}
    for run in sorted(runs, key=lambda r: r.info.start_time):  # a stage run twice: the latest wins
        stage = run.data.tags.get(tracking.TAG_STAGE)
        if stage and stage != "register":
            out[f"run_id.{stage}"] = run.info.run_id
    return out


def _log_datasets(client, run_id: str, cfg: PipelineConfig, lineage: dict[str, str]) -> None:
    """The data this model was trained and evaluated on, as MLflow dataset inputs (name, digest, source)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = []
    for key, digest in sorted(lineage.items()):
        if not key.startswith("data_digest."):
            continue
        split = key.removeprefix("data_digest.")
        src = getattr(cfg.data, split, None)
        context = "evaluation" if split == "eval" else "training"
        inputs.append(DatasetInput(
            Dataset(name=f"{cfg.name}-{split}", digest=digest[:36], source_type="local",
                    source=json.dumps({"uri": getattr(src, "path", split)})),
            tags=[InputTag("mlflow.data.context", context)]))
    if inputs:
        client.log_inputs(run_id, datasets=inputs)


def _create_version(client, name: str, info, run_id: str, tags: dict[str, str], description: str) -> str:
    """A new version of `name` from a logged model, once the registry reports it READY."""
    mv = client.create_model_version(name, info.model_uri, run_id=run_id, tags=tags, description=description,
                                     model_id=info.model_id)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while mv.status == "PENDING_REGISTRATION" and time.monotonic() < deadline:
        time.sleep(1)
        mv = client.get_model_version(name, mv.version)
    if mv.status != "READY":
        raise RuntimeError(f"model {name} version {mv.version} is {mv.status}: {mv.status_message}")
    return str(mv.version)


def _description(card: str, run_id: str) -> str:
    """The model card itself (the registry UI renders markdown), cut to the registry's limit if needed."""
    if len(card) <= DESCRIPTION_MAX:
        return card
    return card[: DESCRIPTION_MAX - 80] + f"\n\n... (full card: runs:/{run_id}/model_card.md)"
