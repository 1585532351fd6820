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


def test_every_part_says_which_key_shows_it_measured():
    assert set(bench_run.MEASURED_BY) == set(bench_run.PARTS)
    sitting = {"demo_metrics": {"aligned": {}}, "any_cpu": {"native": {"wall_s": 600.0}}}
    assert bench_run.measured("demo", sitting)
    assert not bench_run.measured("avx2", sitting)  # the native demo alone: --resume still runs the AVX2 one
    assert not bench_run.measured("validate-scale", sitting)


def test_a_failing_part_leaves_its_rows_unmeasured_and_the_sitting_goes_on(monkeypatch):
    written = []
    monkeypatch.setattr(bench_run, "write", lambda results: written.append(dict(results)))

    def broken():
        sys.exit("plain TRL script failed")

    steps = {"demo": lambda: {"demo_wall_s": 600.0}, "plain-trl": broken,
             "storage": lambda: {"storage_overhead": {}},  # a script that failed returns {}: nothing recorded
             "orchestration": lambda: {"orchestration": {"runs": [{"overhead_s": 0.7}]}}}
    results = {"date": "2026-12-06"}
    failed = bench_run.sit(["demo", "plain-trl", "storage", "orchestration"], steps, results)
    assert failed == ["plain-trl"]
    assert results["demo_wall_s"] == 600.0 and "storage_overhead" not in results
    assert results["orchestration"]["runs"][0]["overhead_s"] == 0.7
    assert len(written) == 3 and "orchestration" not in written[0]  # written after each part that measured


def test_resume_goes_on_only_with_a_sitting_of_this_host_begun_since_yesterday():
    last = {"date": "2026-12-06", "cpu": "Intel(R) Xeon(R) Platinum"}
    assert bench_run.same_sitting(last, "Intel(R) Xeon(R) Platinum", today="2026-12-06")
    assert bench_run.same_sitting(last, "Intel(R) Xeon(R) Platinum", today="2026-12-07")  # ran past midnight
    assert not bench_run.same_sitting(last, "Intel(R) Xeon(R) Platinum", today="2026-12-08")
    assert not bench_run.same_sitting(last, "AMD EPYC 9R14 96-Core Processor", today="2026-12-06")
