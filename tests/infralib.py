"""Paths, validators and checks shared by the infra manifest tests (tests/infra): each validator is built from a
schema vendored in tests/infra/schemas (sources and checksums in SOURCES.md there)."""

import functools
import json
import re
from pathlib import Path

import jsonschema
import yaml
from testlib import REPO

INFRA = REPO / "infra"
SCHEMAS = REPO / "tests" / "infra" / "schemas"
COMPOSE = INFRA / "docker-compose.yml"
KUBERAY = INFRA / "kuberay" / "raycluster.yaml"
RAY_CLUSTER = INFRA / "ray" / "cluster.yaml"
K8S = INFRA / "k8s"
KUBERNETES_TYPES = {
    ("apps/v1", "Deployment"): "io.k8s.api.apps.v1.Deployment",
    ("v1", "Service"): "io.k8s.api.core.v1.Service",
}

# Environment keys whose values are credentials: each must come from the environment (.env / a Secret), never a literal.
SECRET_KEY = re.compile(r"(PASSWORD|SECRET|TOKEN|AUTH_STRING|ACCESS_KEY)", re.I)
INTERPOLATED = re.compile(r"^\$\{[A-Z0-9_]+(:?[-?][^}]*)?\}$")


def load(path: Path):
    """One YAML document."""
    return yaml.safe_load(path.read_text())


def vendored_schema(name: str) -> dict:
    return json.loads((SCHEMAS / name).read_text())


@functools.cache  # building a validator checks the schema itself: once per session is enough
def compose_validator():
    schema = vendored_schema("compose-spec.json")
    assert schema["$schema"] == "https://json-schema.org/draft-07/schema"
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


@functools.cache
def kuberay_validator():
    schema = vendored_schema("kuberay-raycluster-v1.excerpt.json")
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


@functools.cache
def kubernetes_validator(definition: str):
    """Strict Kubernetes v1.37 schema of one type (e.g. io.k8s.api.apps.v1.Deployment): unknown keys fail too."""
    schema = {**vendored_schema("kubernetes-v1.37.0-strict-subset.json"), "$ref": f"#/$defs/{definition}"}
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def pod_template_validator():
    return kubernetes_validator("io.k8s.api.core.v1.PodTemplateSpec")


@functools.cache
def ray_validator():
    schema = vendored_schema("ray-schema.json")
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def errors(validator, doc) -> list[str]:
    return [f"{e.json_path}: {e.message}" for e in validator.iter_errors(doc)]
