"""The bad-config corpus: `alignpipe run` refuses each malformed pipeline with one message and exit 1, before
Prefect, Ray or MLflow start.

The files live in tests/corpus/configs/ (data paths point at tests/corpus/data/). Each case runs the real CLI
in-process (typer's CliRunner); one also runs it as a subprocess, to check the exit code and stderr for real.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from alignpipe.cli.main import app
from testlib import REPO

CONFIGS = REPO / "tests" / "corpus" / "configs"
runner = CliRunner()

# id: (config file, pipeline, extra --set overrides, distinctive substrings of the message)
CASES = {
    "unknown_key": ("unknown_key.yaml", "p", [], ["pipelines.p.sft.lerning_rate", "did you mean 'learning_rate'"]),
    "wrong_type": ("wrong_type.yaml", "p", [], ["pipelines.p.sft.epochs: got 'many'", "valid number"]),
    "negative_learning_rate": ("negative_learning_rate.yaml", "p", [],
                               ["pipelines.p.sft.learning_rate: got -0.001", "greater than 0"]),
    "zero_batch_size": ("zero_batch_size.yaml", "p", [], ["pipelines.p.sft.batch_size: got 0"]),
    "missing_model_folder": ("missing_model_folder.yaml", "p", [], ["model.name", "my-finetune' is not a folder"]),
    "unknown_pipeline": ("valid.yaml", "q", [], ["no pipeline 'q' in valid.yaml", "pipelines: p"]),
    "yaml_syntax_error": ("yaml_syntax_error.yaml", "p", [], ["not valid YAML", "line 5"]),
    "unknown_top_level_key": ("unknown_top_level_key.yaml", "p", [], ["did you mean 'defaults'"]),
    "duplicate_key": ("duplicate_key.yaml", "p", [], ["duplicate_key.yaml:5: key 'sft' appears twice",
                                                      "first on line 4"]),
    "invalid_gate": ("invalid_gate.yaml", "p", [], ["not a gate: 'exact_match >> 0.5'", "<op> one of >="]),
    "align_without_pairs": ("align_without_pairs.yaml", "p", [], ["align.method='dpo' needs preference pairs"]),
    "qlora_without_gpu": ("qlora_without_gpu.yaml", "p", [], ["(QLoRA) needs a GPU"]),
    "remote_ray_local_sqlite": ("remote_ray_local_sqlite.yaml", "p", [], ["Ray workers cannot reach"]),
    "bitsandbytes_on_cpu": ("bitsandbytes_on_cpu.yaml", "p", [], ["'bnb_int8' (bitsandbytes) needs a CUDA GPU"]),
    "data_path_is_folder": ("data_path_is_folder.yaml", "p", [], ["data.sft.path", "is a folder, not a file"]),
    "data_path_missing": ("data_path_missing.yaml", "p", [], ["data.sft.path", "train.jsonl' does not exist"]),
    "workdir_is_a_file": ("workdir_is_a_file.yaml", "p", [], ["pipelines.p.workdir", "is a file"]),
    "target_modules_wrong_type": ("target_modules_wrong_type.yaml", "p", [],
                                  ["pipelines.p.sft.peft.target_modules: got 5: Input should be a valid list"]),
    "set_through_a_value": ("valid.yaml", "p", ["sft.learning_rate.warmup=1"],
                            ["--set sft.learning_rate.warmup: sft.learning_rate is a value, not a section"]),
    "set_value_not_yaml": ("valid.yaml", "p", ["sft.peft.target_modules=[q_proj, v_proj"],
                           ["--set 'sft.peft.target_modules=[q_proj, v_proj'", "not valid YAML", "quote it"]),
    "set_without_equals": ("valid.yaml", "p", ["sft.learning_rate"], ["expected section.key=value"]),
    "set_unknown_key": ("valid.yaml", "p", ["sft.lr=1e-4"], ["pipelines.p.sft.lr: unknown key 'lr'"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_config_exits_before_anything_starts(case, tmp_path):
    config, pipeline, sets, expected = CASES[case]
    work, db = tmp_path / "work", tmp_path / "mlflow.db"
    where = [] if case == "workdir_is_a_file" else ["workdir=" + str(work)]  # that case's point is its workdir
    sets = [*where, f"tracking.mlflow_uri=sqlite:///{db}", *sets]
    args = ["run", pipeline, "--config", str(CONFIGS / config)] + [a for s in sets for a in ("--set", s)]
    result = runner.invoke(app, args, terminal_width=400)

    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # typer.Exit, not an exception escaping the CLI
    output = " ".join(result.output.split())  # Rich wraps long lines; compare with the wrapping undone
    assert output.startswith("error: "), output
    for text in expected:
        assert text in output, output
    assert "Traceback" not in result.output
    assert not work.exists() and not db.exists()  # no stage ran, no MLflow store was even created


def test_valid_corpus_config_is_accepted():
    """The control: the base the cases differ from is valid, so each refusal above is the case's own doing."""
    result = runner.invoke(app, ["check", "--config", str(CONFIGS / "valid.yaml")], terminal_width=400)
    assert result.exit_code == 0, result.output


def test_check_reports_bad_configs_with_exit_1():
    result = runner.invoke(app, ["check", "--config", str(CONFIGS / "missing_model_folder.yaml")], terminal_width=400)
    # The message sits in a table cell that Rich wraps over several rows: drop the borders, undo the wrapping.
    assert result.exit_code == 1 and "is not a folder" in " ".join(re.sub(r"[│┃]", " ", result.output).split())


def test_real_cli_exit_code_on_duplicate_key():
    env = {**os.environ, "PREFECT_API_URL": ""}
    proc = subprocess.run([sys.executable, "-m", "alignpipe.cli.main", "run", "p", "--config", str(CONFIGS / "duplicate_key.yaml")],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 1
    assert "appears twice" in " ".join(proc.stderr.split()) and "Traceback" not in proc.stderr + proc.stdout


def test_corpus_has_at_least_ten_cases():
    assert len(CASES) >= 10 and len({c[0] for c in CASES.values()} - {"valid.yaml"}) >= 10
