"""bench/table.py: the README's benchmark table is a function of bench/results.json (one sitting) and nothing else.

bench/results.json holds the keys the table (and bench/run.py's notes) read and no others; rendered from it, the
table has the README's format and rows and keeps README.md within its budget; a key the sitting lacks reads "not
measured in this sitting", never an older value. No models, no Ray: the results are read as JSON.
"""

import ast
import copy
import importlib.util
import json
import sys

import pytest
from testlib import REPO

sys.path.insert(0, str(REPO / "bench"))
spec = importlib.util.spec_from_file_location("bench_run", REPO / "bench" / "run.py")
bench_run = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_run)
table = bench_run.table  # bench/table.py, as bench/run.py imports it

RESULTS = json.loads((REPO / "bench" / "results.json").read_text())
README = (REPO / "README.md").read_text(encoding="utf-8")
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
MAX_BYTES = 25_000  # tests/test_readme.py's budget


def readme_table(text: str = README) -> list[list[str]]:
    """The cells of every line between the README's bench markers."""
    block = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in block.splitlines()]


def detail_keys() -> set[str]:
    """bench/run.py's DETAIL_KEYS, read from its source (the literal it writes results.json through)."""
    tree = ast.parse((REPO / "bench" / "run.py").read_text())
    [node] = [n for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "DETAIL_KEYS"]
    return set(ast.literal_eval(node.value))


def full_results() -> dict:
    """The committed sitting plus a value for every optional key, so every row's reader runs."""
    r = copy.deepcopy(RESULTS)
    r["cpu"] = "AMD EPYC 9R14 96-Core Processor"
    r["demo_metrics"]["prompted_base"] = {"exact_match": 0.5}
    r.update(sft_tokens_per_s_trl_competent=400.0, plain_trl_competent_wall_s=500.0,
             previous_sitting={"date": "2026-12-01", "aligned_exact_match": 0.8525},
             int8_avx2={"ratio": 1.2, "pairs": 3, "int8_tokens_per_s": 140.7, "fp32_tokens_per_s": 121.8},
             storage_overhead={"s3_over_local": 1.088, "s3_s": [1.0, 2.0, 3.0]},
             shared_stack={"pipelines": {"concurrent_failures": 0, "concurrent_exits": [0, 0, 0, 0],
                                         "concurrent_over_alone": 4.139},
                           "promotions": {"lost_moves": 0, "champions": 1, "champion_is_better_version": True}},
             validate_scale=[{"rows": 200_000, "seconds": 20.0, "rows_per_s": 10_000, "peak_rss_largest_gib": 1.0,
                              "peak_rss_sum_gib": 2.0},
                             {"rows": 1_000_000, "seconds": 100.0, "rows_per_s": 10_000,
                              "peak_rss_largest_gib": 1.5, "peak_rss_sum_gib": 2.5}],
             gpu_check={"passed": 9, "failed": 0, "not_run": 0},
             rlhf_evidence={"verdict": {"every_end_above_every_start": False, "exact_match_gain_mean": 0.003}},
             doc_bytes={"readme": 23_104, "notes": 8_200},
             sft_pairs={"ratio": 1.08, "pairs": 3, "ours_median": 410.0, "peer_median": 380.0},
             sft_kernels_off_trials=[300.0, 310.0, 305.0], sft_kernels_auto_trials=[340.0, 350.0, 345.0],
             plain_trl_competent_avx2={"sft_tokens_per_s": 110.0, "wall_s": 1500.0})
    for host in ("native", "avx2"):
        r.setdefault("any_cpu", {})[host] = {"wall_s": 614.2, "sft": {"tokens_per_s": 346.9}, "serving": {
            "registered_vs_best": 1.0, "figures": {"aligned": 2313.8, "quantized": 3514.2}}}
    return r


# (a) the keys ------------------------------------------------------------------------------------------------------

def test_every_key_a_row_needs_is_in_results_json():
    missing = sorted(k for k in table.required_keys() if table.lookup(RESULTS, k) is table.ABSENT)
    assert not missing, f"bench/results.json lacks {missing}: measure them, or declare their row optional"


def test_results_json_holds_no_key_that_nothing_reads():
    read = {k.split(".")[0] for k in table.keys_read()} | detail_keys()
    stale = sorted(set(RESULTS) - read)
    assert not stale, f"bench/results.json holds keys nothing reads (stale or from another sitting): {stale}"
    assert "tuned_exact_match" not in RESULTS


def test_run_py_writes_results_json_through_the_same_key_set():
    assert bench_run.TOP_LEVEL_READ == {k.split(".")[0] for k in table.keys_read()} | detail_keys()


def test_each_row_reads_only_the_keys_it_declares():
    """Reader raises KeyError on an undeclared key: render every row, optional ones included."""
    text = table.render(full_results())
    assert table.NOT_MEASURED not in text
    assert "| bf16 (EPYC) |" in text and "| AVX2/fp32 |" in text


def test_a_reader_refuses_an_undeclared_key():
    with pytest.raises(KeyError, match="not declared"):
        table.Reader(RESULTS, ("demo_wall_s",))("cached_wall_s")


# (b) the format and the size ---------------------------------------------------------------------------------------

def test_the_table_has_the_readmes_header_rows_and_order():
    rendered = [[c.strip() for c in line.strip("|").split("|")] for line in table.render(RESULTS).splitlines()]
    current = readme_table()
    assert rendered[:2] == current[:2] == [["target", "reading", "met?", "host class", "date"], ["---"] * 5]
    assert all(len(row) == 5 for row in rendered)
    assert [row[0] for row in rendered] == [row[0] for row in current], "ROWS and the README's targets differ"


def test_rows_of_this_sitting_read_as_the_readme_shows_them():
    """Where the README's row is dated as results.json, its reading and verdict come out of results.json."""
    rendered = [[c.strip() for c in line.strip("|").split("|")] for line in table.render(RESULTS).splitlines()[2:]]
    same = [(new, old) for new, old in zip(rendered, readme_table()[2:]) if old[4] == RESULTS["date"]]
    assert same, f"no README row is dated {RESULTS['date']}"
    for new, old in same:
        assert new[1:3] == old[1:3] and new[4] == old[4], f"{old[0]}: README {old[1:3]}, results.json {new[1:3]}"
        assert old[3] == new[3], old


def test_the_benchmark_prose_names_the_sitting_the_table_reads():
    """The paragraph above the table is written by hand: it must name results.json's CPU family and date."""
    prose = README[README.index("## Benchmarks"):README.index(BEGIN)]
    family = table.cpu_family(RESULTS["cpu"])
    assert family in prose, f"the Benchmarks paragraph does not name the sitting's CPU ({family}): rewrite it"
    assert RESULTS["date"] in prose, f"the Benchmarks paragraph does not name the sitting's date ({RESULTS['date']})"


def test_the_table_spliced_into_the_readme_keeps_it_within_budget():
    for results in (RESULTS, full_results()):
        body = table.splice(README, table.render(results), BEGIN, END)
        assert body.count(BEGIN) == body.count(END) == 1
        assert body.split(END, 1)[1] == README.split(END, 1)[1] and body.split(BEGIN)[0] == README.split(BEGIN)[0]
        assert len(body.encode()) <= MAX_BYTES, f"README.md would be {len(body.encode())} bytes"


def test_bench_run_writes_the_table_and_only_read_keys(tmp_path, monkeypatch):
    """write(): README gets the condensed table only; results.json loses keys nothing reads; results.md the rest."""
    (tmp_path / "bench").mkdir()
    (tmp_path / "README.md").write_text(README, encoding="utf-8")
    (tmp_path / "bench" / "NOTES.md").write_text("n" * 8_200)
    monkeypatch.setattr(bench_run, "ROOT", tmp_path)
    monkeypatch.setattr(bench_run, "RESULTS", tmp_path / "bench" / "results.json")
    monkeypatch.setattr(bench_run, "TABLE", tmp_path / "bench" / "results.md")
    bench_run.write({**copy.deepcopy(RESULTS), "tuned_exact_match": 0.695, "rlhf_wall_s": 364.9})
    written = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert "tuned_exact_match" not in written and "rlhf_wall_s" not in written
    readme = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert readme_table(readme)[2:] and all(len(row) == 5 for row in readme_table(readme))
    assert len(readme.encode()) <= MAX_BYTES
    size_row = readme_table(readme)[-1]
    assert size_row[0].startswith("README ≤ 25 KB") and size_row[2] == "yes", size_row
    assert f"{len(readme.encode()) / 1000:.1f} KB" in size_row[1]
    assert table.render(written) in (tmp_path / "bench" / "results.md").read_text()


# (c) a missing key -------------------------------------------------------------------------------------------------

def test_a_missing_key_reads_not_measured_never_an_old_value():
    r = copy.deepcopy(RESULTS)
    del r["demo_metrics"]["aligned"]["exact_match"]
    r["tuned_exact_match"] = 0.695  # an older sitting's key left behind: the table never reads it
    lines = table.render(r).splitlines()[2:]
    for row, line in zip(table.ROWS, lines):
        if table.AL in row.keys:
            assert line == f"| {row.target} | {table.NOT_MEASURED} | — | {row.host} | — |"
    assert sum(table.NOT_MEASURED in line for line in lines) > sum(table.NOT_MEASURED in line for line in
                                                                   table.render(RESULTS).splitlines())
    assert "0.695" not in "\n".join(lines)


def test_an_absent_script_reads_not_measured_and_a_present_one_its_value():
    sitting = {"date": "2026-12-03", **{k: v for k, v in RESULTS.items() if k not in ("storage_overhead", "cpu",
                                                                                       "date")}}
    r = {**sitting, "storage_overhead": {"s3_over_local": 1.4, "s3_s": [1.0, 2.0, 3.0]}}
    [line] = [x for x in table.render(r).splitlines() if "storage on S3" in x]
    assert "| 1.400 (medians of 3, interleaved) | no | bf16 | 2026-12-03 |" in line
    [line] = [x for x in table.render(sitting).splitlines() if "storage on S3" in x]
    assert table.NOT_MEASURED in line and "2026-12-03" not in line


def test_ray_over_inprocess_is_the_median_of_the_pair_ratios():
    # the host sped up by half between pairs: each pair reads 0.9, the two sides' medians read 1.2 / 1.0
    r = {"date": "2026-12-03", "sft_ray_trials": [90.0, 135.0, 180.0], "sft_inprocess_trials": [100.0, 150.0, 200.0]}
    assert abs(table.ray_over_inprocess(r) - 0.9) < 1e-12
    lines = [x for x in table.render(r).splitlines() if "Ray Train ÷ in-process" in x]
    assert lines == [("| SFT tokens/s, Ray Train ÷ in-process (information; its target is retired) | 0.900 "
                      "(median of 3 interleaved pairs) | — | bf16 | 2026-12-03 |")]


def test_kernels_off_reads_the_median_of_its_pair_ratios():
    r = {"date": "2026-12-06", "sft_kernels_off_trials": [270.0, 330.0, 300.0],
         "sft_kernels_auto_trials": [300.0, 300.0, 300.0]}
    [line] = [x for x in table.render(r).splitlines() if "kernels: off" in x]
    assert "| 1.000 (median of 3 interleaved pairs) | — |" in line


def test_int8_minus_aligned_reads_both_ways_the_shared_rows_from_the_cascade():
    """int8 screened on 64 rows, aligned on 400: the first-fixed row compares them as scored; the second reads the
    cascade, which scores both on the same rows. Here they disagree, so each row must read its own keys."""
    r = copy.deepcopy(RESULTS)
    r["demo_metrics"]["quantized"]["exact_match"], r["demo_metrics"]["aligned"]["exact_match"] = 0.797, 0.830
    r["cascade"].update(quantized_accuracy=0.781, full_accuracy=0.797)
    lines = table.render(r).splitlines()
    [at] = [i for i, x in enumerate(lines) if x.startswith("| int8 − aligned exact match within 0.02 |")]
    assert "| −0.033 | no |" in lines[at]
    assert lines[at + 1].startswith("| The same, on the rows both were scored on, within 0.02 | −0.016 | yes |")


def test_the_demo_table_shows_every_artifact_and_a_dash_where_a_metric_was_not_scored():
    m = {label: {"rows": 400.0, "exact_match": 0.5, "json_validity": 1.0, "field_accuracy": 0.8,
                 "preference_accuracy": 0.9, "tokens_per_s": 100.0, "latency_p95_ms": 2000.0, "size_mb": 500.0}
         for label in ("base", "prompted_base", "sft", "aligned", "quantized")}
    del m["prompted_base"]["preference_accuracy"]
    m["sft"]["rows"] = 64.0
    lines = table.demo_table({"demo_metrics": m}).splitlines()
    assert lines[0] == "| metric | base | prompted base | sft | aligned (DPO) | int8 |"
    assert lines[2] == "| held-out rows scored | 400 | 400 | 64 | 400 | 400 |"
    assert "| preference accuracy | 0.900 | — | 0.900 | 0.900 | 0.900 |" in lines
