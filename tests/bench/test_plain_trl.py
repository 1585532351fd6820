"""bench/plain_trl.py on the tiny model: the competent recipe end to end (SFT, DPO, int8 and the four-model
evaluation), and TRL's defaults through SFT only (`--sft-only`; after SFT the recipes differ only in DPO's
trainer settings and in the rows scored)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from testlib import REPO

# Runs the script as `python bench/plain_trl.py ...` would, then reports which orchestration packages it loaded.
RUN_AND_LIST_IMPORTS = textwrap.dedent("""
    import json, runpy, sys
    sys.argv = [sys.argv[1], *sys.argv[2:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
    print(json.dumps([m for m in ("prefect", "ray", "mlflow", "great_expectations") if m in sys.modules]))
""")


def test_plain_trl_runs_end_to_end_with_tiny_settings(tmp_path, tiny_model):
    recipe = "competent"
    out = tmp_path / "plain"
    args = [str(REPO / "bench" / "plain_trl.py"), "--tiny", "--models-dir", str(Path(tiny_model).parent),
            "--sft-steps", "1", "--dpo-steps", "1", "--eval-rows", "2", "--train-rows", "16", "--out", str(out),
            "--recipe", recipe]
    proc = subprocess.run([sys.executable, "-c", RUN_AND_LIST_IMPORTS, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *_, printed, imported = proc.stdout.strip().splitlines()
    assert json.loads(imported) == []  # plain TRL: no Prefect, Ray, MLflow or Great Expectations

    result = json.loads((out / "result.json").read_text())
    assert result == json.loads(printed)
    assert result["model"] == tiny_model
    assert result["settings"]["sft_steps"] == 1 and result["settings"]["dpo_steps"] == 1
    assert set(result["stage_s"]) == {"sft", "align", "quantize", "evaluate"}
    assert result["wall_s"] >= sum(result["stage_s"].values())
    assert list(result["metrics"]) == ["base", "sft", "aligned", "quantized"]
    assert result["recipe"] == recipe and result["sft_tokens_per_s"] > 0
    for metrics in result["metrics"].values():
        assert metrics["rows"] == 2  # the tiny run's 2 rows are below the pipeline's screen of 64
        for key in ("exact_match", "json_validity", "field_accuracy", "preference_accuracy"):
            assert 0.0 <= metrics[key] <= 1.0
        assert metrics["perplexity"] > 1.0
    assert "reward_margin" in result["metrics"]["aligned"]
    quantized = json.loads((out / "int8" / "config.json").read_text())
    assert quantized["quantization_config"]["quant_method"] == "torchao"
    for folder in ("sft_merged", "aligned_merged"):  # merged: plain model folders, no adapter left
        assert (out / folder / "model.safetensors").is_file() and not (out / folder / "adapter_config.json").exists()


def test_sft_only_stops_after_sft_with_its_tokens_per_s(tmp_path, tiny_model):
    """SFT alone (bench/sft_pairs.py's peer runs it with the competent recipe), here with TRL's defaults."""
    out = tmp_path / "plain"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "plain_trl.py"), "--tiny", "--models-dir",
                           str(Path(tiny_model).parent), "--sft-steps", "1", "--train-rows", "16", "--recipe",
                           "defaults", "--sft-only", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert set(result["stage_s"]) == {"sft"} and "metrics" not in result
    assert result["recipe"] == "defaults" and result["sft_tokens_per_s"] > 0
    assert (out / "sft_merged" / "model.safetensors").is_file() and not (out / "aligned_merged").exists()
