"""bench/run.py: Ray ÷ in-process is read pair by pair (each pair at one host speed), with the medians beside it."""

import importlib.util
import sys

from testlib import REPO

sys.path.insert(0, str(REPO / "bench"))
spec = importlib.util.spec_from_file_location("bench_run", REPO / "bench" / "run.py")
bench_run = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_run)


def test_ray_over_inprocess_is_the_median_of_the_pair_ratios():
    # the host sped up by half between pairs: each pair reads 0.9, the two sides' medians read 1.2 / 1.0
    r = {"sft_ray_trials": [90.0, 135.0, 180.0], "sft_inprocess_trials": [100.0, 150.0, 200.0],
         "sft_tokens_per_s_ray": 120.0, "sft_tokens_per_s_inprocess": 100.0}
    assert abs(bench_run.ray_over_inprocess(r) - 0.9) < 1e-12
    text = bench_run.ray_vs_inprocess(r)
    assert text.startswith("0.900: median of 3 interleaved pairs") and "0.90, 0.90, 0.90" in text
    assert "120 / 100 = 1.200" in text
    row = next(line for line in bench_run.evidence_rows(r) if "Ray Train ÷ in-process" in line)
    assert "0.900" in row and "no" in row.split("|")[-2]  # under 0.95


def test_without_pairs_the_medians_are_the_reading():
    r = {"sft_tokens_per_s_ray": 91.0, "sft_tokens_per_s_inprocess": 100.0}
    assert abs(bench_run.ray_over_inprocess(r) - 0.91) < 1e-12
    assert bench_run.ray_vs_inprocess(r) == "91 / 100 = 0.910"
