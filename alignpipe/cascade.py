"""Cascade report (FrugalGPT-style): the quantized model answers first; when its confidence is low, the full model.

Confidence is the quantized model's mean token log-prob of its own answer. Sweeping the threshold traces the
curve of accuracy against the share of requests sent to the full model; both ends are the two models' own
scores (threshold -inf: everything served by the quantized model; +inf: everything by the full model).
Each point also has an expected cost per request: a cascade pays the quantized model on every request and the
full model on the escalated share. The best operating point is the cheapest one within the accuracy tolerance,
serving the full model alone (no cascade) included. Works on the per-row predictions and the cost metrics the
evaluation already recorded, so it costs no extra decoding.
"""

from __future__ import annotations

import math
from typing import Any

COST_UNIT = "ms/token"


def request_cost(metrics: dict[str, float]) -> float:
    """A model's decoding cost per request, from its evaluation metrics: ms per generated token, 1000 / tokens/s.

    tokens/s is every generated token over all decoding time on the held-out rows, a mean, so it adds up across
    requests the way an expected cost must (latency p95 is the wall time of one of the slowest batches, a tail).
    It assumes both models write answers of about the same length (same rows, same greedy decoding).
    """
    tps = metrics.get("tokens_per_s", 0.0)
    if not (isinstance(tps, (int, float)) and math.isfinite(tps) and tps > 0):
        raise ValueError(f"cascade cost needs a measured tokens_per_s > 0, got {tps!r}")
    return 1000.0 / tps


def sweep(quantized: list[dict[str, Any]], full: list[dict[str, Any]],
          costs: tuple[float, float]) -> list[dict[str, float]]:
    """One point per distinct threshold, from -inf (all quantized) to +inf (all full).

    Args:
        quantized: The quantized model's per-row records (`correct`, `mean_logprob`), in held-out order.
        full: The full-precision model's per-row records (`correct`), same rows, same order.
        costs: Cost per request of the quantized and of the full model (same unit for both).

    Returns:
        Points with `threshold`, `share_full` (fraction sent to the full model), `accuracy` (exact match) and
        `expected_cost` (quantized cost + share_full x full cost: the quantized model runs on every request,
        the +inf point included).
    """
    if len(quantized) != len(full):
        raise ValueError(f"cascade needs the same rows for both models ({len(quantized)} vs {len(full)})")
    if not all(math.isfinite(c) and c > 0 for c in costs):
        raise ValueError(f"cascade costs must be finite and > 0, got {costs}")
    n = max(len(full), 1)
    confidence = [r["mean_logprob"] for r in quantized]
    points = []
    for t in [-math.inf, *sorted(set(confidence)), math.inf]:
        use_full = [c < t for c in confidence]  # below the threshold: escalate
        correct = [f["correct"] if esc else q["correct"] for q, f, esc in zip(quantized, full, use_full)]
        share = sum(use_full) / n
        points.append({"threshold": t, "share_full": share, "accuracy": sum(correct) / n,
                       "expected_cost": costs[0] + share * costs[1], "full_only": False})
    return points


def full_alone(points: list[dict[str, float]], costs: tuple[float, float]) -> dict[str, float]:
    """Serving the full model alone, no cascade: its own accuracy at its own cost."""
    return {"threshold": math.inf, "share_full": 1.0, "accuracy": points[-1]["accuracy"],
            "expected_cost": costs[1], "full_only": True}


def best_point(points: list[dict[str, float]], tolerance: float, costs: tuple[float, float]) -> dict[str, float]:
    """The cheapest point with accuracy within `tolerance` of the full model's, serving it alone included.

    Ties go to the higher accuracy, then to the full model alone (one model to run instead of two).
    """
    full_accuracy = points[-1]["accuracy"]
    ok = [p for p in [*points, full_alone(points, costs)] if p["accuracy"] >= full_accuracy - tolerance - 1e-12]
    return min(ok, key=lambda p: (p["expected_cost"], -p["accuracy"], not p["full_only"]))


def verdict(points: list[dict[str, float]], best: dict[str, float], tolerance: float,
            costs: tuple[float, float], names: tuple[str, str]) -> str:
    """The best operating point in words, compared with serving the full model alone."""
    q, f = names
    (cq, cf), aq, af = costs, points[0]["accuracy"], points[-1]["accuracy"]
    if not best["full_only"]:
        return (f"Best operating point (the cheapest with exact match within {tolerance} of {f}): threshold "
                f"{best['threshold']:.4f}, {1 - best['share_full']:.1%} served by {q} alone, exact match "
                f"{best['accuracy']:.4f}, expected cost {best['expected_cost']:.4g} {COST_UNIT} per request, "
                f"{best['expected_cost'] / cf:.2f}x serving {f} alone ({cf:.4g} {COST_UNIT}, exact match {af:.4f}; "
                f"{q} alone {aq:.4f} at {cq:.4g}).")
    head = f"Best operating point: {f} alone, no cascade (exact match {af:.4f}, {cf:.4g} {COST_UNIT} per request). "
    if cq >= cf:
        accuracy = ("and no more accurate" if aq <= af
                    else f"though more accurate ({aq:.4f}), which the tolerance of {tolerance} does not need")
        return head + (f"{q} is slower ({cq:.4g} {COST_UNIT}, {cq / cf:.2f}x {f}) {accuracy}: a cascade pays {q} "
                       f"on every request, so sending it anything costs more than serving {f} alone.")
    ok = [p for p in points if p["accuracy"] >= af - tolerance - 1e-12]
    cheapest = min(ok, key=lambda p: p["expected_cost"])
    return head + (f"{q} is cheaper ({cq / cf:.2f}x {f}) but every cascade point within {tolerance} of {f}'s exact "
                   f"match escalates so much that it costs more (the cheapest: {cheapest['share_full']:.1%} "
                   f"escalated, {cheapest['expected_cost'] / cf:.2f}x {f} alone).")


def report(quantized: list[dict], full: list[dict], tolerance: float, names: tuple[str, str],
           costs: tuple[float, float]):
    """Sweep, best point, markdown table, CSV rows and a PNG figure.

    Args:
        costs: Cost per request of the quantized and the full model, in `COST_UNIT` (see `request_cost`).

    Returns:
        (summary dict, markdown, csv rows, matplotlib figure). The markdown's first paragraph is the verdict.
    """
    points = sweep(quantized, full, costs)
    best = best_point(points, tolerance, costs)
    alone = best if best["full_only"] else full_alone(points, costs)  # the same dict: `chosen` marks it
    text = verdict(points, best, tolerance, costs, names)
    summary = {"quantized": names[0], "full": names[1], "tolerance": tolerance,
               "quantized_accuracy": points[0]["accuracy"], "full_accuracy": points[-1]["accuracy"],
               "cost_unit": COST_UNIT, "quantized_cost": costs[0], "full_cost": costs[1],
               "best_full_only": best["full_only"], "best_threshold": best["threshold"],
               "best_share_full": best["share_full"], "best_share_quantized": 1 - best["share_full"],
               "best_accuracy": best["accuracy"], "best_cost": best["expected_cost"],
               "best_cost_vs_full": best["expected_cost"] / costs[1], "verdict": text}
    header = ["threshold", "share_full", "share_quantized", "accuracy", "expected_cost_ms_per_token",
              "cost_vs_full_alone", "chosen"]

    def row(p):
        threshold = "full only" if p["full_only"] else f"{p['threshold']:.4f}"
        return [threshold, f"{p['share_full']:.4f}", f"{1 - p['share_full']:.4f}", f"{p['accuracy']:.4f}",
                f"{p['expected_cost']:.4f}", f"{p['expected_cost'] / costs[1]:.4f}", "yes" if p is best else ""]

    rows = [row(p) for p in [*points, alone]]
    intro = (f"Cascade: {names[0]} answers first, {names[1]} when the mean token log-prob < threshold; expected "
             f"cost per request = {names[0]}'s cost + share_full x {names[1]}'s, in {COST_UNIT} (1000 / tokens/s).")
    md = [intro, text, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    chosen = next(i for i, r in enumerate(rows) if r[-1])
    md += ["| " + " | ".join(r) + " |" for r in _thin(rows, 40, chosen)]
    return summary, "\n".join(md) + "\n", [header, *rows], _figure(points, alone, best, names)


def _thin(rows: list, keep: int, chosen: int) -> list:
    """At most `keep` rows for the markdown view, always with both ends and the chosen row (the CSV keeps all)."""
    if len(rows) <= keep:
        return rows
    step = (len(rows) - 1) / (keep - 2)
    picked = sorted({round(i * step) for i in range(keep - 1)} | {chosen})
    return [rows[i] for i in picked]


def _figure(points, alone, best, names):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q, f = names
    shares = [p["share_full"] for p in points]
    label = f"best: {f} alone" if best["full_only"] else "best operating point"
    marker = "*" if best["full_only"] else "o"
    fig, (acc, cost) = plt.subplots(1, 2, figsize=(11, 4))
    acc.plot(shares, [p["accuracy"] for p in points], marker=".", label="cascade")
    acc.axhline(points[0]["accuracy"], color="tab:orange", ls="--", label=f"{q} alone")
    acc.axhline(points[-1]["accuracy"], color="tab:green", ls="--", label=f"{f} alone")
    acc.scatter([best["share_full"]], [best["accuracy"]], color="red", marker=marker, s=80, zorder=3, label=label)
    acc.set_ylabel("exact match")
    acc.set_title("Cascade: accuracy vs escalation")
    cost.plot(shares, [p["expected_cost"] for p in points], marker=".", label=f"cascade ({q} on every request)")
    cost.axhline(alone["expected_cost"], color="tab:green", ls="--", label=f"{f} alone")
    cost.scatter([best["share_full"]], [best["expected_cost"]], color="red", marker=marker, s=80, zorder=3,
                 label=label)
    cost.set_ylabel(f"expected cost per request ({COST_UNIT})")
    cost.set_ylim(bottom=0)
    cost.set_title("Cascade: cost vs escalation")
    for ax in (acc, cost):
        ax.set_xlabel(f"share of requests sent to {f}")
        ax.set_xlim(-0.02, 1.02)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
