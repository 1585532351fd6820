"""infra/ manifests: each validates against its published schema (vendored in tests/infra/schemas, see SOURCES.md),
names the services the stack needs, binds published ports to 127.0.0.1, puts MLflow and Prefect behind
authentication and holds no literal secrets. Nothing is started: these are parse-and-check tests."""

import copy
import functools
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from testlib import REPO

INFRA = REPO / "infra"
SCHEMAS = Path(__file__).parent / "schemas"
COMPOSE = INFRA / "docker-compose.yml"
KUBERAY = INFRA / "kuberay" / "raycluster.yaml"
RAY_CLUSTER = INFRA / "ray" / "cluster.yaml"
K8S = INFRA / "k8s"
KUBERNETES_TYPES = {("apps/v1", "Deployment"): "io.k8s.api.apps.v1.Deployment", ("v1", "Service"): "io.k8s.api.core.v1.Service"}

# Environment keys whose values are credentials: each must come from the environment (.env / a Secret), never a literal.
SECRET_KEY = re.compile(r"(PASSWORD|SECRET|TOKEN|AUTH_STRING|ACCESS_KEY)", re.I)
INTERPOLATED = re.compile(r"^\$\{[A-Z0-9_]+(:?[-?][^}]*)?\}$")


def _load(path: Path):
    return yaml.safe_load(path.read_text())


def _schema(name: str) -> dict:
    return json.loads((SCHEMAS / name).read_text())


@functools.cache  # building a validator checks the schema itself: once per session is enough
def _compose_validator():
    schema = _schema("compose-spec.json")
    assert schema["$schema"] == "https://json-schema.org/draft-07/schema"
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


@functools.cache
def _kuberay_validator():
    schema = _schema("kuberay-raycluster-v1.excerpt.json")
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


@functools.cache
def _kubernetes_validator(definition: str):
    """Strict Kubernetes v1.37 schema of one type (e.g. io.k8s.api.apps.v1.Deployment): unknown keys fail too."""
    schema = {**_schema("kubernetes-v1.37.0-strict-subset.json"), "$ref": f"#/$defs/{definition}"}
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _pod_template_validator():
    return _kubernetes_validator("io.k8s.api.core.v1.PodTemplateSpec")


@functools.cache
def _ray_validator():
    schema = _schema("ray-schema.json")
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _errors(validator, doc) -> list[str]:
    return [f"{e.json_path}: {e.message}" for e in validator.iter_errors(doc)]


@pytest.fixture(scope="module")
def compose() -> dict:
    return _load(COMPOSE)


@pytest.fixture(scope="module")
def raycluster() -> dict:
    return _load(KUBERAY)


@pytest.fixture(scope="module")
def launcher() -> dict:
    return _load(RAY_CLUSTER)


# --- vendored schemas -------------------------------------------------------------------------------------------------

def test_vendored_schemas_match_their_recorded_checksums():
    """SOURCES.md records where each schema came from and its sha256; a silent edit of a schema fails here."""
    recorded = {}
    for row in (SCHEMAS / "SOURCES.md").read_text().splitlines():
        if m := re.match(r"\| `([\w.-]+\.json)` \|", row):  # a table row; its last sha256 is the vendored file's
            recorded[m.group(1)] = re.findall(r"sha256 `([0-9a-f]{64})`", row)[-1]
    vendored = sorted(p.name for p in SCHEMAS.glob("*.json"))
    assert sorted(recorded) == vendored
    for name, digest in recorded.items():
        assert hashlib.sha256((SCHEMAS / name).read_bytes()).hexdigest() == digest, name


def test_vendored_ray_schema_is_the_installed_rays():
    """The cluster-config schema ships inside the ray wheel: the vendored copy must be the pinned Ray's."""
    import ray.autoscaler

    installed = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    assert json.loads(installed.read_text()) == _schema("ray-schema.json")


# --- docker-compose.yml -----------------------------------------------------------------------------------------------

def test_compose_validates_against_compose_spec(compose):
    assert _errors(_compose_validator(), compose) == []


@pytest.mark.parametrize(
    "break_it",
    [
        pytest.param(lambda c: c["services"]["mlflow"].update(prots=["127.0.0.1:5000:5000"]), id="unknown-service-key"),
        pytest.param(lambda c: c["services"]["postgres"].update(image=16), id="image-not-a-string"),
        pytest.param(lambda c: c["services"]["prefect-server"]["depends_on"]["postgres"].update(condition="ready"),
                     id="bad-depends-on-condition"),
        pytest.param(lambda c: c["services"]["mlflow"]["healthcheck"].update(interval=15), id="interval-not-a-duration"),
        pytest.param(lambda c: c["services"]["minio"].update(restart=["always"]), id="restart-not-a-string"),
        pytest.param(lambda c: c.update(servics={}), id="unknown-top-level-key"),
    ],
)
def test_compose_spec_rejects_a_broken_file(compose, break_it):
    broken = copy.deepcopy(compose)
    break_it(broken)
    assert _errors(_compose_validator(), broken)


def _compose_cli() -> list[str] | None:
    if standalone := shutil.which("docker-compose"):
        return [standalone]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


def test_docker_compose_itself_accepts_the_stack():
    """Where Docker Compose v2 is installed, its own parser (interpolation, merge keys, schema) has the last word."""
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no docker compose here: the schema tests above stand in for it")
    base = [*cli, "-f", str(COMPOSE)]
    ok = subprocess.run([*base, "--env-file", str(INFRA / ".env.example"), "config", "--quiet"],
                        capture_output=True, text=True, env={})  # no variables of ours leak in
    assert ok.returncode == 0, ok.stderr
    # Without the env file a required secret is missing: compose refuses and says where to set it.
    missing = subprocess.run([*base, "config", "--quiet"], capture_output=True, text=True, env={})
    assert missing.returncode != 0 and "is missing a value: set" in missing.stderr and "infra/.env" in missing.stderr


def test_compose_names_the_stack_services(compose):
    services = compose["services"]
    assert {"postgres", "minio", "minio-init", "prefect-server", "prefect-worker", "mlflow", "ray-head",
            "ray-worker"} <= set(services)
    assert services["postgres"]["image"] == "postgres:16"
    assert services["prefect-server"]["image"] == "prefecthq/prefect:3.8.8-python3.11"
    assert services["minio"]["image"].startswith("minio/minio:RELEASE.")
    assert (INFRA / "compose" / "mlflow.Dockerfile").read_text().count("FROM ghcr.io/mlflow/mlflow:v3.17.2") == 1
    assert services["ray-worker"]["deploy"]["replicas"] >= 1
    assert services["ray-head"]["command"][:3] == ["ray", "start", "--head"]
    assert "--address=ray-head:6379" in services["ray-worker"]["command"]
    assert services["prefect-worker"]["command"][:3] == ["prefect", "worker", "start"]
    # The worker and every Ray node run the one alignpipe image built from infra/Dockerfile.
    for name in ("prefect-worker", "ray-head", "ray-worker"):
        assert services[name]["build"]["dockerfile"] == "infra/Dockerfile", name
        assert services[name]["image"] == services["ray-head"]["image"], name


def test_compose_shares_the_workdir_between_the_worker_and_every_ray_node(compose):
    """Stages hand each other paths: the node running the next stage must see the previous stage's files."""
    mounts = {name: set(compose["services"][name].get("volumes", [])) for name in ("prefect-worker", "ray-head",
                                                                                  "ray-worker")}
    shared = set.intersection(*mounts.values())
    assert "alignpipe-work:/home/ray/alignpipe/.alignpipe" in shared
    assert "alignpipe-work" in compose["volumes"]


def test_compose_images_are_pinned(compose):
    for name, svc in compose["services"].items():
        if "build" in svc and "image" in svc and svc["image"].startswith("${"):
            continue  # built here; the tag names the local build
        ref = svc["image"]
        assert ":" in ref and not ref.endswith(":latest"), f"{name}: pin a tag, not {ref!r}"


def test_compose_publishes_ports_on_loopback_only(compose):
    published = {}
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name} publishes {port!r} beyond loopback"
            published[int(port.split(":")[1])] = name
    assert published == {9000: "minio", 9001: "minio", 4200: "prefect-server", 5000: "mlflow", 8265: "ray-head",
                         10001: "ray-head"}


def test_compose_services_have_healthchecks_and_wait_on_them(compose):
    services = compose["services"]
    for name, svc in services.items():
        if name != "minio-init":  # one-shot job: "completed successfully" is its health
            assert svc["healthcheck"]["test"], name
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy but it has no healthcheck"
    assert services["mlflow"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"


def test_compose_mlflow_uses_postgres_minio_and_basic_auth(compose):
    mlflow = compose["services"]["mlflow"]
    cmd, env = mlflow["command"], mlflow["environment"]
    assert "--app-name=basic-auth" in cmd
    assert "--serve-artifacts" in cmd
    assert any(a.startswith("--artifacts-destination=s3://") for a in cmd)
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert INTERPOLATED.match(env["MLFLOW_AUTH_ADMIN_PASSWORD"])
    ini = (INFRA / "compose" / "mlflow-basic-auth.ini").read_text()
    assert "admin_password" not in ini  # the admin password comes from the environment only
    assert "authenticate_request_basic_auth" in ini
    # Clients (the Prefect worker runs the flows) log in with MLflow's standard client variables.
    worker_env = compose["services"]["prefect-worker"]["environment"]
    assert worker_env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(worker_env)


def test_compose_prefect_is_behind_an_auth_string(compose):
    server = compose["services"]["prefect-server"]["environment"]
    worker = compose["services"]["prefect-worker"]["environment"]
    assert INTERPOLATED.match(server["PREFECT_SERVER_API_AUTH_STRING"])
    # The worker presents the same credential the server checks.
    assert worker["PREFECT_API_AUTH_STRING"] == server["PREFECT_SERVER_API_AUTH_STRING"]
    assert worker["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert server["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")


def test_compose_ray_nodes_require_a_token(compose):
    for name in ("ray-head", "ray-worker", "prefect-worker"):
        env = compose["services"][name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token", name
        assert INTERPOLATED.match(env["RAY_AUTH_TOKEN"]), name


def _environment_items(compose):
    for name, svc in compose["services"].items():
        env = svc.get("environment") or {}
        items = env.items() if isinstance(env, dict) else (e.split("=", 1) for e in env)
        for key, value in items:
            yield name, key, str(value)


def test_compose_holds_no_literal_secrets(compose):
    for name, key, value in _environment_items(compose):
        if SECRET_KEY.search(key):
            assert INTERPOLATED.match(value), f"{name}.{key} must come from infra/.env, not a literal"
    # Credentials inside URLs (database DSNs) too.
    for user_pass in re.findall(r"://([^/@\s\"']+)@", COMPOSE.read_text()):
        password = user_pass.split(":", 1)[1]
        assert INTERPOLATED.match(password), f"literal password in a URL: {user_pass}"


def test_env_example_lists_every_required_variable_with_placeholders():
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", COMPOSE.read_text()))
    example = dict(
        line.split("=", 1) for line in (INFRA / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert required and required <= set(example), f"missing from .env.example: {required - set(example)}"
    for key, value in example.items():
        if SECRET_KEY.search(key):
            assert "change-me" in value, f".env.example ships a real-looking value for {key}"
    assert "/infra/.env" in (REPO / ".gitignore").read_text().splitlines()


def test_dockerfile_installs_pinned_torch_then_the_lock_then_the_project():
    text = (INFRA / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=rayproject/ray:2.60.0-py311-cpu" in text
    torch = text.index("pip install torch==2.13.0 --index-url")
    lock = text.index("pip install -r requirements.lock")
    project = text.index("pip install --no-deps .")
    assert torch < lock < project


# --- kuberay/raycluster.yaml -------------------------------------------------------------------------------------------

def test_raycluster_validates_against_kuberay_crd_schema(raycluster):
    assert _errors(_kuberay_validator(), raycluster) == []


@pytest.mark.parametrize(
    "break_it",
    [
        pytest.param(lambda m: m["spec"]["workerGroupSpecs"][1].pop("maxReplicas"), id="worker-group-without-max"),
        pytest.param(lambda m: m["spec"]["workerGroupSpecs"][0].update(replicas="one"), id="replicas-not-int"),
        pytest.param(lambda m: m["spec"]["autoscalerOptions"].update(upscalingMode="Fast"), id="unknown-upscaling"),
        pytest.param(lambda m: m["spec"]["headGroupSpec"]["template"]["spec"].pop("containers"), id="no-containers"),
        pytest.param(lambda m: m.update(apiVersion="ray.io/v1alpha1"), id="old-api-version"),
    ],
)
def test_kuberay_schema_rejects_a_broken_cluster(raycluster, break_it):
    broken = copy.deepcopy(raycluster)
    break_it(broken)
    assert _errors(_kuberay_validator(), broken)


def _templates(raycluster: dict) -> dict[str, dict]:
    spec = raycluster["spec"]
    return {"head": spec["headGroupSpec"]["template"], **{g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]}}


def test_raycluster_pod_templates_validate_against_kubernetes_podtemplatespec(raycluster):
    """The KubeRay excerpt leaves the pod template open; the strict Kubernetes schema checks it (unknown keys too)."""
    validator = _pod_template_validator()
    for group, template in _templates(raycluster).items():
        assert _errors(validator, template) == [], group


@pytest.mark.parametrize(
    "break_it",
    [
        pytest.param(lambda t: t["spec"]["tolerations"][0].update(efect="NoSchedule"), id="misspelt-toleration-key"),
        pytest.param(lambda t: t["spec"]["containers"][0]["resources"]["limits"].update({"nvidia.com/gpu": [1]}),
                     id="gpu-quantity-not-a-quantity"),
        pytest.param(lambda t: t["spec"]["containers"][0].pop("name"), id="container-without-name"),
    ],
)
def test_kubernetes_schema_rejects_a_broken_pod_template(raycluster, break_it):
    broken = copy.deepcopy(_templates(raycluster)["gpu"])
    break_it(broken)
    assert _errors(_pod_template_validator(), broken)


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def test_raycluster_has_head_cpu_and_gpu_groups(raycluster):
    spec = raycluster["spec"]
    assert spec["rayVersion"] == "2.60.0"
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    gpu = _containers(groups["gpu"])[0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert gpu["resources"]["requests"]["nvidia.com/gpu"] == gpu["resources"]["limits"]["nvidia.com/gpu"]
    assert gpu["image"].endswith("ray2.60.0-py311-gpu")
    tolerations = groups["gpu"]["template"]["spec"]["tolerations"]
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in tolerations)
    cpu = _containers(groups["cpu"])[0]
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]
    assert cpu["image"].endswith("ray2.60.0-py311-cpu")


def test_raycluster_takes_secrets_from_a_kubernetes_secret(raycluster):
    spec = raycluster["spec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        for c in _containers(group):
            assert {"secretRef": {"name": "alignpipe-secrets"}} in c["envFrom"]
            for env in c.get("env", []):
                assert not (SECRET_KEY.search(env["name"]) and "value" in env), env["name"]


# --- ray/cluster.yaml --------------------------------------------------------------------------------------------------

def test_launcher_config_validates_against_ray_schema(launcher):
    assert _errors(_ray_validator(), launcher) == []


def test_launcher_config_passes_rays_own_validation(launcher):
    """What `ray up` runs before launching anything: defaults filled in for the provider, then validated."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(launcher)))


@pytest.mark.parametrize(
    "break_it",
    [
        pytest.param(lambda c: c.pop("provider"), id="no-provider"),
        pytest.param(lambda c: c["available_node_types"]["gpu_worker"].pop("resources"), id="node-type-no-resources"),
        pytest.param(lambda c: c.update(max_workers="eight"), id="max-workers-not-int"),
        pytest.param(lambda c: c.update(setup_comands=[]), id="unknown-key"),
    ],
)
def test_ray_schema_rejects_a_broken_launcher_config(launcher, break_it):
    broken = copy.deepcopy(launcher)
    break_it(broken)
    assert _errors(_ray_validator(), broken)


def test_rays_validation_rejects_an_unknown_head_type(launcher):
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(launcher)
    broken["head_node_type"] = "gpu-head"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(broken))


def test_launcher_config_has_cpu_and_gpu_types_and_installs_the_project(launcher):
    types = launcher["available_node_types"]
    assert set(types) == {"head", "cpu_worker", "gpu_worker"}
    assert launcher["head_node_type"] == "head"
    assert launcher["docker"]["image"] == "rayproject/ray:2.60.0-py311-cpu"
    assert types["gpu_worker"]["docker"]["worker_image"] == "rayproject/ray:2.60.0-py311-gpu"
    assert launcher["file_mounts"]["/home/ray/alignpipe"] == "."
    for commands, torch_index in [
        (launcher["head_setup_commands"], "/whl/cpu"),
        (launcher["worker_setup_commands"], "/whl/cpu"),
        (types["gpu_worker"]["worker_setup_commands"], "/whl/cu"),
    ]:
        assert commands[0].startswith("pip install -q torch==2.13.0") and torch_index in commands[0]
        assert "requirements.lock" in commands[1]
        assert commands[2].endswith("--no-deps -e /home/ray/alignpipe")
    assert any("--dashboard-host=127.0.0.1" in c for c in launcher["head_start_ray_commands"])
    text = RAY_CLUSTER.read_text()
    assert not re.search(r"(PASSWORD|SECRET|TOKEN)\s*[:=]\s*\S", text), "secrets belong in the synced env file"


# --- k8s/ (MLflow and the Prefect worker on Kubernetes) ----------------------------------------------------------------

def _k8s_documents() -> dict[tuple[str, str], dict]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


def test_k8s_manifests_validate_against_kubernetes_schemas():
    docs = _k8s_documents()
    assert set(docs) == {("Deployment", "mlflow"), ("Service", "mlflow"), ("Deployment", "alignpipe-prefect-worker")}
    for (kind, name), doc in docs.items():
        validator = _kubernetes_validator(KUBERNETES_TYPES[(doc["apiVersion"], kind)])
        assert _errors(validator, doc) == [], f"{kind}/{name}"


@pytest.mark.parametrize(
    "break_it",
    [
        pytest.param(lambda d: d["spec"].update(replica=1), id="misspelt-replicas"),
        pytest.param(lambda d: d["spec"].pop("selector"), id="no-selector"),
        pytest.param(lambda d: d.update(apiVersion="extensions/v1beta1"), id="removed-api-version"),
    ],
)
def test_kubernetes_schema_rejects_a_broken_deployment(break_it):
    broken = copy.deepcopy(_k8s_documents()[("Deployment", "mlflow")])
    break_it(broken)
    assert _errors(_kubernetes_validator("io.k8s.api.apps.v1.Deployment"), broken)


def test_k8s_mlflow_is_behind_basic_auth_and_in_cluster_only():
    docs = _k8s_documents()
    server = docs[("Deployment", "mlflow")]["spec"]["template"]["spec"]["containers"][0]
    assert "--app-name=basic-auth" in server["args"] and "--serve-artifacts" in server["args"]
    assert {"secretRef": {"name": "mlflow-secrets"}} in server["envFrom"]
    assert docs[("Service", "mlflow")]["spec"]["type"] == "ClusterIP"
    worker = docs[("Deployment", "alignpipe-prefect-worker")]["spec"]["template"]["spec"]["containers"][0]
    assert {"secretRef": {"name": "prefect-worker-secrets"}} in worker["envFrom"]
    assert worker["args"][:3] == ["prefect", "worker", "start"]
    for container in (server, worker):
        for env in container.get("env", []):
            assert not (SECRET_KEY.search(env["name"]) and "value" in env), env["name"]

