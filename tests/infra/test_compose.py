"""infra/docker-compose.yml: valid Compose (the spec's schema, and docker compose itself where installed), the
services the stack needs, ports on 127.0.0.1 only, MLflow/Prefect/Ray behind credentials, no literal secrets."""

import copy
import re
import shutil
import subprocess

import pytest
from infralib import (
    COMPOSE,
    INFRA,
    INTERPOLATED,
    SECRET_KEY,
    compose_validator,
    errors,
    load,
)
from testlib import REPO


@pytest.fixture(scope="module")
def compose() -> dict:
    return load(COMPOSE)


def test_compose_validates_against_compose_spec(compose):
    assert errors(compose_validator(), compose) == []


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
    assert errors(compose_validator(), broken)


def _compose_cli() -> list[str] | None:
    if standalone := shutil.which("docker-compose"):
        return [standalone]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], check=False, capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


def test_docker_compose_itself_accepts_the_stack():
    """Where Docker Compose v2 is installed, its own parser (interpolation, merge keys, schema) has the last word."""
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no docker compose here: the schema tests above stand in for it")
    base = [*cli, "-f", str(COMPOSE)]
    ok = subprocess.run([*base, "--env-file", str(INFRA / ".env.example"), "config", "--quiet"],
                        check=False, capture_output=True, text=True, env={})  # no variables of ours leak in
    assert ok.returncode == 0, ok.stderr
    # Without the env file a required secret is missing: compose refuses and says where to set it.
    missing = subprocess.run([*base, "config", "--quiet"], check=False, capture_output=True, text=True, env={})
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
    assert "exec prefect worker start --pool" in services["prefect-worker"]["command"][-1]
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
    # Ray: the dashboard and Jobs API only; no Ray Client port (10001), and the GCS stays inside the network
    assert published == {9000: "minio", 9001: "minio", 4200: "prefect-server", 5000: "mlflow", 8265: "ray-head"}


def test_compose_drivers_reach_ray_at_the_gcs_address_from_a_ray_node_never_through_ray_client(compose):
    """The flow runs of the Prefect worker are Ray drivers at ray-head:6379; Ray attaches a driver to a node on its
    own machine, so the worker's container joins the cluster as a node with no CPUs before the worker starts. Runs
    from outside the network go in as Ray Jobs, whose driver runs on the head with the pipeline's variables."""
    from alignpipe.config.compute import ComputeConfig

    services = compose["services"]
    worker = services["prefect-worker"]
    address = worker["environment"]["RAY_ADDRESS"]
    assert address == "ray-head:6379" and "--port=6379" in services["ray-head"]["command"]
    assert ComputeConfig(ray_address=address).ray_address == address  # the pipeline accepts it
    script = worker["command"][-1]
    assert worker["command"][:2] == ["bash", "-c"]
    assert script.index(f"ray start --address={address} --num-cpus=0") < script.index("exec prefect worker start")
    for name, svc in services.items():
        assert not any("ray-client-server-port" in str(arg) for arg in svc.get("command") or []), name
        assert not any(str(v).startswith("ray://") for v in (svc.get("environment") or {}).values()), name
    head_env = services["ray-head"]["environment"]
    for key in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_PASSWORD"):
        assert head_env[key] == worker["environment"][key], key  # a Ray Job's driver runs on the head


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
    project = text.index('case "${TORCH_INDEX}" in')
    assert torch < lock < project
    assert "apt-get install -y --no-install-recommends libtcmalloc-minimal4" in text  # compute.allocator: tcmalloc


def _project_install(torch_index: str) -> str:
    """The pip command the Dockerfile's project install runs for this TORCH_INDEX (its RUN line, pip stubbed)."""
    text = (INFRA / "Dockerfile").read_text().replace("\\\n", " ")
    run = next(line for line in text.splitlines() if line.startswith("RUN ") and "${TORCH_INDEX}" in line
               and "torch==" not in line)
    script = f'pip() {{ echo pip "$@"; }}; TORCH_INDEX={torch_index}; {run.removeprefix("RUN ")}'
    return subprocess.run(["sh", "-c", script], check=True, capture_output=True, text=True).stdout.strip()


def test_gpu_image_installs_the_gpu_extra_and_the_cpu_image_only_the_project():
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("bitsandbytes") for req in extras["gpu"])
    assert _project_install("https://download.pytorch.org/whl/cpu") == "pip install --no-deps ."
    # the GPU build of infra/README.md: the extra, with every pin of the lock file held as a constraint
    assert _project_install("https://download.pytorch.org/whl/cu128") == "pip install -c requirements.lock .[gpu]"
