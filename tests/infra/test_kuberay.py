"""infra/kuberay/raycluster.yaml and infra/k8s/: valid against the KubeRay CRD schema and Kubernetes' own
schemas, a GPU worker group that requests GPUs and tolerates their taint, secrets only from Kubernetes Secrets."""

import copy

import pytest
import yaml
from infralib import (
    K8S,
    KUBERAY,
    KUBERNETES_TYPES,
    SECRET_KEY,
    errors,
    kuberay_validator,
    kubernetes_validator,
    load,
    pod_template_validator,
)


@pytest.fixture(scope="module")
def raycluster() -> dict:
    return load(KUBERAY)


def test_raycluster_validates_against_kuberay_crd_schema(raycluster):
    assert errors(kuberay_validator(), raycluster) == []


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
    assert errors(kuberay_validator(), broken)


def _templates(raycluster: dict) -> dict[str, dict]:
    spec = raycluster["spec"]
    return {"head": spec["headGroupSpec"]["template"], **{g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]}}


def test_raycluster_pod_templates_validate_against_kubernetes_podtemplatespec(raycluster):
    """The KubeRay excerpt leaves the pod template open; the strict Kubernetes schema checks it (unknown keys too)."""
    validator = pod_template_validator()
    for group, template in _templates(raycluster).items():
        assert errors(validator, template) == [], group


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
    assert errors(pod_template_validator(), broken)


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


# --- k8s/: MLflow and the Prefect worker on Kubernetes ---

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
        validator = kubernetes_validator(KUBERNETES_TYPES[(doc["apiVersion"], kind)])
        assert errors(validator, doc) == [], f"{kind}/{name}"


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
    assert errors(kubernetes_validator("io.k8s.api.apps.v1.Deployment"), broken)


def test_k8s_mlflow_is_behind_basic_auth_and_in_cluster_only():
    docs = _k8s_documents()
    server = docs[("Deployment", "mlflow")]["spec"]["template"]["spec"]["containers"][0]
    assert "--app-name=basic-auth" in server["args"] and "--serve-artifacts" in server["args"]
    assert {"secretRef": {"name": "mlflow-secrets"}} in server["envFrom"]
    assert docs[("Service", "mlflow")]["spec"]["type"] == "ClusterIP"
    worker = docs[("Deployment", "alignpipe-prefect-worker")]["spec"]["template"]["spec"]["containers"][0]
    assert {"secretRef": {"name": "prefect-worker-secrets"}} in worker["envFrom"]
    assert "exec prefect worker start --pool alignpipe" in worker["args"][-1]
    for container in (server, worker):
        for env in container.get("env", []):
            assert not (SECRET_KEY.search(env["name"]) and "value" in env), env["name"]


def test_prefect_worker_reaches_kuberay_at_the_gcs_address_from_a_ray_node_never_through_ray_client(raycluster):
    """Flow runs are Ray drivers at `<cluster>-head-svc:<gcs port>`, the Service KubeRay makes for the head; the pod
    joins the cluster as a node with no CPUs first (Ray attaches a driver to a node on its own machine). The head
    exposes no Ray Client port: Ray's docs say Ray Client may not work as expected with Ray Train."""
    from alignpipe.config.compute import ComputeConfig

    head_ports = {p["name"]: p["containerPort"] for p in _containers(raycluster["spec"]["headGroupSpec"])[0]["ports"]}
    assert 10001 not in head_ports.values() and "client" not in head_ports
    worker = _k8s_documents()[("Deployment", "alignpipe-prefect-worker")]["spec"]["template"]["spec"]["containers"][0]
    address = {e["name"]: e.get("value") for e in worker["env"]}["RAY_ADDRESS"]
    assert address == f"{raycluster['metadata']['name']}-head-svc:{head_ports['gcs']}"
    assert ComputeConfig(ray_address=address).ray_address == address  # the pipeline accepts it
    assert worker["command"] == ["bash", "-c"]
    script = worker["args"][-1]
    assert script.index('ray start --address="$RAY_ADDRESS" --num-cpus=0') < script.index("exec prefect worker start")
