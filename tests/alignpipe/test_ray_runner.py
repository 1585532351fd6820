"""Ray helpers on a real local Ray instance."""

import os

from alignpipe.ray_runner import task_cpus


def test_task_cpus_is_capped_at_the_largest_node(ray_local):
    node_cpus = max(n["Resources"]["CPU"] for n in ray_local.nodes() if n["Alive"])
    assert node_cpus == os.cpu_count()
    assert task_cpus(node_cpus + 6) == node_cpus   # more than one node has: would never schedule
    assert task_cpus(1) == 1
