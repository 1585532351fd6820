"""Nodes that share nothing: a Ray head and a Ray worker node in its own mount namespace that cannot see the driver's
files, with storage in a bucket of their own on the local stack's S3 server and tracking on its MLflow server (whose
artifacts go to the stack's bucket, its runs to the stack's PostgreSQL): the `offbox` fixture in conftest.py.

The worker node is `ray start` under `unshare -m`, with an empty tmpfs over every place the driver writes: the
pipeline's working directory, the repository's `data/`, pytest's temp folders (where `tmp_path` and the tiny model
live) and /tmp. The virtualenv and the installed code stay visible, as on a cluster node built from the same
image. What a stage needs there it must fetch from the S3 server, through the standard AWS variables the node
holds; the custom resource `offbox` (the head lacks it) puts work there: `compute.resources: {offbox: 1}`.
Everything binds 127.0.0.1 and is a service of cli/stack.py; the two Ray nodes are recorded under the fixture's root,
so teardown is `stack.down` of that root, which leaves the stack's servers to the `local_stack` fixture.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from alignpipe.cli import stack

RESOURCE = "offbox"
# What the worker node must still see: the checkout (the editable install points into it) and the virtualenv
KEEP = [Path(__file__).resolve().parents[1], Path(sys.prefix).resolve()]
BUCKET = "offbox"  # not the stack's bucket name: pipeline code must take it from the storage path
WORKER_CPUS = 2
# Ray's nodes ignore SIGTERM for long stretches (`down` would wait out its whole grace); nothing here needs a drain
STOP_GRACE_S = 2


@dataclass
class S3Server:
    """One bucket on a moto S3 API server on 127.0.0.1: the offbox's store on the stack's server, or, started on its
    own (`S3Server.start()` ... `stop()`), a server of its own. `env` holds the AWS variables for it."""

    svc: stack.Service
    bucket: str
    env: dict[str, str]
    root: Path
    owns_root: bool = False

    @classmethod
    def start(cls, root: Path | None = None, bucket: str = BUCKET, timeout: float = 120) -> S3Server:
        """Start it, its log and key pair under `root` (default a fresh temp folder, removed by `stop`)."""
        owns_root = root is None
        root = Path(tempfile.mkdtemp(prefix="s3-server-")) if root is None else Path(root)
        svc = stack.start_s3(root, stack.free_port())
        env = stack.s3_env(svc.url, stack.s3_credentials(root))
        try:
            stack.wait_s3(svc, bucket, env, timeout)
        except BaseException:
            stack.kill(svc)
            raise
        return cls(svc=svc, bucket=bucket, env=env, root=root, owns_root=owns_root)

    @property
    def url(self) -> str:
        return self.svc.url

    def client(self):
        """A boto3 S3 client for this server (explicit arguments: os.environ is left alone)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
                            region_name=self.env["AWS_DEFAULT_REGION"])

    def stop(self) -> None:
        stack.kill(self.svc)
        if self.owns_root:
            shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class Offbox:
    """What the tests need to reach the nodes. `env` holds the AWS variables only; `driver_env()` is everything a
    driver subprocess (`alignpipe run`, a probe script) needs to run on the cluster with storage on S3."""

    root: Path
    workdir: Path
    masked: list[Path]
    s3: S3Server  # the stack's server, with the bucket `bucket` of the offbox's own
    mlflow_url: str
    ray_address: str
    worker_pid: int
    dashboard_url: str  # the head's dashboard: Ray's state API (ray.util.state.list_tasks(address=...))

    @property
    def s3_url(self) -> str:
        return self.s3.url

    @property
    def bucket(self) -> str:
        return self.s3.bucket

    @property
    def env(self) -> dict[str, str]:
        return self.s3.env

    @property
    def storage_path(self) -> str:
        return f"s3://{self.bucket}/pipelines"

    @property
    def overrides(self) -> dict[str, object]:
        """`--set`-style overrides that put a pipeline on these nodes: Ray, storage, tracking, the worker's resource."""
        return {"compute.ray_address": self.ray_address, "compute.storage_path": self.storage_path,
                "compute.resources": {RESOURCE: 1}, "tracking.mlflow_uri": self.mlflow_url}

    def driver_env(self) -> dict[str, str]:
        """os.environ plus the cluster's address, its token mode, MLflow, the storage path and the AWS variables."""
        return {**os.environ, "RAY_ADDRESS": self.ray_address, **stack.RAY_CLIENT_ENV,
                "MLFLOW_TRACKING_URI": self.mlflow_url, "ALIGNPIPE_STORAGE_PATH": self.storage_path, **self.env}

    @contextlib.contextmanager
    def aws_env(self) -> Iterator[dict[str, str]]:
        """The AWS variables in os.environ for the `with` block only (boto3/pyarrow in the test process)."""
        saved = {key: os.environ.get(key) for key in self.env}
        os.environ.update(self.env)
        try:
            yield self.env
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def s3_client(self):
        """A boto3 S3 client for the fixture's server (explicit arguments: os.environ is left alone)."""
        return self.s3.client()

    def namespace_pids(self) -> list[int]:
        """Live processes in the worker node's mount namespace: its `ray start`, raylet, agents and every Ray worker
        process it started (a training worker among them)."""
        ns = _mnt_ns(self.worker_pid)
        if ns is None:
            return []
        pids = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and _mnt_ns(int(proc.name)) == ns:
                pids.append(int(proc.name))
        return pids


def _mnt_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:  # gone, or a kernel thread
        return None


def unshare_prefix() -> list[str]:
    """`unshare` arguments for a private mount namespace: root may make one; other users map themselves to root in
    a user namespace of their own, where the kernel allows it."""
    prefix = ["unshare", "--mount", "--propagation", "private"]
    return prefix if os.geteuid() == 0 else [*prefix, "--map-root-user"]


def namespace_problem() -> str | None:
    """Why this machine cannot start the isolated node (None when it can)."""
    try:
        done = subprocess.run([*unshare_prefix(), "sh", "-c", "mount -t tmpfs tmpfs /mnt"], check=False,
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run unshare: {exc}"
    if done.returncode != 0:
        return f"`unshare --mount` + tmpfs failed here (needs root or unprivileged user namespaces): {done.stderr}"
    return None


def masking_wrap(masked: list[Path], keep: list[Path]) -> list[str]:
    """A command prefix that runs its arguments in a new mount namespace with an empty tmpfs over each of `masked`,
    except for the folders of `keep` beneath them (the checkout and its virtualenv, where they live in /tmp, as in a
    clean clone there): each is bound back in from a view of the folder taken before the tmpfs covered it.

    Shallowest first, so /tmp is private before anything inside it is decided; a masked folder already hidden under
    an earlier tmpfs (and not inside a kept folder) needs no mount of its own.
    """
    def under(path: Path, folder: Path) -> bool:
        return path == folder or folder in path.parents

    steps, done = [], []
    for folder in sorted(masked, key=lambda p: len(p.parts)):
        if any(under(folder, m) for m in done) and not any(under(folder, k) for k in keep):
            continue
        inside = [k for k in keep if under(k, folder) and k != folder]
        q = shlex.quote(str(folder))
        if inside:  # /mnt: an empty folder every Linux has; the view is private to this namespace
            steps.append(f"mount --bind {q} /mnt")
        steps.append(f"mount -t tmpfs tmpfs {q}")
        for k in inside:
            kq = shlex.quote(str(k))
            steps += [f"mkdir -p {kq}", f"mount --bind {shlex.quote(str(Path('/mnt', k.relative_to(folder))))} {kq}"]
        if inside:
            steps.append("umount -l /mnt")
        done.append(folder)
    return [*unshare_prefix(), "sh", "-c", f'{" && ".join(steps)} && exec "$@"', "sh"]


@contextlib.contextmanager
def running(root: Path, masked: list[Path], base: stack.Stack, timeout: float = 120) -> Iterator[Offbox]:
    """Start the two Ray nodes under `root` (state, logs, the workdir `root/work`), on the S3 server (in a bucket of
    their own, made here) and MLflow server of the running stack `base`; the worker node masks `masked` plus the
    workdir. The nodes are always stopped on exit, also when start-up fails; `base` is left running."""
    root = root.resolve()
    workdir = root / "work"
    workdir.mkdir(parents=True, exist_ok=True)
    masked = [workdir, *masked]
    services = stack.Stack(workdir=str(root))

    def add(svc: stack.Service) -> stack.Service:
        services.services.append(svc)
        stack.save(services)
        return svc

    by = {s.name: s for s in base.services}
    env = stack.s3_env(by["s3"].url, stack.s3_credentials(base.workdir))
    try:
        stack.wait_s3(by["s3"], BUCKET, env, timeout)  # makes the bucket
        s3 = S3Server(svc=by["s3"], bucket=BUCKET, env=env, root=Path(base.workdir))
        ray_env = stack.ray_node_env(s3.env)
        dashboard_port = stack.free_port()  # Ray's state API: what each task and actor asked for, and where it ran
        head = add(stack.start_ray_head(root, stack.free_port(), stack.ray_temp_dir(root), 0, ray_env,
                                        dashboard_port=dashboard_port))
        stack.wait_gcs(head, timeout)
        # one GPU advertised (none present): with compute.use_gpu the stages' GPU requests are granted here
        worker = add(stack.start_ray_worker(root, head.port, WORKER_CPUS, ray_env, resources={RESOURCE: 100},
                                            wrap=masking_wrap(masked, KEEP), gpus=1))
        stack.wait_ray_nodes(worker, head.port, 2, timeout)
        yield Offbox(root=root, workdir=workdir, masked=masked, s3=s3, mlflow_url=by["mlflow"].url,
                     ray_address=head.url, worker_pid=worker.pid, dashboard_url=f"http://{stack.HOST}:{dashboard_port}")
    finally:
        stack.down(root, grace=STOP_GRACE_S)
