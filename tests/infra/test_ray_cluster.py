"""infra/ray/cluster.yaml: valid against Ray's cluster-config schema and Ray's own `ray up` validation, CPU and GPU
node types, every node installs the pinned torch, the lock file and the project."""

import copy
import re

import pytest
from infralib import RAY_CLUSTER, errors, load, ray_validator


@pytest.fixture(scope="module")
def launcher() -> dict:
    return load(RAY_CLUSTER)


def test_launcher_config_validates_against_ray_schema(launcher):
    assert errors(ray_validator(), launcher) == []


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
    assert errors(ray_validator(), broken)


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
