"""Cascade report: the sweep's two ends are the two models' own scores; the best point is the cheapest one within
the tolerance, serving the full model alone included, and the report says why."""

import math

import pytest

from alignpipe.cascade import best_point, full_alone, report, request_cost, sweep
from alignpipe.tasks.evaluate import score


def rows(correct, logprobs=None):
    return [{"correct": c, "mean_logprob": lp} for c, lp in zip(correct, logprobs or [0.0] * len(correct))]


# The quantized model is right on its confident rows and wrong on its unsure ones; the full model on most rows.
Q = rows([True, True, True, False, False, True, False, True], [-0.1, -0.2, -0.05, -2.0, -1.5, -0.3, -3.0, -0.4])
F = rows([True, True, True, True, True, False, False, True])
FASTER = (0.5, 1.0)   # quantized, full: cost per request
SLOWER = (4.0, 1.0)   # int8 on an AVX2-only CPU: 4x slower than the fp32 model it came from


def test_ends_are_each_model_alone():
    points = sweep(Q, F, FASTER)
    assert points[0]["threshold"] == -math.inf and points[0]["share_full"] == 0.0
    assert points[-1]["threshold"] == math.inf and points[-1]["share_full"] == 1.0
    # exactly the suite's own exact-match numbers, computed the same way
    assert points[0]["accuracy"] == sum(r["correct"] for r in Q) / len(Q) == 5 / 8
    assert points[-1]["accuracy"] == sum(r["correct"] for r in F) / len(F) == 6 / 8
    shares = [p["share_full"] for p in points]
    assert shares == sorted(shares)


@pytest.mark.parametrize("costs", [FASTER, SLOWER, (1.0, 1.0)])
def test_expected_cost_of_each_point(costs):
    """The quantized model runs on every request; the full model on the escalated share."""
    points = sweep(Q, F, costs)
    assert [p["share_full"] for p in points] == [0, 0, 1 / 8, 2 / 8, 3 / 8, 4 / 8, 5 / 8, 6 / 8, 7 / 8, 1]
    for p in points:
        assert p["expected_cost"] == pytest.approx(costs[0] + p["share_full"] * costs[1])
    assert points[0]["expected_cost"] == costs[0]                            # the quantized model alone
    assert points[-1]["expected_cost"] == pytest.approx(costs[0] + costs[1])  # everything escalated: both pay
    assert full_alone(points, costs)["expected_cost"] == costs[1]            # no cascade: the full model only


def test_faster_quantized_model_cheapest_point_within_tolerance():
    points = sweep(Q, F, FASTER)
    best = best_point(points, 0.01, FASTER)
    # escalating the two least sure rows (-3.0, -2.0) fixes one of them: as good as the full model alone, at 0.75
    assert not best["full_only"] and best["share_full"] == 2 / 8 and best["accuracy"] == 6 / 8
    assert best["expected_cost"] == pytest.approx(0.75)
    # escalating one more (-1.5) beats both models alone, but costs more: the cheapest within tolerance wins
    assert max(p["accuracy"] for p in points) == 7 / 8
    assert best_point(points, 0.2, FASTER)["share_full"] == 0.0  # 5/8 is within 0.2 of 6/8, at 0.5

    summary, md, _, _ = report(Q, F, 0.01, ("quantized", "aligned"), FASTER)
    assert summary["best_share_quantized"] == 6 / 8 and summary["best_full_only"] is False
    assert summary["best_cost"] == pytest.approx(0.75) and summary["best_cost_vs_full"] == pytest.approx(0.75)
    verdict = md.split("\n\n")[0]  # the paragraph the evaluation appends to its comparison table
    assert "Best operating point" in verdict and "75.0% served by quantized" in verdict and "0.75x" in verdict
    assert "costs more" not in md


def test_slower_quantized_model_best_point_is_the_full_model_alone():
    points = sweep(Q, F, SLOWER)
    best = best_point(points, 0.01, SLOWER)
    assert best["full_only"] and best["share_full"] == 1.0 and best["expected_cost"] == 1.0
    # even a tolerance that lets the quantized model serve everything does not make it cheaper
    assert best_point(points, 0.2, SLOWER)["full_only"]

    summary, md, csv_rows, _ = report(Q, F, 0.01, ("quantized", "aligned"), SLOWER)
    assert summary["best_full_only"] is True and summary["best_share_quantized"] == 0.0
    assert summary["best_share_full"] == 1.0 and summary["best_accuracy"] == summary["full_accuracy"] == 6 / 8
    verdict = md.split("\n\n")[0]
    assert "aligned alone, no cascade" in verdict and "slower" in verdict and "no more accurate" in verdict
    assert "sending it anything costs more than serving aligned alone" in verdict
    chosen = [r for r in csv_rows[1:] if r[-1] == "yes"]
    assert chosen == [["full only", "1.0000", "0.0000", "0.7500", "1.0000", "1.0000", "yes"]]


def test_faster_but_needs_too_much_escalation_is_full_alone_too():
    costs = (0.8, 1.0)  # within tolerance needs 2/8 escalated: 0.8 + 0.25 > 1.0
    best = best_point(sweep(Q, F, costs), 0.01, costs)
    assert best["full_only"]
    md = report(Q, F, 0.01, ("quantized", "aligned"), costs)[1]
    assert "quantized is cheaper (0.80x aligned)" in md and "1.05x aligned alone" in md


def test_ties_go_to_the_higher_accuracy():
    costs = (1.0, 1.0)  # quantized alone (5/8) costs what the full model alone (6/8) does
    assert best_point(sweep(Q, F, costs), 0.2, costs)["full_only"]


def test_issue_figures_from_the_evaluation_metrics():
    """int8 at 17.7 tokens/s against 75.2 for its fp32 model, a point of exact match apart: full model alone."""
    costs = (request_cost({"tokens_per_s": 17.7}), request_cost({"tokens_per_s": 75.2}))
    assert costs == pytest.approx((1000 / 17.7, 1000 / 75.2))
    summary, md, _, _ = report(Q, F, 0.01, ("quantized", "aligned"), costs)
    assert summary["best_full_only"] and "4.25x aligned" in md and "costs more" in md
    with pytest.raises(ValueError, match="tokens_per_s"):
        request_cost({"tokens_per_s": 0.0})


def test_report_table_and_figure():
    summary, _, csv_rows, fig = report(Q, F, 0.01, ("quantized", "aligned"), FASTER)
    assert summary["quantized_accuracy"] == 5 / 8 and summary["full_accuracy"] == 6 / 8
    assert csv_rows[0] == ["threshold", "share_full", "share_quantized", "accuracy", "expected_cost_ms_per_token",
                           "cost_vs_full_alone", "chosen"]
    assert len(csv_rows) == 1 + 10 + 1  # header, every threshold, the full model alone
    assert csv_rows[-1][:5] == ["full only", "1.0000", "0.0000", "0.7500", "1.0000"]
    assert [r[-1] for r in csv_rows[1:]].count("yes") == 1 and csv_rows[4][-1] == "yes"
    assert len(fig.axes) == 2  # accuracy and cost against the escalated share


def test_markdown_view_keeps_the_chosen_point():
    n = 200  # 202 points: the markdown shows 40 or so, the CSV all of them
    q = rows([i % 3 != 0 for i in range(n)], [-i / n for i in range(n)])
    f = rows([True] * n)
    summary, md, csv_rows, _ = report(q, f, 0.1, ("q", "f"), (0.1, 1.0))
    chosen = next(r for r in csv_rows[1:] if r[-1] == "yes")
    assert not summary["best_full_only"] and summary["best_share_full"] == 0.7  # mid-table, between thinned rows
    table = [line for line in md.splitlines() if line.startswith("| ")][1:]
    assert len(csv_rows) == 1 + n + 2 + 1 and len(table) <= 41
    assert "| " + " | ".join(chosen) + " |" in table and table[-1].startswith("| full only")


def test_cascade_uses_the_same_exact_match_as_the_suite():
    refs = ['{"a": 1}', '{"a": 2}', '{"a": 3}']
    preds = ['{"a": 1}', ' {"a": 2} ', '{"a": 4}']
    flags = [p.strip() == r.strip() for p, r in zip(preds, refs)]  # how evaluate_model records `correct`
    exact_match = score(preds, refs, json_targets=True)["exact_match"]
    assert sweep(rows(flags), rows(flags), FASTER)[0]["accuracy"] == exact_match
