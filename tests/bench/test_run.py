"""bench/run.py: results.md shows Ray ÷ in-process pair by pair (each pair at one host speed), with the medians beside
it (the README's row, bench/table.py, shows the median of the pair ratios: tests/bench/test_table.py)."""

import importlib.util
import sys

from testlib import REPO

sys.path.insert(0, str(REPO / "bench"))
spec = importlib.util.spec_from_file_location("bench_run", REPO / "bench" / "run.py")
bench_run = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_run)


def test_the_detail_reads_pair_by_pair_with_the_medians_beside():
    # the host sped up by half between pairs: each pair reads 0.9, the two sides' medians read 1.2 / 1.0
    r = {"sft_ray_trials": [90.0, 135.0, 180.0], "sft_inprocess_trials": [100.0, 150.0, 200.0],
         "sft_tokens_per_s_ray": 120.0, "sft_tokens_per_s_inprocess": 100.0}
    text = bench_run.ray_vs_inprocess(r)
    assert text.startswith("0.900: median of 3 interleaved pairs") and "0.90, 0.90, 0.90" in text
    assert "120 / 100 = 1.200" in text


def test_without_pairs_the_medians_are_the_detail():
    r = {"sft_tokens_per_s_ray": 91.0, "sft_inprocess_trials": [], "sft_tokens_per_s_inprocess": 100.0}
    assert bench_run.ray_vs_inprocess(r) == "91 / 100 = 0.910"
