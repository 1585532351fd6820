"""register stage: a real SQLite MLflow store, a real (untrained) LoRA adapter on the tiny model, no mocks."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from prefect.states import Failed

from alignpipe import models, tracking
from alignpipe.errors import AlignpipeError
from alignpipe.runs import RunContext
from tasks.register import _retry_unless_user_error, register, register_model

LINEAGE = {"config_digest": "c0ffee", "git_commit": "abc1234", "flow_run_id": "flow-1",
           "data_digest.sft": "d1", "data_digest.eval": "d2", "run_id.sft": "r-sft", "run_id.evaluate": "r-eval"}
METRICS = {"json_valid": 0.75, "exact_match": 0.5, "perplexity": 12.25}

# Runs in a fresh interpreter: loads the registered model by alias, as a serving host would, and refuses any
# import of alignpipe (the model must not need it).
FRESH_LOAD = textwrap.dedent("""
    import importlib.abc, json, sys

    class NoAlignpipe(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "alignpipe":
                raise ImportError("the served model imported alignpipe")

    sys.meta_path.insert(0, NoAlignpipe())
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model("models:/{name}@challenger")
    out = model.predict(["Ana Lima is 34 and lives in Porto."])
    short = model.predict(["Ana Lima is 34.", "Bo is 5."], params={{"max_new_tokens": 2}})
    print(json.dumps({{"out": out, "short": short, "alignpipe": "alignpipe" in sys.modules}}))
""")


def _adapter(tiny_model: str, out, method: str = "lora") -> str:
    from peft import LoraConfig, PromptTuningConfig, TaskType, get_peft_model

    if method == "lora":
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type=TaskType.CAUSAL_LM)
    else:
        cfg = PromptTuningConfig(num_virtual_tokens=4, task_type=TaskType.CAUSAL_LM)
    torch.manual_seed(1)
    model = get_peft_model(models.load_model(tiny_model), cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(out)
    models.load_tokenizer(tiny_model).save_pretrained(out)
    return str(out)


@pytest.fixture
def ctx(smoke_cfg, tiny_model) -> RunContext:
    uri = tracking.tracking_uri(smoke_cfg)
    exp = tracking.ensure_experiment(smoke_cfg)
    parent = tracking.start_run(uri, exp, "parent", {})
    return RunContext(run_id="flow-1", pipeline=smoke_cfg.name, tracking_uri=uri, experiment_id=exp,
                      parent_run_id=parent, workdir=smoke_cfg.workdir, base_model=tiny_model)


def test_register_tags_aliases_and_serves_in_a_fresh_process(smoke_cfg, ctx, tiny_model, tmp_path, capsys):
    out = register_model(smoke_cfg, ctx, _adapter(tiny_model, tmp_path / "adapter"), LINEAGE, METRICS)

    name = smoke_cfg.tracking.registered_model
    assert (out.model_name, out.version, out.alias) == (name, "1", "challenger")
    assert out.model_uri == f"models:/{name}/1"
    assert f"registered {name} version 1 as @challenger (models:/{name}@challenger)" in capsys.readouterr().out

    client = tracking.client_for(ctx.tracking_uri)
    mv = client.get_model_version_by_alias(name, "challenger")
    assert str(mv.version) == "1" and mv.status == "READY" and mv.run_id == out.mlflow_run_id
    for key, value in LINEAGE.items():
        assert mv.tags[key] == value
    assert {k: float(mv.tags[f"metrics.{k}"]) for k in METRICS} == METRICS
    assert len(mv.tags["weights_digest"]) == 64
    assert smoke_cfg.name in mv.description and ctx.base_model in mv.description

    run = client.get_run(out.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "register"
    assert run.data.tags["mlflow.parentRunId"] == ctx.parent_run_id
    assert run.data.tags["registered_version"] == "1" and run.data.tags["registered_alias"] == "challenger"
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the fluent run's global URI was put back

    env = {**os.environ, "MLFLOW_TRACKING_URI": ctx.tracking_uri}
    proc = subprocess.run([sys.executable, "-c", FRESH_LOAD.format(name=name)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert isinstance(result["out"], list) and len(result["out"]) == 1 and isinstance(result["out"][0], str)
    assert len(result["short"]) == 2
    assert result["alignpipe"] is False


def test_registering_twice_makes_two_versions(smoke_cfg, ctx, tiny_model, tmp_path):
    adapter = _adapter(tiny_model, tmp_path / "adapter")
    first = register_model(smoke_cfg, ctx, adapter, LINEAGE, METRICS)
    second = register_model(smoke_cfg, ctx, adapter, LINEAGE, METRICS)
    assert (first.version, second.version) == ("1", "2")
    assert first.mlflow_run_id != second.mlflow_run_id
    client = tracking.client_for(ctx.tracking_uri)
    assert str(client.get_model_version_by_alias(smoke_cfg.tracking.registered_model, "challenger").version) == "2"


def test_unmergeable_adapter_fails_the_stage_run_and_registers_nothing(smoke_cfg, ctx, tiny_model, tmp_path):
    adapter = _adapter(tiny_model, tmp_path / "prompt", method="prompt_tuning")
    with pytest.raises(AlignpipeError, match="cannot merge"):
        register_model(smoke_cfg, ctx, adapter, LINEAGE, METRICS)
    client = tracking.client_for(ctx.tracking_uri)
    [run] = client.search_runs([ctx.experiment_id], "tags.mlflow.runName = 'register'")
    assert run.info.status == "FAILED"
    assert client.search_model_versions(f"name = '{smoke_cfg.tracking.registered_model}'") == []


def test_retries_only_errors_a_retry_can_fix():
    assert inspect.isfunction(register.retry_condition_fn)  # Prefect calls only plain functions
    assert register.retries == 2
    assert register.retry_condition_fn(register, None, Failed(data=ConnectionError("502 Bad Gateway"))) is True
    assert _retry_unless_user_error(register, None, Failed(data=AlignpipeError("cannot merge"))) is False
