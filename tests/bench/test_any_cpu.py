"""bench/any_cpu.py: the demo's SFT tokens/s is the Trainer's count over its train runtime, as the peers' (a run
from before the pipeline logged that count is read from TRL's num_tokens, carried to the last step)."""

import sys

import pytest
from testlib import REPO

sys.path.insert(0, str(REPO))

from alignpipe import tracking  # noqa: E402
from bench.any_cpu import sft_figures  # noqa: E402


def demo_store(work, metrics: dict[str, list[tuple[int, float]]]) -> str:
    """A real MLflow store in `work` as the demo leaves it: a parent run, and its sft stage run with `metrics`."""
    uri = f"sqlite:///{work}/mlflow.db"
    exp = tracking.client_for(uri).create_experiment("alignpipe")
    parent = tracking.start_run(uri, exp, "demo", {})
    with tracking.stage_run(uri, parent, "sft", "key") as run_id:
        for key, points in metrics.items():
            for step, value in points:
                tracking.log_metrics(uri, run_id, {key: value}, step=step)
    return parent


def test_the_trainer_count_over_the_runtime_when_the_run_logged_it(tmp_path):
    parent = demo_store(tmp_path, {"train/runtime": [(10, 20.0)], "train/steps_per_second": [(10, 0.5)],
                                   "tokens_per_s": [(10, 999.0)], "final/train_tokens_per_s": [(0, 150.0)],
                                   "num_tokens": [(5, 1000.0), (10, 2000.0)]})
    figures = sft_figures(tmp_path, parent)
    assert figures["tokens_per_s"] == 150.0 and figures["tokens_from"] == "trainer count"
    assert figures["last_interval_tokens_per_s"] == 999.0 and figures["s_per_step"] == 2.0


def test_an_older_run_carries_num_tokens_to_its_last_step(tmp_path):
    parent = demo_store(tmp_path, {"train/runtime": [(12, 30.0)], "train/steps_per_second": [(12, 0.4)],
                                   "final/global_step": [(0, 12.0)], "tokens_per_s": [(10, 400.0)],
                                   "num_tokens": [(5, 1000.0), (10, 2200.0)]})
    figures = sft_figures(tmp_path, parent)
    # 2200 at step 10, then 240 a step (the last interval's pace) for 2 steps: 2680 tokens in 30 s
    assert figures["tokens_per_s"] == pytest.approx(2680 / 30)
    assert figures["tokens_from"] == "num_tokens at step 10, carried to step 12"
