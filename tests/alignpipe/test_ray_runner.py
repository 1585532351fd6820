"""Ray helpers on a real local Ray instance."""

import os

from alignpipe.ray_runner import task_cpus


def test_task_cpus_is_capped_at_the_largest_node(ray_local):
    node_cpus = max(n["Resources"]["CPU"] for n in ray_local.nodes() if n["Alive"])
    assert node_cpus == os.cpu_count()
    assert task_cpus(node_cpus + 6) == node_cpus   # more than one node has: would never schedule
    assert task_cpus(1) == 1


def _worker_probe(config):
    """A training loop that returns what the worker process saw before and after `set_worker_threads`."""
    import torch

    from alignpipe.ray_runner import set_worker_threads

    omp_at_start = os.environ.get("OMP_NUM_THREADS")
    set_worker_threads(config["threads"])
    return {"omp_at_start": int(omp_at_start or 0), "torch_threads": torch.get_num_threads()}


def test_training_worker_starts_with_its_cpus_as_threads_and_without_idle_helpers(ray_local, tmp_path):
    from ray._private.state import actors

    from alignpipe.config.compute import ComputeConfig
    from alignpipe.ray_runner import fit

    before = set(actors())
    result = fit(_worker_probe, {}, ComputeConfig(cpus_per_worker=2, max_failures=0), name="probe",
                 storage=str(tmp_path))
    # OpenMP is sized by the process environment, before torch creates its pool; torch then uses the same count.
    assert result.return_value == {"omp_at_start": 2, "torch_threads": 2}
    started = {info["ActorClassName"] for actor_id, info in actors().items() if actor_id not in before}
    assert "RayTrainWorker" in started
    # On the in-process Ray, no PlacementGroupCleaner (it polls a state API that only the dashboard serves) and no
    # PreemptionWatcher (a local node never drains): both would poll for the whole run. Without Ray Datasets, no
    # DatasetManager (one more process to start, serving nothing).
    assert not started & {"PlacementGroupCleaner", "PreemptionWatcher", "DatasetManager"}
