"""Connect to Ray (in-process by default) and run a training loop under Ray Train's TorchTrainer.

The run name and storage path make a training run resumable: a later `fit()` with the same name and
storage finds the last reported checkpoint (Ray Train v2 restores it; `ray.train.get_checkpoint()`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignpipe import lognoise, progress
from alignpipe.config.compute import ComputeConfig
from alignpipe.errors import ConfigError
from alignpipe.metric_buffer import HTTP_ENV

if TYPE_CHECKING:
    from alignpipe.config.pipeline import PipelineConfig

# Environment passed to every Ray worker: quiet, offline-friendly, no telemetry. Ray workers talk to MLflow
# only through a MetricBuffer, which retries by itself: MLflow's own HTTP retries are turned down there.
WORKER_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PYTHONUNBUFFERED": "1",
    # Ray Train copies every print() of a training worker to the root logger, even one a library sends into a
    # captured stdout: `datasets` fingerprints each map function with dill, whose `dis.dis` into a StringIO then
    # reached the console as ~1000 lines of bytecode per stage. Prints still go to the worker's stdout, which
    # Ray forwards to the driver.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    **HTTP_ENV,
}

# Ray Train helpers that have nothing to do on the one in-process node, yet each wakes up for the whole run and
# takes CPU from the training worker on a small machine (bench/ray_overhead.py measures them). Set for the
# in-process Ray only, before it starts; a cluster keeps Ray's defaults (and its operator's settings).
LOCAL_RAY_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # an actor polling node drain state every 5 s: a local node never drains
    "RAY_enable_metrics_collection": "0",         # every Ray process exports metrics nobody scrapes here
    # The controller polls its workers every 2 s by default, and a worker's last report and the end of the run
    # each wait for a poll: seconds of every training stage spent idle. A poll is one small actor call per worker.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # Ray starts every worker process at nice 15, so that on a shared node its own daemons stay responsive. Here
    # the workers are the job, and anything else awake at nice 0 (the flow process, Prefect's API, a browser)
    # takes the core from one of a training worker's OpenMP threads while its partner spins at the next barrier.
    # Ray's job supervisor sets the same for the drivers it starts.
    "RAY_worker_niceness": "0",
}


def ensure_auth_token() -> Path | None:
    """Make the token a local Ray cluster authenticates with, once per machine, if there is none yet.

    Ray turns token auth on for a new local cluster; `ray.init` writes the token (~/.ray/auth_token, or
    `RAY_AUTH_TOKEN_PATH`) when it is missing, but `ray start` (the local stack's nodes) refuses to start without
    one, and two first starts at once (two pipelines, two test workers) each write their own, non-atomically.
    Here the file appears whole, once: written aside and linked into place, and whoever links second keeps the
    first one's token. Returns the token file, or None when `RAY_AUTH_TOKEN` carries the token itself.
    """
    import secrets

    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".auth_token-", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes: 256 random bits
        os.link(tmp, path)
    except FileExistsError:
        pass  # another process made it first: keep theirs
    finally:
        os.unlink(tmp)
    return path


# The malloc libraries `compute.allocator` names: library name, soname, Debian/Ubuntu package.
MALLOC_LIBRARIES = {"tcmalloc": ("tcmalloc_minimal", "libtcmalloc_minimal.so.4", "libtcmalloc-minimal4"),
                    "jemalloc": ("jemalloc", "libjemalloc.so.2", "libjemalloc2")}


def malloc_library(compute: ComputeConfig) -> str | None:
    """The malloc library to preload into Ray workers (`compute.allocator`), or None for the system's.

    glibc's malloc hands every tensor above its mmap threshold back to the kernel when freed, so each training step
    faults its activations in again, page by page, and spends seconds of system time on it. tcmalloc keeps freed
    memory for the next step (bench/ray_overhead.py compares them). `auto` uses it only where Ray runs on this
    machine (a cluster's workers get what its image preloads) and the library is installed (`make demo`/`test`
    install it).
    """
    import ctypes.util

    choice = compute.allocator
    if choice == "system" or (choice == "auto" and compute.ray_address):
        return None
    if "/" in choice:
        if not compute.ray_address and not Path(choice).is_file():
            raise ConfigError(f"compute.allocator: {choice} does not exist; fix the path, or set `auto` or `system`")
        return choice
    name, soname, package = MALLOC_LIBRARIES["tcmalloc" if choice == "auto" else choice]
    found = ctypes.util.find_library(name)
    if found or compute.ray_address:
        return found or soname  # a cluster's nodes resolve the soname themselves
    if choice == "auto":
        return None
    raise ConfigError(f"compute.allocator: {choice} is not installed on this machine (lib{name}); install it "
                      f"(Debian/Ubuntu: apt-get install {package}) or set compute.allocator to `auto` or `system`")


def ensure_ray(compute: ComputeConfig, cpus: int | None = None) -> None:
    """Start Ray in-process with `cpus` CPUs (default: all of this machine's), or connect to `compute.ray_address`,
    once per process. With an address, no local Ray is ever started: an address that does not answer is an error."""
    import ray

    if ray.is_initialized():
        return
    if compute.ray_address:
        check_cluster_answers(compute.ray_address)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray Train gives a worker group 60 s to start; importing torch + transformers in a fresh process on a
    # busy 2-core machine can take longer, and a timeout costs a whole restart.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    if not compute.ray_address:
        for key, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(key, value)
        ensure_auth_token()  # a cluster's token is its operator's to hand out
    quiet = lognoise.quiet_console()
    # The workers keep their progress bars and INFO lines even when quiet: `alignpipe run` routes what Ray forwards
    # from them to the run's log file, off the console (alignpipe/cli/runlog.py). They get the progress board's name.
    env = {**WORKER_ENV, **(lognoise.WORKER_BARS if quiet else {}),
           **{k: v for k in (progress.BOARD_ENV,) if (v := os.environ.get(k))}}
    if library := malloc_library(compute):
        env["LD_PRELOAD"] = library
    runtime_env: dict[str, Any] = {"env_vars": env}
    if not compute.ray_address:
        runtime_env["worker_process_setup_hook"] = "alignpipe.ray_runner.quiet_local_workers"
    # Workers' output reaches the driver; quiet, the driver's own Ray INFO lines are not written at all.
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True, "runtime_env": runtime_env,
                              "logging_level": "WARNING" if quiet else "INFO"}
    # ray.init replaces the SIGTERM handler with sys.exit; keep the caller's (Prefect's, which turns a
    # runner's SIGTERM into a Cancelled flow run instead of a Crashed one). Ray's atexit shutdown still runs.
    sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    machine = os.cpu_count() or 1
    try:
        if compute.ray_address:
            ray.init(address=compute.ray_address, **kwargs)
        else:
            ray.init(num_cpus=min(cpus or machine, machine), **kwargs)
    except ConnectionError as exc:  # `auto` with no cluster here, or a cluster this machine is not a node of
        raise ConfigError(f"compute.ray_address={compute.ray_address!r}: {exc}. {NO_CLUSTER_FIX}") from None
    finally:
        if sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)
    progress.start_board()


NO_CLUSTER_FIX = ("Start the cluster or fix the address: a driver joins at the GCS address `<head>:6379` from a "
                  "machine that is a node of the cluster (`ray start --address=<head>:6379 --num-cpus=0` there "
                  "first); from elsewhere, submit the run as a Ray Job (`ray job submit`). Or leave "
                  "compute.ray_address and RAY_ADDRESS unset for an in-process Ray")


def check_cluster_answers(address: str, timeout_s: float = 10.0) -> None:
    """Raise ConfigError when nothing listens at a `host:port` Ray address; `ray.init` would retry for minutes."""
    host, _, port = address.rpartition(":")
    if address == "auto" or not port.isdigit():
        return  # `auto`: Ray finds this machine's cluster itself, or says at once that there is none
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(f"compute.ray_address={address!r}: no Ray cluster answers there ({exc}). "
                          f"{NO_CLUSTER_FIX}") from None


def local_cpus(cfg: PipelineConfig) -> int:
    """CPUs for the in-process Ray of one pipeline: its largest single request (the training worker group, the
    evaluate or quantize task, the merge task's one CPU; stages run one at a time), at most this machine's. Two
    pipelines on one machine then share its cores instead of each Ray claiming all of them."""
    c = cfg.compute
    need = max(c.num_workers * c.cpus_per_worker, cfg.evaluate.cpus, cfg.quantize.cpus, 1)
    return min(math.ceil(need), os.cpu_count() or 1)


def wait_interruptibly(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)`, a call that blocks on Ray (`trainer.fit()`, `ray.get`), made so that a stop signal stops it.

    Ray's blocking wait runs Python's signal handlers but ends only for a KeyboardInterrupt or SystemExit; any other
    exception a handler raises (Prefect's TerminationSignal on SIGTERM: a cancelled flow run, an evicted pod,
    `kill`) stays pending while the workers train on to the end. So the call runs in a helper thread, and the main
    thread waits in short joins, where a handler's exception surfaces at once: this process's Ray work is then
    shut down (an in-process Ray stops with its workers; on a cluster the job's actors die with their driver) and
    the exception goes on, to Prefect or to Python. The signal handlers themselves stay as they were: Prefect
    acknowledges a runner's cancel only while its own SIGTERM handler is installed, and Ray Train registers no
    SIGINT handler of its own outside the main thread (one it would leave behind after the fit).
    """
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        return fn(*args)
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["value"] = fn(*args)
        except BaseException as exc:  # handed to the main thread below
            outcome["error"] = exc

    worker = threading.Thread(target=call, name="ray-wait", daemon=True)
    try:
        worker.start()  # a signal may land while it starts
        while worker.is_alive():
            worker.join(0.2)
    except BaseException:
        shutdown()
        worker.join(10)  # its Ray call ends with the connection: a thread left inside Ray's core at exit can crash it
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


# Ray Train's placement-group cleaner asks the state API every second whether the run's controller is alive. The
# in-process Ray runs without the dashboard that serves that API, so every ask fails and the cleaner logs a
# warning each second, forwarded to the console for the whole of training. Its logger is quieted there.
PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_local_workers() -> None:
    """Runs as every in-process Ray worker process starts (the runtime env's `worker_process_setup_hook`)."""
    import logging

    import ray

    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)
    # With several Rays on one machine (two pipelines, test workers), a state-API client that looks for "the"
    # local cluster finds many and raises; point it at this one.
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


# The CPU instruction-set caps of torch (ATen), oneDNN, MKL and fbgemm. Set on the driver (e.g. to run as an
# AVX2-only CPU would on a host with AVX-512), they go to every training worker and heavy task, on a cluster too:
# each library reads its own once, when it loads, so a worker that missed them would compute differently.
ISA_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "FBGEMM_ENABLE_INSTRUCTIONS")


def isa_env() -> dict[str, str]:
    """The ISA caps set in this process's environment (`ISA_ENV`), to pass on to Ray workers."""
    return {key: os.environ[key] for key in ISA_ENV if os.environ.get(key)}


def worker_env(compute: ComputeConfig) -> dict[str, str]:
    """Environment of each training worker process: OpenMP sized to the CPUs it reserved from the start, as
    torch reads OMP_NUM_THREADS when it first initialises its thread pool (`set_worker_threads` only resizes it),
    and the driver's ISA caps (`ISA_ENV`)."""
    threads = str(max(1, int(compute.cpus_per_worker)))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, **isa_env()}


def fit(train_loop: Callable[[dict], None], loop_config: dict[str, Any], compute: ComputeConfig, name: str,
        storage: str, filesystem=None):
    """Run `train_loop` on `compute.num_workers` Ray Train workers; returns the Ray `Result`.

    Checkpoints go to `storage` (a local folder, or `bucket/prefix` on `filesystem`, a pyarrow S3 filesystem).

    Plain `TorchTrainer` and `TorchConfig` (gloo on CPU, NCCL on GPU), public API only: every run gets a process
    group, a single worker too, so the HF Trainer wraps the model in DDP on a world of one. Ray Train's default
    helper actors (dataset manager, placement-group cleaner) start even where they have nothing to do.
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": compute.cpus_per_worker, **compute.resources}
    if compute.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if compute.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=compute.num_workers, use_gpu=compute.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=compute.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=compute.checkpoints_to_keep),
            worker_runtime_env={"env_vars": worker_env(compute)},
            # the controller's and workers' INFO lines reach the driver: `alignpipe run` keeps them in the run log
            logging_config=LoggingConfig(log_level="INFO"),
        ),
    )
    return wait_interruptibly(trainer.fit)


def task_options(compute: ComputeConfig, cpus: float) -> dict[str, Any]:
    """`ray.remote` options of a heavy task (merge, quantize, evaluate): its CPUs, a GPU with `use_gpu`, the custom
    resources of `compute.resources`, a fresh worker process per call (a model's memory goes with it), and the
    driver's ISA caps (`ISA_ENV`; Ray merges these env_vars into the job's runtime env)."""
    options = {"num_cpus": cpus, "num_gpus": 1 if compute.use_gpu else 0, "resources": dict(compute.resources),
               "max_calls": 1}
    if caps := isa_env():
        options["runtime_env"] = {"env_vars": caps}
    return options


def get(ref):
    """`ray.get`, but a user-fixable error raised in the task comes back as itself, without Ray's wrapping."""
    import ray

    from alignpipe.errors import AlignpipeError

    try:
        return wait_interruptibly(ray.get, ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, AlignpipeError):
            raise exc.cause from None
        raise


def set_worker_threads(threads: int) -> None:
    """Ray workers start with OMP_NUM_THREADS=1; give torch the CPUs this worker reserved."""
    import torch

    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def shutdown() -> None:
    """Leave Ray if this process joined or started it: an in-process Ray stops with its workers, and on a
    cluster the job's actors (Ray Train's controller and training workers, which are not detached) die with
    their driver."""
    import sys

    ray = sys.modules.get("ray")  # never import Ray just to find it was not running
    if ray is not None and ray.is_initialized():
        progress.clear_board()
        ray.shutdown()


def ranks_in_sync(model) -> bool:
    """True when every DDP rank holds the same trainable weights (gradients were all-reduced each step);
    True on a world of one. Call it on every rank: it is a collective."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() < 2:
        return True
    flat = torch.cat([p.detach().float().reshape(-1).cpu() for p in model.parameters() if p.requires_grad])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def task_cpus(requested: float, resources: dict[str, float] | None = None) -> float:
    """`requested` capped at the CPUs of the largest alive node that has `resources` (compute.resources): one task
    runs on one node, so more can never schedule.

    (Capping at the cluster total is not enough: on two 1-CPU nodes a 2-CPU task would wait forever.)
    """
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    eligible = [r for r in nodes if all(r.get(k, 0.0) >= v for k, v in (resources or {}).items())] or nodes
    largest = max((r.get("CPU", 0.0) for r in eligible), default=1.0)
    return min(requested, largest) or 1.0


def resume_from_checkpoint(prefix: str, final_marker: str) -> tuple[Path | None, bool]:
    """In a Ray Train worker: the last checkpoint as a local folder (None on a fresh start), and whether it holds
    this exact work already finished (a file `final_marker`), in which case its result is reported again here
    and the training loop can return at once.
    """
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None, False
    folder = Path(checkpoint.to_directory(tempfile.mkdtemp(prefix=f"{prefix}-resume-")))
    if not (folder / final_marker).is_file():
        return folder, False
    rank0 = ray.train.get_context().get_world_rank() == 0
    ray.train.report(json.loads((folder / final_marker).read_text()), checkpoint=checkpoint if rank0 else None)
    shutil.rmtree(folder, ignore_errors=True)  # a local copy: the checkpoint itself stays in storage
    return None, True


def report_final(summary: dict, final_dir: Path, rank0: bool, resume_dir: Path | None) -> None:
    """In a Ray Train worker: report the finished work's folder as the last checkpoint, then remove the local
    folders (the final one once Ray has copied it to storage, and the restored checkpoint's copy)."""
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(str(final_dir)) if rank0 else None
    ray.train.report(summary, checkpoint=checkpoint, delete_local_checkpoint_after_upload=True)
    shutil.rmtree(final_dir, ignore_errors=True)  # rank > 0 made an empty one; rank 0's is gone already
    if resume_dir is not None:
        shutil.rmtree(resume_dir, ignore_errors=True)
