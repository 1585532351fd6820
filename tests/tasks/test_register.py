"""register stage: a real SQLite MLflow store and the tiny model (merged once per module), no mocks."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed

from alignpipe import models, registry, tracking
from alignpipe.errors import AlignpipeError
from alignpipe.merge import merge_adapter
from alignpipe.runs import RunContext
from alignpipe.flows.stages import register, retry_unless_user_error
from alignpipe.tasks.register import _artifact, register_model
from testlib import REPO, model_variant, registry_version

LINEAGE = {"config_digest": "c0ffee", "git_commit": "abc1234", "flow_run_id": "flow-1",
           "data_digest.sft": "d1" * 32, "data_digest.eval": "d2" * 32, "run_id.sft": "r-sft",
           "run_id.evaluate": "r-eval"}
BASE = {"exact_match": 0.0, "json_validity": 0.2, "field_accuracy": 0.1, "perplexity": 40.0}


def evaluation(em: float, jv: float = 1.0) -> dict[str, dict[str, float]]:
    """Synthetic evaluation metrics, label -> metric -> value, for base and the registered `sft` artifact."""
    return {"base": BASE, "sft": {"exact_match": em, "json_validity": jv, "field_accuracy": em, "perplexity": 3.0}}


# Runs in a fresh interpreter without PYTHONPATH: loads the champion by alias, as a serving host would, and
# refuses any import of alignpipe (the model must not need it).
FRESH_LOAD = textwrap.dedent("""
    import importlib.abc, json, sys

    class NoAlignpipe(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "alignpipe":
                raise ImportError("the served model imported alignpipe")

    sys.meta_path.insert(0, NoAlignpipe())
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model("models:/{name}@champion")
    out = model.predict(["Ana Lima is 34 and lives in Porto."])
    short = model.predict(["Ana Lima is 34.", "Bo is 5."], params={{"max_new_tokens": 2}})
    print(json.dumps({{"out": out, "short": short, "alignpipe": "alignpipe" in sys.modules}}))
""")

# Runs one registration in its own process (for the concurrency test).
REGISTER_ONE = textwrap.dedent("""
    import json, sys
    from alignpipe.config import PipelineConfig
    from alignpipe.runs import RunContext
    from alignpipe.tasks.register import register_model

    a = json.load(open(sys.argv[1]))
    out = register_model(PipelineConfig.model_validate(a["cfg"]), RunContext.model_validate(a["ctx"]),
                         a["model"], None, None, a["metrics"], "sft", {})
    print("RESULT " + out.model_dump_json())
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


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory) -> str:
    return _adapter(tiny_model, tmp_path_factory.mktemp("adapter") / "lora")


@pytest.fixture(scope="module")
def merged(tiny_model, adapter, tmp_path_factory) -> str:
    """The tiny model with a LoRA adapter merged in: built once, copied into variants where digests must differ."""
    return merge_adapter(tiny_model, adapter, str(tmp_path_factory.mktemp("merged") / "model"))


@pytest.fixture
def ctx(smoke_cfg, tiny_model) -> RunContext:
    uri = tracking.tracking_uri(smoke_cfg)
    exp = tracking.ensure_experiment(smoke_cfg)
    parent = tracking.start_run(uri, exp, "parent", {})
    return RunContext(run_id="flow-1", pipeline=smoke_cfg.name, tracking_uri=uri, experiment_id=exp,
                      parent_run_id=parent, workdir=smoke_cfg.workdir, base_model=tiny_model)


def _model_file(client, mv, path: str) -> str:
    """Text of one file of the version's logged model (MLflow 3 keeps it beside the run, not in it)."""
    import mlflow

    location = client.get_logged_model(registry.logged_model_id(mv)).artifact_location
    return open(mlflow.artifacts.download_artifacts(artifact_uri=f"{location}/{path}")).read()


def _alias(client, name, alias):
    mv = registry.alias_version(client, name, alias)
    return None if mv is None else str(mv.version)


def test_register_merges_tags_lineage_attaches_card_and_serves_in_a_clean_env(
        smoke_cfg, ctx, tiny_model, adapter, ray_local, tmp_path, capsys):
    out = register_model(smoke_cfg, ctx, tiny_model, adapter, None, evaluation(0.5), "sft", LINEAGE)

    name = smoke_cfg.tracking.registered_model
    assert (out.model_name, out.version, out.alias, out.candidate) == (name, "1", "challenger", "sft")
    assert out.promoted and not out.reused and "promoted to @champion" in out.decision
    assert f"registered {name} version 1 as @challenger" in capsys.readouterr().out

    client = tracking.client_for(ctx.tracking_uri)
    mv = client.get_model_version_by_alias(name, "champion")
    assert str(mv.version) == "1" and mv.status == "READY" and mv.run_id == out.mlflow_run_id
    assert _alias(client, name, "challenger") == "1"
    for key, value in LINEAGE.items():
        assert mv.tags[key] == value
    # The evaluation is the logged model's metrics (numbers the UI's Models tab charts), not string tags.
    numbers = client.get_logged_model(registry.logged_model_id(mv)).metrics
    assert {m.key: m.value for m in numbers} == {**evaluation(0.5)["sft"], **{f"base.{k}": v for k, v in BASE.items()}}
    assert all(type(m.value) is float for m in numbers)
    assert registry.version_metrics(client, mv) == (evaluation(0.5)["sft"], BASE)
    assert not [k for k in mv.tags if k.startswith((registry.METRIC_TAG, registry.BASE_TAG)) or k == "evaluation"]
    assert len(mv.tags["weights_digest"]) == 64 and len(mv.tags["lock_digest"]) == 64
    assert mv.tags["seed.sft"] == str(smoke_cfg.sft.seed) and mv.tags["candidate"] == "sft"
    assert mv.tags["promotion.decision"] == "promoted" and mv.tags["promotion.against"] == "base (no champion yet)"

    # The model card is the version's description and an artifact of both the run and the logged model.
    card = client.download_artifacts(out.mlflow_run_id, "model_card.md", str(tmp_path))
    text = open(card).read()
    assert mv.description == text and mv.tags["model_card"] == f"runs:/{out.mlflow_run_id}/model_card.md"
    for needle in ("## Intended use", "## Data", "## Training recipe", "## Limitations", "| exact_match | 0.5 | 0 |",
                   "json_validity", "perplexity (lower is better)", "champion (none yet)", "r-sft"):
        assert needle in text, needle
    logged = client.get_logged_model(registry.logged_model_id(mv))
    assert "model_card.md" in {os.path.basename(a.path) for a in client.list_logged_model_artifacts(
        logged.model_id, "artifacts")}

    run = client.get_run(out.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == ctx.parent_run_id
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"smoke-sft", "smoke-eval"}
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the fluent run's global URI was put back

    lines = _model_file(client, mv, "requirements.txt").split()
    assert all("==" in r for r in lines) and not any(r.startswith("torchvision") for r in lines)

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MLFLOW_TRACKING_URI"] = ctx.tracking_uri
    proc = subprocess.run([sys.executable, "-c", FRESH_LOAD.format(name=name)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert isinstance(result["out"], list) and len(result["out"]) == 1 and isinstance(result["out"][0], str)
    assert len(result["short"]) == 2
    assert result["alignpipe"] is False


def test_worse_run_stays_challenger_better_becomes_champion_and_rollback(smoke_cfg, ctx, merged, tmp_path):
    name, client = smoke_cfg.tracking.registered_model, tracking.client_for(ctx.tracking_uri)
    first = register_model(smoke_cfg, ctx, merged, None, None, evaluation(0.5), "sft", LINEAGE)
    worse = register_model(smoke_cfg, ctx, model_variant(merged, tmp_path / "worse", 1), None, None,
                           evaluation(0.3, jv=0.9), "sft", LINEAGE)
    assert first.promoted and not worse.promoted and "stays @challenger" in worse.decision
    tags = client.get_model_version(name, worse.version).tags
    assert "exact_match >= champion + 0.005: exact_match 0.3 >= 0.505 (champion v1 0.5 + 0.005)" in tags["gates.failed"]
    assert "json_validity >= 0.99: json_validity 0.9 >= 0.99" in tags["gates.failed"]
    assert (_alias(client, name, "champion"), _alias(client, name, "challenger")) == ("1", worse.version)
    card = client.get_model_version(name, worse.version).description
    assert "champion v1" in card and "-0.2" in card  # metrics vs the champion at registration time

    better = register_model(smoke_cfg, ctx, model_variant(merged, tmp_path / "better", 2), None, None,
                            evaluation(0.7), "sft", LINEAGE)
    assert better.promoted
    assert (_alias(client, name, "champion"), _alias(client, name, "previous")) == (better.version, "1")

    registry.rollback(client, ctx.tracking_uri, name, "test")
    assert _alias(client, name, "champion") == "1"


def test_the_first_version_must_beat_the_better_base_the_prompted_one(smoke_cfg, ctx, merged):
    metrics = {**evaluation(0.5), "prompted_base": {**BASE, "exact_match": 0.6}}  # told the task, base does better
    first = register_model(smoke_cfg, ctx, merged, None, None, metrics, "sft", LINEAGE)
    assert not first.promoted and "exact_match > base: exact_match 0.5 > 0.6 (base 0.6)" in first.decision, \
        first.decision
    client = tracking.client_for(ctx.tracking_uri)
    version = client.get_model_version(smoke_cfg.tracking.registered_model, first.version)
    assert "| metric | sft | prompted_base |" in version.description  # the card compares with that base


def test_same_weights_point_to_the_existing_version(smoke_cfg, ctx, merged):
    name, client = smoke_cfg.tracking.registered_model, tracking.client_for(ctx.tracking_uri)
    first = register_model(smoke_cfg, ctx, merged, None, None, evaluation(0.5), "sft", LINEAGE)
    again = register_model(smoke_cfg, ctx, merged, None, None, evaluation(0.5), "sft", LINEAGE)
    assert (again.version, again.reused, again.promoted) == (first.version, True, True)
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    assert client.get_run(again.mlflow_run_id).data.tags["duplicate_of"] == f"models:/{name}/{first.version}"
    assert registry.version_metrics(client, client.get_model_version(name, first.version))[0] == \
        evaluation(0.5)["sft"]


def test_the_serving_choice_is_recorded_on_the_version_and_in_the_run(smoke_cfg, ctx, merged, tmp_path):
    from alignpipe.config.register import ServeConfig
    from alignpipe.serving_choice import choose

    metrics = evaluation(0.5)
    metrics["sft"].update(latency_p95_ms=6300.0, size_mb=540.0)
    metrics["quantized"] = {**metrics["sft"], "latency_p95_ms": 28200.0, "size_mb": 170.0}  # int8 decodes slower
    choice = choose(["sft", "quantized"], metrics, ServeConfig())  # the shipped default: latency_p95_ms
    assert choice.winner == "sft"
    out = register_model(smoke_cfg, ctx, merged, None, None, metrics, choice.winner, LINEAGE, choice)

    client = tracking.client_for(ctx.tracking_uri)
    mv = client.get_model_version(out.model_name, out.version)
    recorded = json.loads(mv.tags["serving_choice"])
    assert recorded["winner"] == "sft" == mv.tags["candidate"]
    assert [(c["label"], c["eligible"], c["figures"]["latency_p95_ms"]) for c in recorded["candidates"]] == \
        [("sft", True, 6300.0), ("quantized", True, 28200.0)]
    table = Path(client.download_artifacts(out.mlflow_run_id, "serving_choice.md", str(tmp_path))).read_text()
    assert table == choice.markdown() and "| quantized | 28200 | 170 |" in table
    assert client.get_run(out.mlflow_run_id).data.tags["serving_choice"] == f"sft: {choice.reason}"


def test_a_champion_registered_before_logged_model_metrics_still_gates_and_fills_the_card(smoke_cfg, ctx, merged,
                                                                                          tmp_path):
    name, client = smoke_cfg.tracking.registered_model, tracking.client_for(ctx.tracking_uri)
    old = registry_version(client, name, evaluation(0.5)["sft"], BASE, tmp_path / "old", legacy=True)
    client.set_registered_model_alias(name, "champion", old)
    assert registry.version_metrics(client, client.get_model_version(name, old)) == (evaluation(0.5)["sft"], BASE)

    worse = register_model(smoke_cfg, ctx, merged, None, None, evaluation(0.3), "sft", LINEAGE)
    assert not worse.promoted and f"exact_match 0.3 >= 0.505 (champion v{old} 0.5 + 0.005)" in worse.decision
    card = client.get_model_version(name, worse.version).description
    assert f"champion v{old}" in card and "-0.2" in card  # the old champion's tag metrics in the card


def test_concurrent_registrations_get_distinct_versions(smoke_cfg, ctx, merged, tmp_path):
    procs = []
    for i in range(2):
        args = tmp_path / f"args{i}.json"
        args.write_text(json.dumps({"cfg": smoke_cfg.model_dump(mode="json", by_alias=True),
                                    "ctx": ctx.model_dump(), "metrics": evaluation(0.5),
                                    "model": model_variant(merged, tmp_path / f"m{i}", 10 + i)}))
        procs.append(subprocess.Popen([sys.executable, "-c", REGISTER_ONE, str(args)], cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-3000:]
        outs.append(json.loads(stdout.split("RESULT ", 1)[1]))
    assert sorted(o["version"] for o in outs) == ["1", "2"]
    # Same metrics: whichever came second faced the first as champion and could not beat it by the margin.
    assert sorted(o["promoted"] for o in outs) == [False, True]
    client = tracking.client_for(ctx.tracking_uri)
    champion = _alias(client, smoke_cfg.tracking.registered_model, "champion")
    assert champion == next(o["version"] for o in outs if o["promoted"])


def test_adapter_only_registers_adapter_with_pinned_base(smoke_cfg, ctx, tiny_model, adapter, tmp_path):
    import mlflow

    smoke_cfg.register_.adapter_only = True
    out = register_model(smoke_cfg, ctx, tiny_model, adapter, None, evaluation(0.5), "sft", LINEAGE)
    client = tracking.client_for(ctx.tracking_uri)
    mv = client.get_model_version(out.model_name, out.version)
    assert out.model_dir == adapter and "PEFT adapter only" in mv.description
    assert registry.logged_model_id(mv) and registry.version_metrics(client, mv) == (evaluation(0.5)["sft"], BASE)
    assert "peft==" in _model_file(client, mv, "requirements.txt")
    mlflow.set_tracking_uri(ctx.tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(f"models:/{out.model_name}/{out.version}")
    finally:
        mlflow.set_tracking_uri(None)
    assert model.model_config["base_model"] == tiny_model and len(model.model_config["base_model_digest"]) == 64
    assert len(model.predict(["Bo is 5."], params={"max_new_tokens": 2})) == 1


def test_quantized_folder_pins_torchao_only_when_its_config_needs_it(smoke_cfg, ctx, merged, tmp_path):
    plain = _artifact(smoke_cfg, ctx, "k", "unused", None, merged)
    assert plain.model_dir == merged and plain.requirements_extra == []
    quant = model_variant(merged, tmp_path / "q", 3)
    config = json.loads(open(f"{quant}/config.json").read())
    config["quantization_config"] = {"quant_method": "torchao", "quant_type": "int8_weight_only"}
    open(f"{quant}/config.json", "w").write(json.dumps(config))
    try:
        art = _artifact(smoke_cfg, ctx, "k", "unused", None, quant)
    except AlignpipeError as exc:  # torchao not installed here: the message says what to do
        assert "pip install torchao" in str(exc)
    else:
        assert art.requirements_extra[0].startswith("torchao==")
        assert art.model_config_extra == {} and art.code_paths == []  # weight-only int8: nothing to fuse

    # int8 weights + dynamic int8 activations: served on CPU through the fused kernel evaluate scored it with
    config["quantization_config"]["quant_type"] = {"default": {"_type": "Int8DynamicActivationInt8WeightConfig"}}
    open(f"{quant}/config.json", "w").write(json.dumps(config))
    art = _artifact(smoke_cfg, ctx, "k", "unused", None, quant)
    assert art.model_config_extra == {"int8_cpu_kernel": "auto", "int8_per_token_modules": ["down_proj", "o_proj"],
                                      "kernels": "auto"}
    assert [Path(p).name for p in art.code_paths] == ["int8_cpu.py"]
    smoke_cfg.quantize.cpu_kernel = "torchao"
    assert _artifact(smoke_cfg, ctx, "k", "unused", None, quant).code_paths == []


def test_bitsandbytes_folder_pins_bitsandbytes_and_accelerate(smoke_cfg, ctx, merged, tmp_path, monkeypatch):
    from importlib.metadata import version

    from transformers import BitsAndBytesConfig

    quant = model_variant(merged, tmp_path / "q", 4)
    config = json.loads(Path(quant, "config.json").read_text())
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    config["quantization_config"] = json.loads(nf4.to_json_string(use_diff=False))  # as save_pretrained writes it
    Path(quant, "config.json").write_text(json.dumps(config))
    if importlib.util.find_spec("bitsandbytes") is None:
        # not installed here (a CPU machine): registering says what to install instead of logging an unloadable model
        with pytest.raises(AlignpipeError, match="needs bitsandbytes.*pip install bitsandbytes"):
            _artifact(smoke_cfg, ctx, "k", "unused", None, quant)
        # the pin itself: an installed distribution's metadata (what `_pin` reads) stands in for the package
        dist = tmp_path / "site" / "bitsandbytes-0.50.2.dist-info"
        dist.mkdir(parents=True)
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: bitsandbytes\nVersion: 0.50.2\n")
        monkeypatch.syspath_prepend(str(dist.parent))
    art = _artifact(smoke_cfg, ctx, "k", "unused", None, quant)
    # accelerate: transformers loads bitsandbytes layers through it, and does not require it itself
    assert art.requirements_extra == [f"bitsandbytes=={version('bitsandbytes')}", f"accelerate=={version('accelerate')}"]
    assert art.model_config_extra == {} and art.code_paths == []  # no int8 CPU kernel for a bitsandbytes model
    assert art.description == "Quantized weights (bitsandbytes)."


def test_unmergeable_adapter_fails_the_stage_run_and_registers_nothing(smoke_cfg, ctx, tiny_model, tmp_path, ray_local):
    adapter = _adapter(tiny_model, tmp_path / "prompt", method="prompt_tuning")
    with pytest.raises(AlignpipeError, match="cannot merge"):
        register_model(smoke_cfg, ctx, tiny_model, adapter, None, evaluation(0.5), "sft", LINEAGE)
    client = tracking.client_for(ctx.tracking_uri)
    [run] = client.search_runs([ctx.experiment_id], "tags.mlflow.runName = 'register'")
    assert run.info.status == "FAILED"
    assert client.search_model_versions(f"name = '{smoke_cfg.tracking.registered_model}'") == []


def test_retries_only_errors_a_retry_can_fix():
    assert inspect.isfunction(register.retry_condition_fn)  # Prefect calls only plain functions
    assert register.retries == 2
    assert register.cache_policy is NO_CACHE  # promotion must always see the registry as it is now
    assert register.retry_condition_fn(register, None, Failed(data=ConnectionError("502 Bad Gateway"))) is True
    assert retry_unless_user_error(register, None, Failed(data=AlignpipeError("cannot merge"))) is False
