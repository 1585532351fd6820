"""Config schema: every shipped pipeline validates; user mistakes give messages that say what to fix."""

import textwrap

import pytest
from testlib import PIPELINES

from alignpipe.config import load_all, load_pipeline, preflight
from alignpipe.errors import ConfigError


def write(tmp_path, body: str):
    p = tmp_path / "pipelines.yaml"
    p.write_text(textwrap.dedent(body))
    return p


BASE = """
pipelines:
  p:
    data:
      sft: {path: train.jsonl}
      eval: {path: eval.jsonl}
"""


def test_every_shipped_pipeline_validates():
    results = load_all(PIPELINES, env={})
    assert {"demo", "smoke"} <= set(results)
    for name, cfg in results.items():
        assert not isinstance(cfg, ConfigError), f"{name}: {cfg}"
        assert preflight(cfg) == [], name


def test_defaults_merge_and_pipeline_wins():
    demo = load_pipeline(PIPELINES, "demo", env={})
    smoke = load_pipeline(PIPELINES, "smoke", env={})
    assert demo.model.name == "smollm2-135m-instruct"
    assert smoke.model.name == "tiny-random-llama"
    assert smoke.sft.peft.r == 16 and (demo.sft.peft.r, demo.sft.peft.alpha) == (32, 64)  # the pipeline wins...
    assert demo.sft.peft.method == "lora" and demo.sft.peft.target_modules == smoke.sft.peft.target_modules  # ...key
    # by key: the rest of the section still comes from the defaults
    assert smoke.sft.max_steps == 6 and (demo.sft.max_steps, demo.sft.epochs) == (-1, 1.0)  # demo: one epoch
    assert demo.data.sft.path.endswith("data/demo/sft_train.jsonl")  # resolved against the file's folder


def test_unknown_key_suggests_the_closest(tmp_path):
    p = write(tmp_path, BASE + "    sft: {lerning_rate: 0.1}\n")
    with pytest.raises(ConfigError) as exc:
        load_pipeline(p, "p")
    msg = str(exc.value)
    assert "pipelines.p.sft.lerning_rate" in msg and "did you mean 'learning_rate'" in msg


def test_unknown_nested_key_and_section(tmp_path):
    p = write(tmp_path, BASE + "    sft: {peft: {rank: 8}}\n    tracking2: {}\n")
    msg = str(pytest.raises(ConfigError, load_pipeline, p, "p").value)
    assert "pipelines.p.sft.peft.rank: unknown key 'rank'" in msg
    assert "pipelines.p.tracking2: unknown key" in msg and "'tracking'" in msg


def test_wrong_type_names_path_and_value(tmp_path):
    p = write(tmp_path, BASE + "    sft: {batch_size: lots}\n")
    msg = str(pytest.raises(ConfigError, load_pipeline, p, "p").value)
    assert "pipelines.p.sft.batch_size: got 'lots'" in msg and "integer" in msg


def test_missing_required_section(tmp_path):
    p = write(tmp_path, "pipelines:\n  p:\n    model: {name: x}\n")
    msg = str(pytest.raises(ConfigError, load_pipeline, p, "p").value)
    assert "pipelines.p.data: required key is missing" in msg


def test_missing_model_folder_is_reported_by_preflight(tmp_path):
    (tmp_path / "train.jsonl").write_text("{}\n")
    (tmp_path / "eval.jsonl").write_text("{}\n")
    p = write(tmp_path, BASE + "    model: {name: ./no-such-model}\n")
    problems = preflight(load_pipeline(p, "p"))
    assert len(problems) == 1 and "model.name" in problems[0] and "not a folder" in problems[0]


def test_missing_data_file_is_reported(tmp_path):
    p = write(tmp_path, BASE)
    problems = preflight(load_pipeline(p, "p"))
    assert any("data.sft.path" in x and "does not exist" in x for x in problems)


def test_precedence_set_over_env_over_file(tmp_path):
    p = write(tmp_path, BASE + "    tracking: {mlflow_uri: 'http://file:5000'}\n")
    assert load_pipeline(p, "p").tracking.mlflow_uri == "http://file:5000"
    env = {"MLFLOW_TRACKING_URI": "http://env:5000"}
    assert load_pipeline(p, "p", env=env).tracking.mlflow_uri == "http://env:5000"
    cfg = load_pipeline(p, "p", ["tracking.mlflow_uri=http://cli:5000", "sft.learning_rate=1e-4"], env=env)
    assert cfg.tracking.mlflow_uri == "http://cli:5000" and cfg.sft.learning_rate == 1e-4


def test_storage_path_from_env_under_set(tmp_path):
    p = write(tmp_path, BASE)
    env = {"ALIGNPIPE_STORAGE_PATH": "s3://bucket/pipelines"}  # what `alignpipe env` exports for the local stack
    assert load_pipeline(p, "p", env=env).compute.storage_path == "s3://bucket/pipelines"
    cfg = load_pipeline(p, "p", ["compute.storage_path=/shared/runs"], env=env)
    assert cfg.compute.storage_path == "/shared/runs"


def test_bad_override_syntax(tmp_path):
    p = write(tmp_path, BASE)
    assert "expected section.key=value" in str(pytest.raises(ConfigError, load_pipeline, p, "p", ["sft"]).value)


def test_remote_ray_with_local_sqlite_is_refused(tmp_path):
    p = write(tmp_path, BASE)
    msg = str(pytest.raises(ConfigError, load_pipeline, p, "p", env={"RAY_ADDRESS": "10.0.0.5:6379"}).value)
    assert "workers cannot reach" in msg and "tracking.mlflow_uri" in msg
    ok = load_pipeline(p, "p", env={"RAY_ADDRESS": "10.0.0.5:6379", "MLFLOW_TRACKING_URI": "http://m:5000"})
    assert ok.compute.ray_address == "10.0.0.5:6379"
    assert load_pipeline(p, "p", env={"RAY_ADDRESS": "127.0.0.1:6379"}).compute.ray_address == "127.0.0.1:6379"


def test_qlora_needs_gpu(tmp_path):
    p = write(tmp_path, BASE + "    sft: {quantized_base: nf4}\n")
    assert "needs a GPU" in str(pytest.raises(ConfigError, load_pipeline, p, "p").value)


def test_unknown_pipeline_suggests():
    assert "no pipeline 'smok'" in str(pytest.raises(ConfigError, load_pipeline, PIPELINES, "smok").value)
    assert "did you mean 'smoke'" in str(pytest.raises(ConfigError, load_pipeline, PIPELINES, "smok").value)


def test_align_defaults_to_dpo_only_where_there_are_pairs(tmp_path):
    assert load_pipeline(write(tmp_path, BASE), "p").align.method == "none"
    with_pairs = BASE + "      preference: {path: pairs.jsonl, format: hh_rlhf}\n"
    cfg = load_pipeline(write(tmp_path, with_pairs), "p")
    assert (cfg.align.method, cfg.data.preference.format) == ("dpo", "hh_rlhf")
    msg = str(pytest.raises(ConfigError, load_pipeline, write(tmp_path, BASE + "    align: {method: kto}\n"), "p").value)
    assert "align.method='kto' needs preference pairs" in msg and "data.preference.path" in msg
    bad = with_pairs + "    align: {method: ppo}\n"
    assert "pipelines.p.align.method" in str(pytest.raises(ConfigError, load_pipeline, write(tmp_path, bad), "p").value)
    demo = load_pipeline(PIPELINES, "demo")
    assert demo.align.method == "dpo" and demo.data.preference_eval is not None


def test_kernels_switch_and_int8_cpu_kernel_default_to_auto(tmp_path):
    cfg = load_pipeline(write(tmp_path, BASE), "p")
    assert (cfg.compute.kernels, cfg.quantize.cpu_kernel) == ("auto", "auto")
    assert load_pipeline(PIPELINES, "demo").compute.kernels == "auto"
    # the CPU runtime evaluate and the registered model get carries the switch, for the host to resolve
    # a bare `off` is YAML 1.1's false: still the setting, in the file and on the command line
    off = load_pipeline(write(tmp_path, BASE + "    compute: {kernels: off}\n    quantize: {cpu_kernel: torchao}\n"),
                        "p")
    assert load_pipeline(PIPELINES, "demo", overrides=["compute.kernels=off"], env={}).compute.kernels == "off"
    assert off.quantize.cpu_runtime(off.compute.kernels) == {
        "int8_cpu_kernel": "torchao", "int8_per_token_modules": ["down_proj", "o_proj"], "kernels": "off"}
    for bad in ("    compute: {kernels: on}\n", "    quantize: {cpu_kernel: onednn}\n"):
        msg = str(pytest.raises(ConfigError, load_pipeline, write(tmp_path, BASE + bad), "p").value)
        assert "pipelines.p.compute.kernels" in msg or "pipelines.p.quantize.cpu_kernel" in msg


def test_a_pipeline_is_checked_once_per_process_for_the_same_file_and_overrides(tmp_path, monkeypatch):
    """`alignpipe run` checks the config; the flow it then runs gets that result instead of checking again."""
    from alignpipe.config import load_checked, loader

    (tmp_path / "train.jsonl").write_text("{}\n")
    (tmp_path / "eval.jsonl").write_text("{}\n")
    path = write(tmp_path, BASE)
    first = load_checked(path, "p", {"sft.max_steps": 3}, env={})
    calls = []
    real = loader.load_pipeline
    monkeypatch.setattr(loader, "load_pipeline", lambda *a, **k: calls.append(a) or real(*a, **k))
    again = load_checked(path, "p", {"sft.max_steps": 3}, env={})
    assert calls == [] and again == first and again is not first  # a copy: a caller's edit stays its own
    load_checked(path, "p", {"sft.max_steps": 4}, env={})          # other overrides: checked again
    path.write_text(path.read_text() + "\n# edited\n")
    load_checked(path, "p", {"sft.max_steps": 3}, env={})          # the file changed: checked again
    assert len(calls) == 2
    with pytest.raises(ConfigError, match="does not exist"):       # preflight's problems are raised
        load_checked(path, "p", {"data.sft.path": str(tmp_path / "missing.jsonl")}, env={})
