"""Model registry settings: what gets registered and the gates a new version must pass to become `champion`.

Gates are written as text in pipelines.yaml and parsed here, at config-validation time, into `Gate` objects:

    <metric> <op> <number>                         json_validity >= 0.99
    <metric> <op> [<factor> *] <ref> [+|- <delta>]  exact_match >= champion + 0.005, latency_p95_ms <= 1.2 * champion

where <op> is one of >=, >, <=, < and <ref> is `champion` or `base` (the current champion's / the base model's value
of the same metric). Rates are fractions in [0, 1], so deltas are fractions too.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer

from alignpipe.config.base import Section

NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
GATE_RE = re.compile(
    rf"^\s*(?P<metric>[A-Za-z_][\w./-]*)\s*(?P<op>>=|<=|>|<)\s*"
    rf"(?:(?P<value>{NUMBER})|(?:(?P<factor>{NUMBER})\s*\*\s*)?(?P<ref>champion|base)"
    rf"(?:\s*(?P<sign>[+-])\s*(?P<delta>{NUMBER}))?)\s*$"
)
GATE_HELP = ("write a gate as '<metric> <op> <number>' or '<metric> <op> [<factor> *] champion|base [+|- <delta>]' "
             "with <op> one of >=, >, <=, <; e.g. 'exact_match >= champion + 0.005', 'json_validity >= 0.99', "
             "'latency_p95_ms <= 1.2 * champion'")


class Gate(BaseModel):
    """One promotion gate: `metric op factor * ref + delta` (ref None = the absolute number `delta`)."""

    model_config = ConfigDict(frozen=True)

    metric: str
    op: Literal[">=", ">", "<=", "<"]
    ref: Literal["champion", "base"] | None = None
    factor: float = 1.0
    delta: float = 0.0

    @classmethod
    def parse(cls, text: str) -> "Gate":
        """Parse gate text; raises ValueError naming the expected form."""
        m = GATE_RE.match(text) if isinstance(text, str) else None
        if m is None:
            raise ValueError(f"not a gate: {text!r}; {GATE_HELP}")
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

    @field_validator("gates", mode="before")
    @classmethod
    def _parse_gates(cls, value):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ValueError(f"expected a list of gates; {GATE_HELP}")
        gates = []
        for i, gate in enumerate(value):
            try:
                gates.append(Gate.parse(gate) if isinstance(gate, str) else gate)
            except ValueError as exc:
                raise ValueError(f"item {i}: {exc}") from None
        return gates
