"""The serving choice on fake measured figures: what gets registered, and the decision table that says why."""

import pytest

from alignpipe.config import load_pipeline
from alignpipe.config.register import ServeConfig
from alignpipe.errors import ConfigError
from alignpipe.serving_choice import choose
from testlib import PIPELINES

SERVE = ServeConfig()  # latency_p95_ms, exact_match >= best - 0.01, margin 0.10


def figures(latency, size, exact_match=0.84, tokens_per_s=50.0, **more):
    return {"latency_p95_ms": latency, "size_mb": size, "exact_match": exact_match, "tokens_per_s": tokens_per_s,
            "json_validity": 1.0, **more}


def test_int8_that_decodes_slower_is_not_registered():
    # the AVX2-only host of issue 28: int8 28.2 s against 6.3 s per batch, same accuracy
    metrics = {"base": figures(1000, 540), "aligned": figures(6300, 540), "quantized": figures(28200, 170)}
    choice = choose(["aligned", "quantized"], metrics, SERVE)
    assert choice.winner == "aligned"
    assert "best on latency_p95_ms by more than the 10% margin" in choice.reason and "6300 ms against quantized 28200 ms" in \
        choice.reason
    rows = {c.label: c for c in choice.candidates}
    assert list(rows) == ["aligned", "quantized"]  # never base
    assert rows["aligned"].eligible and rows["quantized"].eligible and rows["aligned"].note == "registered"
    assert "4.48x worse on latency_p95_ms" in rows["quantized"].note
    assert rows["quantized"].figures == {"latency_p95_ms": 28200, "size_mb": 170, "exact_match": 0.84}


def test_int8_faster_beyond_the_margin_and_within_quality_is_registered():
    metrics = {"aligned": figures(6300, 540, exact_match=0.84), "quantized": figures(3800, 170, exact_match=0.835)}
    choice = choose(["aligned", "quantized"], metrics, SERVE)
    assert choice.winner == "quantized"
    assert {c.label: c.eligible for c in choice.candidates} == {"aligned": True, "quantized": True}


def test_within_the_margin_the_smaller_artifact_wins_whichever_is_faster():
    # int8 9 % slower: within 10 %, and a third of the size
    metrics = {"aligned": figures(1000, 540), "quantized": figures(1090, 170)}
    choice = choose(["aligned", "quantized"], metrics, SERVE)
    assert choice.winner == "quantized" and "the smaller artifact wins (170 MB)" in choice.reason
    assert choice.candidates[0].note == "within 10% on latency_p95_ms, larger (540 MB)"
    # exactly at the margin is still within it: a candidate must win by MORE than 10 %
    assert choose(["aligned", "quantized"], {"aligned": figures(1000, 540), "quantized": figures(1100, 170)},
                  SERVE).winner == "quantized"
    # the full model 5 % faster and the int8 model smaller: the smaller still wins
    assert choose(["aligned", "quantized"], {"aligned": figures(950, 540), "quantized": figures(1000, 170)},
                  SERVE).winner == "quantized"
    # just beyond it: the faster one wins
    assert choose(["aligned", "quantized"], {"aligned": figures(1000, 540), "quantized": figures(1101, 170)},
                  SERVE).winner == "aligned"


def test_tokens_per_s_objective_is_higher_is_better_with_the_same_margin():
    serve = ServeConfig(objective="tokens_per_s")
    slow_int8 = {"aligned": figures(1, 540, tokens_per_s=75.2), "quantized": figures(1, 170, tokens_per_s=17.7)}
    assert choose(["aligned", "quantized"], slow_int8, serve).winner == "aligned"
    close = {"aligned": figures(1, 540, tokens_per_s=75.0), "quantized": figures(1, 170, tokens_per_s=70.0)}
    assert choose(["aligned", "quantized"], close, serve).winner == "quantized"
    size = ServeConfig(objective="size_mb")
    assert choose(["aligned", "quantized"], slow_int8, size).winner == "quantized"


def test_the_quality_constraint_excludes_a_fast_but_inaccurate_candidate():
    metrics = {"aligned": figures(6300, 540, exact_match=0.84), "quantized": figures(1000, 170, exact_match=0.80)}
    choice = choose(["aligned", "quantized"], metrics, SERVE)
    assert choice.winner == "aligned"
    rows = {c.label: c for c in choice.candidates}
    assert not rows["quantized"].eligible and "fails `exact_match >= best - 0.01`: 0.8 against 0.83" in \
        rows["quantized"].note
    assert choice.reason.endswith("excluded by the quality constraints: quantized")
    # exactly 0.01 below the best is within the constraint, float rounding notwithstanding
    metrics["quantized"]["exact_match"] = 0.83
    assert choose(["aligned", "quantized"], metrics, SERVE).winner == "quantized"


def test_quality_is_compared_on_the_rows_both_candidates_saw():
    # the native demo of 2026-12-06: int8 screened on 64 rows (0.797), aligned on 400 (0.830); on the same 64 rows
    # aligned had 0.797 too, so int8 is not excluded for quality: it loses on latency, and the reason says that
    metrics = {"aligned": figures(2314, 540, exact_match=0.830, rows=400),
               "quantized": figures(3514, 170, exact_match=0.797, rows=64)}
    assert "excluded by the quality constraints: quantized" in choose(["aligned", "quantized"], metrics, SERVE).reason
    shared = {"aligned": {"exact_match": 0.797, "rows": 64}, "quantized": {"exact_match": 0.797, "rows": 64}}
    choice = choose(["aligned", "quantized"], metrics, SERVE, shared)
    assert choice.winner == "aligned" and choice.quality_rows == 64
    assert "excluded" not in choice.reason and "by more than the 10% margin" in choice.reason
    rows = {c.label: c for c in choice.candidates}
    assert rows["quantized"].eligible and rows["aligned"].figures["exact_match"] == 0.797
    assert rows["aligned"].figures["latency_p95_ms"] == 2314  # the objective still from the full evaluation
    assert "compared on the first 64 held-out rows" in choice.markdown()
    # and a challenger worse on the shared rows is still excluded
    worse = {**shared, "quantized": {"exact_match": 0.75, "rows": 64}}
    assert "excluded by the quality constraints: quantized" in choose(["aligned", "quantized"], metrics, SERVE,
                                                                        worse).reason
    # shared figures that do not cover every candidate are not used
    assert choose(["aligned", "quantized"], metrics, SERVE, {"aligned": shared["aligned"]}).quality_rows is None


def test_several_constraints_and_lower_is_better_ones():
    serve = ServeConfig(quality=["exact_match >= best - 0.01", "perplexity <= 1.05 * best"])
    metrics = {"aligned": figures(6300, 540, perplexity=2.0), "quantized": figures(1000, 170, perplexity=2.2)}
    choice = choose(["aligned", "quantized"], metrics, serve)
    assert choice.winner == "aligned" and "fails `perplexity <= 1.05 * best`" in choice.candidates[1].note
    assert choice.candidates[0].figures["perplexity"] == 2.0


def test_when_no_candidate_meets_an_absolute_constraint_the_most_accurate_are_kept():
    serve = ServeConfig(quality=["exact_match >= 0.9"])
    metrics = {"aligned": figures(6300, 540, exact_match=0.84), "quantized": figures(1000, 170, exact_match=0.80)}
    choice = choose(["aligned", "quantized"], metrics, serve)
    assert choice.winner == "aligned"
    assert choice.reason.startswith("no candidate meets every quality constraint; kept the best on exact_match")
    assert [c.eligible for c in choice.candidates] == [True, False]
    assert "kept although it fails `exact_match >= 0.9`" in choice.candidates[0].note


def test_no_quality_constraint_and_a_single_candidate():
    metrics = {"sft": figures(1000, 540), "quantized": figures(100, 170, exact_match=0.0)}
    assert choose(["sft", "quantized"], metrics, ServeConfig(quality=[])).winner == "quantized"
    only = choose(["sft"], metrics, SERVE)
    assert (only.winner, only.reason) == ("sft", "the only candidate (latency_p95_ms 1000 ms)")


def test_ties_are_deterministic():
    metrics = {"aligned": figures(1000, 170), "quantized": figures(1000, 170)}
    assert choose(["aligned", "quantized"], metrics, SERVE).winner == "aligned"
    assert choose(["quantized", "aligned"], metrics, SERVE).winner == "quantized"


def test_a_missing_or_unmeasured_metric_is_a_config_error_naming_it():
    metrics = {"aligned": figures(1000, 540), "quantized": figures(1000, 170)}
    with pytest.raises(ConfigError) as exc:
        choose(["aligned", "quantized"], metrics, ServeConfig(quality=["exact_macth >= best - 0.01"]))
    msg = str(exc.value)
    assert "register.serve needs 'exact_macth'" in msg and "'aligned'" in msg and "exact_match" in msg
    del metrics["quantized"]["latency_p95_ms"]
    with pytest.raises(ConfigError, match="'latency_p95_ms' for every candidate.*did not measure it for 'quantized'"):
        choose(["aligned", "quantized"], metrics, SERVE)
    metrics["quantized"]["latency_p95_ms"] = float("nan")
    with pytest.raises(ConfigError, match="measured nan"):
        choose(["aligned", "quantized"], metrics, SERVE)
    with pytest.raises(ConfigError, match="did not measure it for 'aligned'"):
        choose(["aligned"], {}, SERVE)


def test_the_decision_table_renders_every_candidate():
    metrics = {"aligned": figures(6300, 540), "quantized": figures(28200, 170)}
    md = choose(["aligned", "quantized"], metrics, SERVE).markdown()
    assert md.startswith("**Registered: `aligned`**: best on latency_p95_ms")
    assert "| candidate | latency_p95_ms | size_mb | exact_match | eligible | note |" in md
    assert "| quantized | 28200 | 170 | 0.84 | yes | 4.48x worse" in md


def test_serve_config_parses_from_the_pipelines_file_and_names_a_bad_constraint():
    cfg = load_pipeline(PIPELINES, "smoke", {"register.serve.objective": "tokens_per_s",
                                             "register.serve.quality": "json_validity >= best - 0.02",
                                             "register.serve.margin": 0.2})
    serve = cfg.register_.serve
    assert (serve.objective, [str(q) for q in serve.quality], serve.margin) == \
        ("tokens_per_s", ["json_validity >= best - 0.02"], 0.2)
    assert [str(q) for q in load_pipeline(PIPELINES, "demo").register_.serve.quality] == \
        ["exact_match >= best - 0.01"]
    with pytest.raises(ConfigError) as exc:
        load_pipeline(PIPELINES, "smoke", {"register.serve.quality": ["exact_match >= champion - 0.01"]})
    msg = str(exc.value)
    assert "register.serve.quality" in msg and "not a quality constraint: 'exact_match >= champion - 0.01'" in msg
    assert "'exact_match >= best - 0.01'" in msg  # the example of the right form
    with pytest.raises(ConfigError, match="register.serve.objective"):
        load_pipeline(PIPELINES, "smoke", {"register.serve.objective": "accuracy"})


def test_a_screened_challenger_is_within_reach_only_if_it_could_still_win():
    from alignpipe.serving_choice import within_reach

    full = figures(6300, 540)
    assert not within_reach(figures(28200, 170), full, SERVE)    # 4.48x slower: scored on its screen only
    assert within_reach(figures(6900, 170), full, SERVE)         # 9.5 % slower: within the margin, may win on size
    assert within_reach(figures(3800, 170), full, SERVE)         # faster
    assert not within_reach(figures(6931, 170), full, SERVE)     # just beyond 10 %
    speed = ServeConfig(objective="tokens_per_s")
    assert not within_reach(figures(1, 170, tokens_per_s=17.7), figures(1, 540, tokens_per_s=75.2), speed)
    assert within_reach(figures(1, 170, tokens_per_s=70.0), figures(1, 540, tokens_per_s=75.2), speed)
    # size: a quantized model is smaller, so always within reach; an unmeasured figure leaves it to the full run
    assert within_reach(figures(99999, 170), full, ServeConfig(objective="size_mb"))
    assert within_reach({"size_mb": 170}, full, SERVE)
