"""Model registry settings: what gets registered and the gates a new version must pass to become `champion`.

Gates are written as text in pipelines.yaml and parsed here, at config-validation time, into `Gate` objects:

    <metric> <op> <number>                         json_validity >= 0.99
    <metric> <op> [<factor> *] <ref> [+|- <delta>]  exact_match >= champion + 0.005, latency_p95_ms <= 1.2 * champion

where <op> is one of >=, >, <=, < and <ref> is `champion` or `base` (the current champion's / the base model's value
of the same metric). Rates are fractions in [0, 1], so deltas are fractions too.

`register.serve` picks which trained artifact is registered (alignpipe.serving_choice); its quality constraints use
the same form with <ref> `best`: the best candidate's value of that metric (the highest for >= and >, the lowest
for <= and <), e.g. `exact_match >= best - 0.01`.
"""

from __future__ import annotations

import re
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer

from alignpipe.config.base import Section

NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def _rule_re(refs: str) -> re.Pattern:
    """`<metric> <op> <number>` or `<metric> <op> [<factor> *] <ref> [+|- <delta>]`, <ref> one of `refs`."""
    return re.compile(
        rf"^\s*(?P<metric>[A-Za-z_][\w./-]*)\s*(?P<op>>=|<=|>|<)\s*"
        rf"(?:(?P<value>{NUMBER})|(?:(?P<factor>{NUMBER})\s*\*\s*)?(?P<ref>{refs})"
        rf"(?:\s*(?P<sign>[+-])\s*(?P<delta>{NUMBER}))?)\s*$"
    )


GATE_RE = _rule_re("champion|base")
GATE_HELP = ("write a gate as '<metric> <op> <number>' or '<metric> <op> [<factor> *] champion|base [+|- <delta>]' "
             "with <op> one of >=, >, <=, <; e.g. 'exact_match >= champion + 0.005', 'json_validity >= 0.99', "
             "'latency_p95_ms <= 1.2 * champion'")
QUALITY_RE = _rule_re("best")
QUALITY_HELP = ("write a quality constraint as '<metric> <op> <number>' or '<metric> <op> [<factor> *] best "
                "[+|- <delta>]' with <op> one of >=, >, <=, < and `best` the best candidate's value of <metric>; "
                "e.g. 'exact_match >= best - 0.01', 'json_validity >= 0.99', 'perplexity <= 1.05 * best'")


class Gate(BaseModel):
    """One promotion gate: `metric op factor * ref + delta` (ref None = the absolute number `delta`)."""

    model_config = ConfigDict(frozen=True)
    PATTERN: ClassVar[re.Pattern] = GATE_RE
    HELP: ClassVar[str] = GATE_HELP
    KIND: ClassVar[str] = "gate"

    metric: str
    op: Literal[">=", ">", "<=", "<"]
    ref: Literal["champion", "base"] | None = None
    factor: float = 1.0
    delta: float = 0.0

    @classmethod
    def parse(cls, text: str) -> "Gate":
        """Parse gate text; raises ValueError naming the expected form."""
        m = cls.PATTERN.match(text) if isinstance(text, str) else None
        if m is None:
            raise ValueError(f"not a {cls.KIND}: {text!r}; {cls.HELP}")
        if m["value"] is not None:
            return cls(metric=m["metric"], op=m["op"], delta=float(m["value"]))
        delta = float(m["delta"] or 0.0) * (-1.0 if m["sign"] == "-" else 1.0)
        return cls(metric=m["metric"], op=m["op"], ref=m["ref"], factor=float(m["factor"] or 1.0), delta=delta)

    def __str__(self) -> str:
        if self.ref is None:
            return f"{self.metric} {self.op} {self.delta:g}"
        rhs = self.ref if self.factor == 1.0 else f"{self.factor:g} * {self.ref}"
        if self.delta:
            rhs += f" {'+' if self.delta > 0 else '-'} {abs(self.delta):g}"
        return f"{self.metric} {self.op} {rhs}"

    @model_serializer
    def _as_text(self) -> str:  # dumps (params, config digest, --set round trips) show the gate as written
        return str(self)


class Quality(Gate):
    """One quality constraint of `register.serve`: `metric op factor * best + delta` over the candidates."""

    PATTERN: ClassVar[re.Pattern] = QUALITY_RE
    HELP: ClassVar[str] = QUALITY_HELP
    KIND: ClassVar[str] = "quality constraint"
    ref: Literal["best"] | None = None


class ServeConfig(Section):
    """Which trained artifact is registered: the one that serves best on the evaluation hardware, by the figures
    evaluate measured there (alignpipe.serving_choice)."""

    objective: Literal["latency_p95_ms", "tokens_per_s", "size_mb"] = Field(
        "latency_p95_ms", description="What to optimise among the candidates (the trained model and its quantized "
        "form): latency p95 per request (lower), decode tokens/s (higher) or size on disk (lower).")
    quality: list[Quality] = Field(
        default_factory=lambda: [Quality.parse("exact_match >= best - 0.01")],
        description="Constraints a candidate must meet to be chosen, `best` being the best candidate's value "
        "(e.g. 'exact_match >= best - 0.01'); [] = none. When no candidate meets them all, the best on the first "
        "constraint's metric are kept.")
    margin: float = Field(
        0.10, ge=0.0, le=10.0, description="A candidate must beat the others on the objective by more than this "
        "fraction (host speed drifts between runs); among those within it of the best, the smaller artifact "
        "(size_mb) wins.")

    @field_validator("quality", mode="before")
    @classmethod
    def _parse_quality(cls, value):
        return _parse_rules(Quality, value)


def _parse_rules(kind: type[Gate], value) -> list:
    """A list (or one) of rule texts -> parsed rules; the error names the item and the expected form."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ValueError(f"expected a list of {kind.KIND}s; {kind.HELP}")
    rules = []
    for i, rule in enumerate(value):
        try:
            rules.append(kind.parse(rule) if isinstance(rule, str) else rule)
        except ValueError as exc:
            raise ValueError(f"item {i}: {exc}") from None
    return rules


class RegisterConfig(Section):
    enabled: bool = Field(True, description="Register the final model in the MLflow Model Registry.")
    alias: str = Field("challenger", description="Alias every new version gets before the gates are checked.")
    adapter_only: bool = Field(
        False, description="Register the adapter plus a pinned reference to the base model instead of merged "
        "weights (smaller; the serving host needs peft and the base model).")
    primary_metric: str = Field(
        "exact_match", description="Metric the registered model must strictly beat the base model on to be promoted.")
    gates: list[Gate] = Field(
        default_factory=list, description="Promotion gates, all of which must pass for the new version to become "
        "`champion` (as text, e.g. 'exact_match >= champion + 0.005'). The first version ever registered is "
        "checked with `champion` read as `base`.")
    promote: bool = Field(True, description="Check the gates and move `champion` right after registering.")
    lock_url: str | None = Field(
        None, exclude=True,  # holds a password: never in logged params or the config digest
        description="PostgreSQL database (libpq URL) whose advisory locks serialise version creation and alias "
        "moves on an MLflow server, e.g. the one behind it (env ALIGNPIPE_REGISTRY_LOCK_URL; `alignpipe env` "
        "exports the local stack's). Unset: the Prefect server's global concurrency limits, else this machine only. "
        "Local MLflow stores always use a file lock.")
    lock_lease_seconds: float = Field(
        30.0, ge=2, le=3600, description="A hung promotion frees the registry this long after its last renewal.")
    serve: ServeConfig = Field(
        default_factory=ServeConfig, description="Which artifact is registered: the trained model or its quantized "
        "form, whichever serves better on the evaluation hardware under a quality constraint.")

    @field_validator("gates", mode="before")
    @classmethod
    def _parse_gates(cls, value):
        return _parse_rules(Gate, value)
