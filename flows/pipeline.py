"""The alignpipe flow: validate -> sft -> align -> quantize -> evaluate -> register; one MLflow parent run per flow run."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from prefect import Task, flow
from prefect.runtime import flow_run

from alignpipe import models, ray_runner, secrets, serving_choice, tracking
from alignpipe.flows.caching import cached, stage_lock
from alignpipe.config import load_checked
from alignpipe.flows import artifacts, stages
from alignpipe.runs import RunContext, config_digest, git_commit, publish_model, save_summary
from alignpipe.storage import Storage
from alignpipe.tasks.evaluate import ModelSpec

DEFAULT_CONFIG = "pipelines.yaml"


class StageClock:
    """Wall time and status of each stage, for the end-of-run summary."""

    def __init__(self, lock: Callable[[str, tuple], AbstractContextManager] | None = None):
        self.stages: list[dict[str, Any]] = []
        self.lock = lock  # held around a cached stage: one flow run at a time runs a stage key

    def run(self, name: str, fn, *args):
        """Run one stage (a Prefect task, or a plain function); a task served from the cache is marked `cached`."""
        print(f"stage {name}: running")
        entry = {"stage": name, "status": "running", "seconds": 0.0}
        self.stages.append(entry)
        t0 = time.perf_counter()
        status = "done"
        try:
            if isinstance(fn, Task):
                with self.lock(name, args) if self.lock and name in stages.STAGE_MODULES else nullcontext():
                    state = fn(*args, return_state=True)
                status = "cached" if state.name == "Cached" else "done"
                result = state.result()  # re-raises the stage's own exception
            else:
                result = fn(*args)
        except BaseException as exc:
            entry.update(status="failed", seconds=time.perf_counter() - t0)
            if not isinstance(exc, Exception):  # SIGTERM, Ctrl-C (ray_runner.wait_interruptibly): no Ray work stays
                ray_runner.shutdown()
            raise
        entry.update(status=status, seconds=time.perf_counter() - t0)
        print(f"stage {name}: {status} in {entry['seconds']:.1f}s")
        return result


def prepare(cfg, storage: Storage) -> str:
    """The base model: resolved (the embedded and tiny models are built on first use) and published to storage,
    where the workers read it."""
    return publish_model(storage, models.resolve_model(cfg.model.name, Path(cfg.workdir) / "models"))


def _stage(name: str, cfg):
    """A stage's Prefect task, content-keyed by its module's own `cache_key` (see flows/caching.py)."""
    return cached(getattr(stages, name), stages.STAGE_MODULES[name].cache_key, cfg.cache, cfg.workdir)


def _lock(cfg):
    """The stage-key lock for StageClock: keyed by the stage module's own `cache_key`, as the cache is."""
    return lambda name, args: stage_lock(name, stages.STAGE_MODULES[name].cache_key(*args), cfg.cache, cfg.workdir)


def stop_ray_work(flow, flow_run, state) -> None:
    """Cancelled or crashed: no training worker may outlive the flow run (Prefect hook signature)."""
    ray_runner.shutdown()


@flow(name="alignpipe", log_prints=True, on_cancellation=[stop_ray_work], on_crashed=[stop_ray_work])
def alignpipe_pipeline(pipeline: str = "demo", overrides: dict[str, Any] | None = None,
                       config_file: str = DEFAULT_CONFIG) -> dict[str, Any]:
    """Run one pipeline from pipelines.yaml.

    Args:
        pipeline: Name of the pipeline in the pipelines file.
        overrides: `section.key` -> value, like `--set` (e.g. {"sft.max_steps": 100}).
        config_file: The pipelines file (a path the flow-run process can read).
    """
    cfg = load_checked(config_file, pipeline, overrides, env=os.environ)  # `alignpipe run` checked it already
    run_id = str(flow_run.id or f"local-{int(time.time())}")
    clock = StageClock(lock=_lock(cfg))
    storage = Storage.for_compute(cfg.compute, cfg.workdir)
    base = clock.run("prepare", prepare, cfg, storage)
    lineage = {"config_digest": config_digest(cfg), "git_commit": git_commit(Path(config_file).resolve().parent),
               "flow_run_id": run_id, "base_model": cfg.model.name}
    with tracking.parent_run(cfg, run_id, {k: v for k, v in lineage.items() if k != "flow_run_id"}) as (uri, exp, parent):
        tracking.log_params(uri, parent, cfg.model_dump(mode="json", by_alias=True))
        ctx = RunContext(run_id=run_id, pipeline=cfg.name, tracking_uri=uri, experiment_id=exp,
                         parent_run_id=parent, workdir=cfg.workdir, base_model=base, storage=storage)
        data = clock.run("validate", _stage("validate", cfg), cfg, ctx)
        # Ray from here on, started once: in-process sized to what this pipeline asks for (concurrent runs on one
        # machine share its cores), or the cluster at compute.ray_address, never a local Ray in its place.
        ray_runner.ensure_ray(cfg.compute, cpus=ray_runner.local_cpus(cfg))
        tuned = clock.run("sft", _stage("sft", cfg), cfg, ctx, data.train_path, data.digests["sft"])
        aligned = None
        if cfg.align.method != "none":
            aligned = clock.run("align", _stage("align", cfg), cfg, ctx, tuned.adapter_dir, data.preference_path,
                                data.digests["preference"], data.preference_eval_path)
        specs = []
        if cfg.evaluate.compare_base:  # the prompted base first: the plain one is screened against it
            prompted = cfg.evaluate.prompted_base
            if prompted.enabled:
                specs.append(ModelSpec(label="prompted_base", base_path=base, few_shot=prompted.k))
            specs.append(ModelSpec(label="base", base_path=base, screen=prompted.enabled,
                                   rival="prompted_base" if prompted.enabled else None))
        specs.append(ModelSpec(label="sft", base_path=base, adapter_dir=tuned.adapter_dir))
        last, last_key = specs[-1], tuned.content_key  # the last trained artifact: quantized, a serving candidate
        if aligned:
            specs[-1].screen = True  # sft: an intermediate now, scored on evaluate.screen_rows
            last = ModelSpec(label="aligned", base_path=aligned.base_path, adapter_dir=aligned.adapter_dir,
                             reference_path=aligned.base_path, reference_label="sft")  # DPO's reference: the SFT model
            last_key = aligned.content_key
            specs.append(last)
        quantized = None
        if cfg.quantize.method != "none":
            quantized = clock.run("quantize", _stage("quantize", cfg), cfg, ctx, last.base_path, last.adapter_dir, last_key)
            # screened: scored on every row only if it could be registered (tasks/evaluate.py)
            specs.append(ModelSpec(label="quantized", base_path=quantized.merged_dir, quantized_dir=quantized.model_dir,
                                   quantized_from=last.label, screen=True))
        scores = clock.run("evaluate", _stage("evaluate", cfg), cfg, ctx, data.eval_path, data.digests["eval"], specs,
                           data.preference_eval_path, data.train_path)
        artifacts.publish_evaluation(cfg.name, scores)  # the table on the flow-run page
        registered = choice = None
        if cfg.register_.enabled:
            # the registered artifact: the trained model or its quantized form, whichever serves better here
            candidates = [last] + [s for s in specs if s.label == "quantized"]  # never base
            choice = serving_choice.choose([s.label for s in candidates], scores.metrics, cfg.register_.serve,
                                           scores.shared)  # quality on the rows both were scored on
            final = next(s for s in candidates if s.label == choice.winner)
            print(f"serving choice: {choice.winner}: {choice.reason}")
            lineage.update({f"data_digest.{k}": v for k, v in data.digests.items()})
            lineage.update({"run_id.parent": parent, "run_id.sft": tuned.mlflow_run_id,
                            "run_id.evaluate": scores.mlflow_run_id, "sft.content_key": tuned.content_key})
            if aligned:
                lineage.update({"run_id.align": aligned.mlflow_run_id, "align.content_key": aligned.content_key,
                                "align.method": aligned.method})
            if quantized:
                lineage["run_id.quantize"] = quantized.mlflow_run_id
            registered = clock.run("register", stages.register, cfg, ctx, final.base_path, final.adapter_dir,
                                   final.quantized_dir, scores.metrics, final.label, lineage, choice)
        artifacts.publish_promotion(cfg.name, registered, choice)
        cached_stages = [s["stage"] for s in clock.stages if s["status"] == "cached"]
        tracking.client_for(uri).set_tag(parent, "alignpipe.cached_stages", ",".join(cached_stages) or "none")
    summary = {
        "pipeline": cfg.name,
        "flow_run_id": run_id,
        "mlflow_run_id": parent,
        "stages": clock.stages,
        "metrics": scores.metrics,
        "table": Path(scores.table_path).read_text(),
        "aligned": aligned.model_dump() if aligned else None,
        "quantized": quantized.model_dump() if quantized else None,
        "cascade": scores.cascade,
        "serving_choice": choice.model_dump() if choice else None,
        "registered": registered.model_dump() if registered else None,
        "promotion": registered.decision if registered else "not registered (register.enabled is false)",
        "mlflow_ui": f"mlflow ui --backend-store-uri {secrets.redact_uri(uri)} --host 127.0.0.1 --port 5000",
    }
    save_summary(cfg.workdir, summary)
    return summary
