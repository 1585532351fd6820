"""Cascade report (FrugalGPT-style): the quantized model answers first; when its confidence is low, the full model.

Confidence is the quantized model's mean token log-prob of its own answer. Sweeping the threshold traces the
curve of accuracy against the share of requests sent to the full model; both ends are the two models' own
scores (threshold -inf: everything served by the quantized model; +inf: everything by the full model).
Works on the per-row predictions the evaluation already recorded, so it costs no extra decoding.
"""

from __future__ import annotations

import math
from typing import Any


def sweep(quantized: list[dict[str, Any]], full: list[dict[str, Any]]) -> list[dict[str, float]]:
    """One point per distinct threshold, from -inf (all quantized) to +inf (all full).

    Args:
        quantized: The quantized model's per-row records (`correct`, `mean_logprob`), in held-out order.
        full: The full-precision model's per-row records (`correct`), same rows, same order.

    Returns:
        Points with `threshold`, `share_full` (fraction sent to the full model) and `accuracy` (exact match).
    """
    if len(quantized) != len(full):
        raise ValueError(f"cascade needs the same rows for both models ({len(quantized)} vs {len(full)})")
    n = max(len(full), 1)
    confidence = [r["mean_logprob"] for r in quantized]
    points = []
    for t in [-math.inf, *sorted(set(confidence)), math.inf]:
        use_full = [c < t for c in confidence]  # below the threshold: escalate
        correct = [f["correct"] if esc else q["correct"] for q, f, esc in zip(quantized, full, use_full)]
        points.append({"threshold": t, "share_full": sum(use_full) / n, "accuracy": sum(correct) / n})
    return points


def best_point(points: list[dict[str, float]], tolerance: float) -> dict[str, float]:
    """The point that sends the fewest requests to the full model with accuracy within `tolerance` of it."""
    full_accuracy = points[-1]["accuracy"]
    ok = [p for p in points if p["accuracy"] >= full_accuracy - tolerance - 1e-12]
    return min(ok, key=lambda p: (p["share_full"], -p["accuracy"]))


def report(quantized: list[dict], full: list[dict], tolerance: float, names: tuple[str, str]):
    """Sweep, best point, markdown table, CSV rows and a PNG figure.

    Returns:
        (summary dict, markdown, csv rows, matplotlib figure).
    """
    points = sweep(quantized, full)
    best = best_point(points, tolerance)
    summary = {"quantized": names[0], "full": names[1], "tolerance": tolerance,
               "quantized_accuracy": points[0]["accuracy"], "full_accuracy": points[-1]["accuracy"],
               "best_threshold": best["threshold"], "best_share_full": best["share_full"],
               "best_share_quantized": 1 - best["share_full"], "best_accuracy": best["accuracy"]}
    header = ["threshold", "share_full", "share_quantized", "accuracy"]
    rows = [[f"{p['threshold']:.4f}", f"{p['share_full']:.4f}", f"{1 - p['share_full']:.4f}", f"{p['accuracy']:.4f}"]
            for p in points]
    md = [f"Cascade: {names[0]} answers first, {names[1]} when the mean token log-prob < threshold.",
          f"Best operating point (accuracy within {tolerance} of {names[1]}): threshold {best['threshold']:.4f}, "
          f"{1 - best['share_full']:.1%} served by {names[0]}, exact match {best['accuracy']:.4f} "
          f"({names[0]} alone {points[0]['accuracy']:.4f}, {names[1]} alone {points[-1]['accuracy']:.4f}).", "",
          "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in _thin(rows, 40)]
    return summary, "\n".join(md) + "\n", [header, *rows], _figure(points, best, names)


def _thin(rows: list, keep: int) -> list:
    """At most `keep` rows for the markdown view, always with both ends (the CSV keeps every row)."""
    if len(rows) <= keep:
        return rows
    step = (len(rows) - 1) / (keep - 1)
    return [rows[round(i * step)] for i in range(keep)]


def _figure(points, best, names):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["share_full"] for p in points], [p["accuracy"] for p in points], marker=".", label="cascade")
    ax.axhline(points[0]["accuracy"], color="tab:orange", ls="--", label=f"{names[0]} alone")
    ax.axhline(points[-1]["accuracy"], color="tab:green", ls="--", label=f"{names[1]} alone")
    ax.scatter([best["share_full"]], [best["accuracy"]], color="red", zorder=3, label="best operating point")
    ax.set_xlabel(f"share of requests sent to {names[1]}")
    ax.set_ylabel("exact match")
    ax.set_xlim(-0.02, 1.02)
    ax.set_title("Cascade: accuracy vs escalation")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
