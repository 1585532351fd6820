"""Ray helpers on a real local Ray instance."""

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from alignpipe.config.compute import ComputeConfig
from alignpipe.errors import ConfigError
from alignpipe.ray_runner import ensure_auth_token, malloc_library, task_cpus

ISA_CAPS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
            "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}


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
    maps = Path("/proc/self/maps").read_text()
    return {"omp_at_start": int(omp_at_start or 0), "torch_threads": torch.get_num_threads(), "nice": os.nice(0),
            "isa": (torch.backends.cpu.get_cpu_capability(), os.environ.get("ATEN_CPU_CAPABILITY")),
            "malloc": "tcmalloc" if "libtcmalloc" in maps else "jemalloc" if "libjemalloc" in maps else "system",
            "process_group": torch.distributed.is_initialized()
            and (torch.distributed.get_backend(), torch.distributed.get_world_size()),
            "rank_env": (os.environ.get("RANK"), os.environ.get("WORLD_SIZE"))}


def test_training_worker_starts_with_its_cpus_as_threads_in_a_plain_torch_process_group(ray_local, tmp_path,
                                                                                        monkeypatch):
    # test-only private import: Ray's public state API needs the dashboard, which the in-process Ray runs without
    from ray._private.state import actors

    from alignpipe.config.compute import ComputeConfig
    from alignpipe.ray_runner import fit, malloc_library

    for key, value in ISA_CAPS.items():  # the AVX2 emulation, set on the driver after Ray started (see below)
        monkeypatch.setenv(key, value)
    before = set(actors())
    result = fit(_worker_probe, {"threads": 2}, ComputeConfig(cpus_per_worker=2, max_failures=0), name="probe",
                 storage=str(tmp_path))
    # OpenMP is sized by the process environment, before torch creates its pool; torch then uses the same count.
    # ... at the driver's priority, not Ray's default nice 15, which yields the cores to anything else awake, and
    # with tcmalloc where this machine has it (`make setup` installs it; `auto` falls back to the system's malloc).
    malloc = "tcmalloc" if malloc_library(ComputeConfig()) else "system"
    # Ray Train's own TorchConfig, public API only: one CPU worker too gets a gloo process group of one, and the
    # RANK/WORLD_SIZE that tell the HF Trainer it runs distributed.
    # ... and with the driver's ISA caps: torch dispatches to AVX2 kernels in the worker (ray_runner.ISA_ENV)
    assert result.return_value == {"omp_at_start": 2, "torch_threads": 2, "nice": os.nice(0), "malloc": malloc,
                                   "isa": ("AVX2", "avx2"), "process_group": ("gloo", 1), "rank_env": ("0", "1")}
    started = {info["ActorClassName"] for actor_id, info in actors().items() if actor_id not in before}
    assert "RayTrainWorker" in started
    # On the in-process Ray, no PreemptionWatcher (LOCAL_RAY_ENV turns it off: a local node never drains).
    assert "PreemptionWatcher" not in started


def test_auth_token_is_made_once_whole_and_private(tmp_path, monkeypatch):
    token = tmp_path / "home" / ".ray" / "auth_token"
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    with ThreadPoolExecutor(8) as pool:  # eight first starts at once: one token, which all of them then use
        paths = list(pool.map(lambda _: ensure_auth_token(), range(8)))
    assert paths == [token] * 8
    first = token.read_text()
    assert len(first) == 64 and int(first, 16) and token.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in token.parent.iterdir()] == ["auth_token"]  # no temporary file left beside it
    assert ensure_auth_token() == token and token.read_text() == first  # an existing token is kept
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-the-environment")
    assert ensure_auth_token() is None


def test_malloc_library_follows_the_config_and_where_ray_runs(tmp_path, monkeypatch):
    import ctypes.util

    installed = {"tcmalloc_minimal": "libtcmalloc_minimal.so.4"}
    monkeypatch.setattr(ctypes.util, "find_library", installed.get)  # this machine: tcmalloc, no jemalloc
    assert malloc_library(ComputeConfig()) == "libtcmalloc_minimal.so.4"
    assert malloc_library(ComputeConfig(allocator="system")) is None
    # a cluster's workers keep what its image preloads, unless the config names a library, which its nodes resolve
    assert malloc_library(ComputeConfig(ray_address="head:6379")) is None
    assert malloc_library(ComputeConfig(ray_address="head:6379", allocator="jemalloc")) == "libjemalloc.so.2"
    with pytest.raises(ConfigError, match="jemalloc is not installed.*apt-get install libjemalloc2"):
        malloc_library(ComputeConfig(allocator="jemalloc"))
    with pytest.raises(ConfigError, match="does not exist"):
        malloc_library(ComputeConfig(allocator=str(tmp_path / "libnone.so")))
    installed.clear()  # nothing installed: `auto` is the system's malloc
    assert malloc_library(ComputeConfig()) is None
    with pytest.raises(ValueError, match="allocator='tcmaloc': use one of auto, system, tcmalloc, jemalloc"):
        ComputeConfig(allocator="tcmaloc")



def _isa_probe(_config=None):
    """What a worker process runs on: torch's dispatch level, the ISA caps in its environment, and a job-wide
    variable (to see the caps were merged into the job's runtime env, not put in its place)."""
    import torch

    from alignpipe.ray_runner import ISA_ENV

    return {"capability": torch.backends.cpu.get_cpu_capability(), "env": {k: os.environ.get(k) for k in ISA_ENV},
            "job_env": os.environ.get("RAY_TRAIN_ENABLE_PRINT_PATCH")}


def test_isa_caps_set_on_the_driver_reach_every_heavy_task(ray_local, monkeypatch):
    """The AVX2 emulation of bench/PROTOCOL.md: its variables, set where `alignpipe run` starts, reach each heavy
    task (merge, quantize, evaluate), whose torch then dispatches to AVX2 kernels; the training workers' check is
    in the test above. Without the caps a task runs at this machine's own level again."""
    from alignpipe.ray_runner import get, task_options

    for key, value in ISA_CAPS.items():
        monkeypatch.setenv(key, value)
    compute = ComputeConfig(cpus_per_worker=1, max_failures=0)
    probe = get(ray_local.remote(**task_options(compute, 1))(_isa_probe).remote())
    assert probe == {"capability": "AVX2", "env": ISA_CAPS, "job_env": "0"}  # merged into the job's runtime env
    monkeypatch.undo()
    assert get(ray_local.remote(**task_options(compute, 1))(_isa_probe).remote())["env"] == dict.fromkeys(ISA_CAPS)
