"""Cascade report: the sweep's two ends are the two models' own scores; the best point respects the tolerance."""

import math


from alignpipe.cascade import best_point, report, sweep
from alignpipe.tasks.evaluate import score


def rows(correct, logprobs=None):
    return [{"correct": c, "mean_logprob": lp} for c, lp in zip(correct, logprobs or [0.0] * len(correct))]


# The quantized model is right on its confident rows and wrong on its unsure ones; the full model on most rows.
Q = rows([True, True, True, False, False, True, False, True], [-0.1, -0.2, -0.05, -2.0, -1.5, -0.3, -3.0, -0.4])
F = rows([True, True, True, True, True, False, False, True])


def test_ends_are_each_model_alone():
    points = sweep(Q, F)
    assert points[0]["threshold"] == -math.inf and points[0]["share_full"] == 0.0
    assert points[-1]["threshold"] == math.inf and points[-1]["share_full"] == 1.0
    # exactly the suite's own exact-match numbers, computed the same way
    assert points[0]["accuracy"] == sum(r["correct"] for r in Q) / len(Q) == 5 / 8
    assert points[-1]["accuracy"] == sum(r["correct"] for r in F) / len(F) == 6 / 8
    shares = [p["share_full"] for p in points]
    assert shares == sorted(shares)


def test_best_point_serves_most_with_the_quantized_model_within_tolerance():
    best = best_point(sweep(Q, F), tolerance=0.01)
    # escalating the two least sure rows (-3.0, -2.0) fixes one of them: as good as the full model alone
    assert best["share_full"] == 2 / 8 and best["accuracy"] == 6 / 8
    # escalating one more (-1.5) beats both models alone, but the best point is the cheapest within tolerance
    assert max(p["accuracy"] for p in sweep(Q, F)) == 7 / 8
    assert best_point(sweep(Q, F), tolerance=0.2)["share_full"] == 0.0  # 5/8 is within 0.2 of 6/8


def test_report_table_and_figure():
    summary, md, csv_rows, fig = report(Q, F, 0.01, ("quantized", "aligned"))
    assert summary["quantized_accuracy"] == 5 / 8 and summary["full_accuracy"] == 6 / 8
    assert summary["best_share_quantized"] == 6 / 8
    assert csv_rows[0] == ["threshold", "share_full", "share_quantized", "accuracy"] and len(csv_rows) == 2 + 8 + 1
    assert "Best operating point" in md and fig.axes


def test_cascade_uses_the_same_exact_match_as_the_suite():
    refs = ['{"a": 1}', '{"a": 2}', '{"a": 3}']
    preds = ['{"a": 1}', ' {"a": 2} ', '{"a": 4}']
    flags = [p.strip() == r.strip() for p, r in zip(preds, refs)]  # how evaluate_model records `correct`
    assert sweep(rows(flags), rows(flags))[0]["accuracy"] == score(preds, refs, json_targets=True)["exact_match"]
