"""Which trained artifact to register: the one that serves best on the evaluation hardware, by measured figures.

Reads the evaluation's figures (label -> metric -> value) for the candidates (the trained model and its quantized
form; never the base model) and `register.serve`; returns the winner and the decision table. Pure: no MLflow, no
Ray. The rule, in order:

1. Quality: a candidate must meet every `register.serve.quality` constraint, `best` being the best candidate's
   value of that metric. When none meets them all, the candidates best on the first constraint's metric stay in.
2. Objective: among those, every candidate within `margin` of the best on `register.serve.objective` is a
   contender (a candidate must win by more than the margin: host speed drifts between runs).
3. Size: the smallest contender (size_mb) wins; ties go to the better objective, then to the order given.

Quality is compared on the rows every candidate was scored on: when the evaluation screened the quantized model on
fewer rows than the model it was made from, `shared` holds both models' quality figures on those rows.

A candidate without a finite figure for the objective, size_mb or a quality metric is an error (ConfigError naming
the metric and what evaluation did measure), never a silent pick: a typo in `register.serve.quality` must not
decide what gets served.
"""

from __future__ import annotations

import math

from pydantic import BaseModel

from alignpipe.config.register import Quality, ServeConfig
from alignpipe.errors import ConfigError

SIZE = "size_mb"
HIGHER_IS_BETTER = {"latency_p95_ms": False, "tokens_per_s": True, "size_mb": False}  # the objectives
UNITS = {"latency_p95_ms": "ms", "tokens_per_s": "tokens/s", "size_mb": "MB"}
_SLACK = 1e-9  # a ratio of exactly 1 + margin is within the margin, whatever the float rounding


class Candidate(BaseModel):
    label: str
    figures: dict[str, float]   # the objective, size_mb and each quality metric, as measured
    eligible: bool              # met every quality constraint (or was kept as the best when none did)
    note: str                   # why it won, or why not


class ServingChoice(BaseModel):
    winner: str                 # label of the artifact to register
    reason: str                 # one line: why it won
    objective: str
    margin: float
    quality: list[str]
    candidates: list[Candidate]
    quality_rows: int | None = None  # quality compared on the first N held-out rows (every candidate's); None = all

    def markdown(self) -> str:
        """The decision table (a markdown section) for the register run and the flow's summary."""
        metrics = list(self.candidates[0].figures) if self.candidates else []
        lines = [f"**Registered: `{self.winner}`**: {self.reason}", "",
                 (f"Objective `{self.objective}`, margin {self.margin:.0%}, quality: "
                  f"{', '.join(f'`{q}`' for q in self.quality) or 'none'}"
                  + (f", compared on the first {self.quality_rows} held-out rows (the rows every candidate was "
                     f"scored on)." if self.quality_rows else ".")), "",
                 "| candidate | " + " | ".join(metrics) + " | eligible | note |",
                 "|---|" + "---:|" * len(metrics) + "---|---|"]
        for c in self.candidates:
            cells = " | ".join(_num(c.figures[m]) for m in metrics)
            lines.append(f"| {c.label} | {cells} | {'yes' if c.eligible else 'no'} | {c.note} |")
        return "\n".join(lines) + "\n"


def choose(labels: list[str], metrics: dict[str, dict[str, float]], serve: ServeConfig,
           shared: dict[str, dict[str, float]] | None = None) -> ServingChoice:
    """Pick the artifact to register among `labels` from their measured figures.

    Args:
        labels: The candidates' evaluation labels, the full-precision model first (e.g. ["aligned", "quantized"]).
        metrics: Evaluation figures, label -> metric -> value (`EvalOutput.metrics`).
        serve: `register.serve`: the objective, the quality constraints and the margin.
        shared: Quality figures on the rows every candidate was scored on (`EvalOutput.shared`), label -> metric
            -> value (with `rows`); used for the quality constraints when it covers every candidate.

    Returns:
        The winner and the decision table (each candidate, its figures, eligible or not, and why).
    """
    if not labels:
        raise ValueError("no candidate artifact to choose from")
    if len(set(labels)) != len(labels):
        raise ValueError(f"candidate labels repeat: {labels}")
    objective = serve.objective
    needed = list(dict.fromkeys([objective, SIZE, *(q.metric for q in serve.quality)]))
    paired = bool(shared) and all(label in shared for label in labels)
    quality_metrics = [m for m in dict.fromkeys(q.metric for q in serve.quality) if m not in (objective, SIZE)]
    figures = {label: {**_figures(label, metrics, [objective, SIZE]),
                       **_figures(label, shared if paired else metrics, quality_metrics)} for label in labels}
    figures = {label: {m: figures[label][m] for m in needed} for label in labels}

    failures = {label: [] for label in labels}
    for q in serve.quality:
        threshold = _threshold(q, [figures[label][q.metric] for label in labels])
        for label in labels:
            value = figures[label][q.metric]
            if not _holds(value, q.op, threshold):
                failures[label].append(f"fails `{q}`: {_num(value)} against {_num(threshold)}")
    pool = [label for label in labels if not failures[label]]
    kept = ""
    if not pool:  # only with absolute thresholds or a factor: keep the best on the first constraint's metric
        first = serve.quality[0]
        best = _best(first, [figures[label][first.metric] for label in labels])
        pool = [label for label in labels if figures[label][first.metric] == best]
        kept = f"no candidate meets every quality constraint; kept the best on {first.metric} ({_num(best)}); "

    higher = HIGHER_IS_BETTER[objective]
    top = (max if higher else min)(figures[label][objective] for label in pool)
    ratio = {label: _ratio(figures[label][objective], top, higher) for label in pool}
    contenders = [label for label in pool if ratio[label] <= 1 + serve.margin + _SLACK]
    winner = min(contenders, key=lambda label: (figures[label][SIZE], ratio[label], labels.index(label)))

    def fig(label: str, metric: str = objective) -> str:
        return f"{_num(figures[label][metric])} {UNITS.get(metric, '')}".rstrip()

    notes = {}
    for label in labels:
        if label not in pool:
            notes[label] = "; ".join(failures[label])
        elif label == winner:
            notes[label] = "registered"
        elif label in contenders:
            notes[label] = f"within {serve.margin:.0%} on {objective}, larger ({fig(label, SIZE)})"
        else:
            notes[label] = f"{ratio[label]:.2f}x worse on {objective} than the best, beyond the {serve.margin:.0%} margin"
        if label in pool and failures[label]:  # kept as the best on the first constraint's metric
            notes[label] += "; kept although it " + "; ".join(failures[label])

    others = [label for label in pool if label != winner]
    if len(labels) == 1:
        reason = f"the only candidate ({objective} {fig(winner)})"
    elif not others:
        reason = f"the only candidate {'kept' if kept else 'that meets the quality constraints'} " \
                 f"({objective} {fig(winner)})"
    elif len(contenders) == 1:
        beaten = ", ".join(f"{label} {fig(label)}" for label in others)
        reason = (f"best on {objective} by more than the {serve.margin:.0%} margin: {fig(winner)} against {beaten}")
    else:
        rivals = ", ".join(f"{label} {fig(label)}" for label in contenders if label != winner)
        reason = (f"within {serve.margin:.0%} of the best on {objective} ({fig(winner)} against {rivals}): "
                  f"the smaller artifact wins ({fig(winner, SIZE)})")
    excluded = [label for label in labels if label not in pool]
    if excluded and not kept:
        reason += "; excluded by the quality constraints: " + ", ".join(excluded)
    return ServingChoice(
        winner=winner, reason=kept + reason, objective=objective, margin=serve.margin,
        quality=[str(q) for q in serve.quality],
        quality_rows=int(min(shared[label].get("rows", 0) for label in labels)) or None if paired else None,
        candidates=[Candidate(label=label, figures=figures[label], eligible=label in pool, note=notes[label])
                    for label in labels])


def within_reach(challenger: dict[str, float], rival: dict[str, float], serve: ServeConfig) -> bool:
    """Could `challenger` still win against `rival` on the objective: is it better, or within the margin of it?

    The evaluation asks this of a quantized model scored on a screen of rows (its speed is already measured there)
    before it scores every row: one slower beyond the margin cannot be registered, whatever its quality.
    A figure missing or not finite counts as within reach (the full evaluation decides).
    """
    try:
        mine, theirs = float(challenger[serve.objective]), float(rival[serve.objective])
    except (KeyError, TypeError, ValueError):
        return True
    if not (math.isfinite(mine) and math.isfinite(theirs)):
        return True
    higher = HIGHER_IS_BETTER[serve.objective]
    return _ratio(mine, (max if higher else min)(mine, theirs), higher) <= 1 + serve.margin + _SLACK


def _figures(label: str, metrics: dict[str, dict[str, float]], needed: list[str]) -> dict[str, float]:
    """The figures the choice reads, each finite, or a ConfigError naming what is missing and what exists."""
    measured = metrics.get(label) or {}
    out = {}
    for metric in needed:
        value = measured.get(metric)
        try:
            value = float(value)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            have = ", ".join(sorted(measured)) or "nothing"
            raise ConfigError(
                f"register.serve needs {metric!r} for every candidate, but evaluation "
                f"{'measured ' + repr(measured.get(metric)) if metric in measured else 'did not measure it'} for "
                f"{label!r} (measured: {have}); name a metric evaluate reports in register.serve.quality")
        out[metric] = value
    return out


def _num(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 1e4 else f"{value:.4g}"


def _best(q: Quality, values: list[float]) -> float:
    """The best value for a constraint: the highest for >= and >, the lowest for <= and <."""
    return max(values) if q.op in (">=", ">") else min(values)


def _threshold(q: Quality, values: list[float]) -> float:
    return q.delta if q.ref is None else q.factor * _best(q, values) + q.delta


def _holds(value: float, op: str, threshold: float) -> bool:
    # a constraint written against `best` holds for the best itself, whatever the float rounding of the delta
    slack = _SLACK * max(1.0, abs(threshold))
    return {">=": value >= threshold - slack, ">": value > threshold, "<=": value <= threshold + slack,
            "<": value < threshold}[op]


def _ratio(value: float, top: float, higher: bool) -> float:
    """How many times worse than the best `value` is (1.0 = the best)."""
    worse, better = (top, value) if higher else (value, top)
    if better > 0:
        return worse / better
    return 1.0 if worse == better else math.inf
