"""The local stack behind `alignpipe up | down | status | env`: PostgreSQL, Prefect server, S3 API server, MLflow
server, 2-node Ray cluster.

Every service is a child process in its own session (process group), asked to bind 127.0.0.1 (PostgreSQL, Prefect,
MLflow and the S3 server do; Ray's gRPC servers listen on every interface regardless, see RAY_CLIENT_ENV); their pids,
ports and URLs go to `<workdir>/stack/state.json`, so `down` stops exactly what `up` started and nothing else
(no `ray stop`, which would stop every Ray instance on the machine). Pipelines and MLflow keep their artifacts in
the S3 server's bucket, as they would on a real deployment's object store, and Prefect and MLflow keep their data in
PostgreSQL (cli/postgres.py), as a shared deployment's servers would. It lives with the CLI because only the CLI and
the tests use it.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import pwd
import random
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from alignpipe.errors import AlignpipeError
from alignpipe.ray_runner import LOCAL_RAY_ENV, ensure_auth_token

HOST = "127.0.0.1"
BIN = Path(sys.executable).parent
# Ray's GCS listens on every interface whatever --node-ip-address says: keep token auth on (the token is
# ~/.ray/auth_token, made before the head starts if missing: `ray start` will not make it) and tell every client
# to send it.
RAY_CLIENT_ENV = {"RAY_AUTH_MODE": "token"}
OBJECT_STORE_BYTES = 256 * 1024**2
# The stack's object store: moto's S3 API in server mode (a real HTTP endpoint for boto3 and pyarrow, objects in
# its memory: they go with `down`). One bucket: pipelines under one prefix, MLflow's artifacts under another.
S3_BUCKET = "alignpipe"
S3_REGION = "us-east-1"
POSTGRES_USER = "alignpipe"  # the one role of the stack's PostgreSQL (a superuser of its own cluster)
STORAGE_PATH = f"s3://{S3_BUCKET}/pipelines"
# How `down` asks a service to stop, where not SIGTERM to every process of its session: PostgreSQL's postmaster alone,
# SIGINT ("fast shutdown": it ends its sessions, checkpoints, and stops its own helpers; SIGTERM waits for clients).
STOP_SIGNALS = {"postgres": signal.SIGINT}


class StackError(AlignpipeError):
    """A stack service did not start (port taken, missing binary, crashed on start-up)."""


@dataclass
class Service:
    name: str
    pid: int
    port: int
    url: str
    log: str
    cmd: list[str] = field(default_factory=list)


@dataclass
class Stack:
    workdir: str
    services: list[Service] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        """The variables that point `alignpipe run` (and any Prefect/MLflow/Ray client) at this stack."""
        by = {s.name: s for s in self.services}
        out = {}
        if "prefect" in by:
            out["PREFECT_API_URL"] = f"{by['prefect'].url}/api"
        if "s3" in by:
            out.update(s3_env(by["s3"].url, s3_credentials(self.workdir)))
            out["ALIGNPIPE_STORAGE_PATH"] = STORAGE_PATH  # compute.storage_path
        if "mlflow" in by:
            out["MLFLOW_TRACKING_URI"] = by["mlflow"].url
        if "postgres" in by:  # a plain libpq URL: model promotions take PostgreSQL advisory locks there
            out["ALIGNPIPE_REGISTRY_LOCK_URL"] = postgres_url(by["postgres"].port,
                                                              postgres_credentials(self.workdir)["password"], "mlflow")
        if "ray-head" in by:
            out["RAY_ADDRESS"] = f"{HOST}:{by['ray-head'].port}"
            out.update(RAY_CLIENT_ENV)
        return out


def state_file(workdir: str | Path) -> Path:
    return Path(workdir).resolve() / "stack" / "state.json"


def load(workdir: str | Path) -> Stack | None:
    path = state_file(workdir)
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    return Stack(workdir=raw["workdir"], services=[Service(**s) for s in raw["services"]])


def save(stack: Stack) -> None:
    path = state_file(stack.workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(stack), indent=2))


def _private_json(path: Path, make: Callable[[], dict[str, str]]) -> dict[str, str]:
    """The JSON object in `path`, written from `make()` first if missing, readable by its owner only."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(make(), f)
    return json.loads(path.read_text())


def s3_credentials(workdir: str | Path) -> dict[str, str]:
    """The stack's S3 key pair, made once per workdir and kept beside its state, readable by its owner only.

    moto accepts any key; a real store would not, so pipelines get theirs the way they would there: from the
    standard AWS variables that `alignpipe env` exports.
    """
    alphabet = string.ascii_uppercase + string.digits
    return _private_json(Path(workdir).resolve() / "stack" / "s3-credentials.json",
                         lambda: {"access_key_id": "AKIA" + "".join(secrets.choice(alphabet) for _ in range(16)),
                                  "secret_access_key": secrets.token_urlsafe(30)})  # AWS's shapes


def postgres_credentials(workdir: str | Path) -> dict[str, str]:
    """The password of the stack's PostgreSQL role, made once per workdir (with its data folder) and kept beside
    its state, readable by its owner only."""
    return _private_json(Path(workdir).resolve() / "stack" / "postgres-credentials.json",
                         lambda: {"password": secrets.token_urlsafe(24)})


def postgres_url(port: int, password: str, database: str, driver: str = "postgresql") -> str:
    """The URL of `database` on the stack's PostgreSQL at HOST:`port`, signed in as its one role (POSTGRES_USER);
    `driver` is SQLAlchemy's dialect+driver where a client needs one (Prefect: postgresql+asyncpg)."""
    return f"{driver}://{POSTGRES_USER}:{urllib.parse.quote(password, safe='')}@{HOST}:{port}/{database}"


def s3_env(endpoint: str, credentials: dict[str, str]) -> dict[str, str]:
    """The standard AWS variables that point boto3, pyarrow and MLflow at the S3 server `endpoint`."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": credentials["access_key_id"],
            "AWS_SECRET_ACCESS_KEY": credentials["secret_access_key"], "AWS_DEFAULT_REGION": S3_REGION}


def free_port() -> int:
    """A port free on HOST now, picked where nothing else binds by chance: above `ray start`'s worker ports
    (10002-19999) and below the kernel's ephemeral range. Ray's nodes bind most of their ports as port 0, i.e. in
    the ephemeral range, and one of those once took the Prefect port between our pick and Prefect's own bind; so
    the services may start side by side. Falls back to an ephemeral port where the kernel leaves no room below."""
    low = 20000
    try:
        high = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]) - 1
    except (OSError, ValueError, IndexError):
        high = 32767  # Linux's default ephemeral range starts at 32768
    for _ in range(200 if high > low else 0):
        port = random.randint(low, high)
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:  # in use
                continue
            return port
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child still answers kill(0)
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def ray_temp_dir(workdir: str | Path) -> str:
    """Ray's folder for this stack: short (Unix socket paths are capped at 107 bytes) and not /tmp/ray, so a
    plain `ray.init()` elsewhere on this machine never finds and joins our cluster."""
    digest = hashlib.sha256(str(Path(workdir).resolve()).encode()).hexdigest()[:8]
    return f"/tmp/alignpipe-ray-{digest}"


def _start(name: str, cmd: list[str], port: int, url: str, logs: Path, env: dict[str, str], user: str | None = None,
           cwd: Path | None = None) -> Service:
    """Start `cmd` in a session of its own, as `user` (its own group, no other; root only) where given."""
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    as_user = {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []} if user else {}
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **env}, start_new_session=True, cwd=cwd, **as_user)
    return Service(name=name, pid=proc.pid, port=port, url=url, log=str(log), cmd=cmd)


def _wait(svc: Service, ready: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(svc.pid):
            tail = Path(svc.log).read_text(errors="replace")[-2000:]
            raise StackError(f"{svc.name} exited while starting; its log ({svc.log}) ends with:\n{tail}")
        if ready():
            return
        time.sleep(0.5)
    raise StackError(f"{svc.name} did not become ready in {timeout:.0f}s; see {svc.log}")


def _http_ok(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        except (OSError, http.client.HTTPException):  # not listening yet, or not (yet) an HTTP server there
            return False
    return check


def _ray_nodes(head_port: int) -> int:
    """Alive nodes in the cluster, asked by a short-lived driver (a fresh process: ours stays Ray-free)."""
    code = ("import ray\n"
            f"ray.init(address='{HOST}:{head_port}', logging_level='ERROR', log_to_driver=False)\n"
            "print(sum(n['Alive'] for n in ray.nodes()))\n")
    try:
        proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **RAY_CLIENT_ENV})
    except subprocess.TimeoutExpired:  # not up yet (or gone): the caller's wait decides
        return 0
    lines = proc.stdout.strip().splitlines()
    return int(lines[-1]) if proc.returncode == 0 and lines and lines[-1].isdigit() else 0


def up(workdir: str | Path, on_wait: Callable[[str], None] = print, ray_cpus: int = 1,
       timeout: float = 240) -> Stack:
    """Start PostgreSQL, Prefect server, S3 server, MLflow server and a Ray head + one worker node; returns the
    recorded stack. Prefect and MLflow start once PostgreSQL takes connections and holds their databases."""
    from alignpipe.cli import postgres  # here, not at the top: it builds on this module

    workdir = Path(workdir).resolve()
    current = load(workdir)
    if current and any(alive(s.pid) for s in current.services):
        raise StackError(f"a stack from {state_file(workdir)} is already running; `alignpipe down` stops it")
    root = workdir / "stack"
    logs = root / "logs"
    stack = Stack(workdir=str(workdir))
    password = postgres_credentials(workdir)["password"]
    try:
        db = postgres.start(root, free_port(), password)  # initdb first on this workdir's first `up` (seconds)
        stack.services.append(db)
        save(stack)
        s3 = start_s3(root, free_port())
        stack.services.append(s3)
        save(stack)
        on_wait(f"PostgreSQL on {db.url}")
        postgres.wait(db, password, timeout)
        port = free_port()
        # Password in the environment, not on a command line everyone may read; leases of crashed runs' concurrency
        # slots are freed within 5 s (Prefect's default is 15), and a run waiting on a slot (a stage key another run
        # holds) asks again within 5 s of its release (default up to 30)
        prefect = _start("prefect", [str(BIN / "prefect"), "server", "start", "--host", HOST, "--port", str(port)],
                         port, f"http://{HOST}:{port}", logs,
                         {"PREFECT_HOME": str(root / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                          "PREFECT_API_URL": f"http://{HOST}:{port}/api",
                          "PREFECT_API_DATABASE_CONNECTION_URL": postgres_url(db.port, password, "prefect",
                                                                              "postgresql+asyncpg"),
                          "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "5",
                          "PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS": "5"})
        stack.services.append(prefect)
        save(stack)
        aws = s3_env(s3.url, s3_credentials(workdir))
        mlflow = start_mlflow(root, free_port(), artifacts=f"s3://{S3_BUCKET}/mlflow", env=aws,
                              store=postgres_url(db.port, password, "mlflow"))
        stack.services.append(mlflow)
        save(stack)
        # All start side by side (free_port picks ports no Ray node takes while these servers still start)
        head = start_ray_head(root, free_port(), ray_temp_dir(workdir), ray_cpus, ray_node_env(aws))
        stack.services.append(head)
        save(stack)

        on_wait(f"S3 server on {s3.url}")
        wait_s3(s3, S3_BUCKET, aws, timeout)
        on_wait(f"Ray head node on {head.url}")
        wait_gcs(head, timeout)
        worker = start_ray_worker(root, head.port, ray_cpus, ray_node_env(aws))
        stack.services.append(worker)
        save(stack)
        on_wait(f"Prefect server on {prefect.url}")
        _wait(prefect, _http_ok(f"{prefect.url}/api/health"), timeout)
        on_wait(f"MLflow server on {mlflow.url}")
        wait_mlflow(mlflow, timeout)
        on_wait("Ray worker node joining the head")
        wait_ray_nodes(worker, head.port, 2, timeout)
    except BaseException:
        down(workdir)
        raise
    return stack


def start_s3(root: Path, port: int) -> Service:
    """moto's S3 API server on HOST:`port` (its own default would be every interface); not waited for."""
    return _start("s3", [str(BIN / "moto_server"), "-H", HOST, "-p", str(port)], port, f"http://{HOST}:{port}",
                  root / "logs", {})


def wait_s3(svc: Service, bucket: str, env: dict[str, str], timeout: float = 240) -> None:
    """Return once the S3 server `svc` answers and holds `bucket`, made with the key pair in `env` (s3_env)."""
    _wait(svc, _http_ok(f"{svc.url}/"), timeout)
    import boto3  # only here: the CLI's other commands never pay for importing it

    client = boto3.client("s3", endpoint_url=svc.url, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=S3_REGION)
    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass


def start_mlflow(root: Path, port: int, artifacts: str | None = None, env: dict[str, str] | None = None,
                 store: str | None = None) -> Service:
    """An MLflow server on HOST:`port` with its runs in `store` (a database URL), default a SQLite file under `root`;
    not waited for.

    Artifacts go to `artifacts` (an `s3://bucket/prefix` with the S3 variables of `env`: s3_env), default a folder
    under `root`; the server proxies them (`--serve-artifacts`), so clients need no access to the store.
    Started again with the same `root` (or `store`) and port, it serves the same runs (the tests stop and restart it).
    """
    if artifacts is None:
        artifacts = str(root / "mlartifacts")
        Path(artifacts).mkdir(parents=True, exist_ok=True)
    # No job runner: it serves MLflow's GenAI jobs, which no pipeline uses, and its eight extra processes doubled
    # the server's start-up time on a 2-core machine.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
    if "AWS_ENDPOINT_URL" in env:  # MLflow's own variable for an S3 endpoint that is not AWS
        env["MLFLOW_S3_ENDPOINT_URL"] = env["AWS_ENDPOINT_URL"]
    if store:  # it may hold a password: in the environment (`mlflow server` reads it there), off the command line
        env["MLFLOW_BACKEND_STORE_URI"] = store
    backend = [] if store else ["--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"]
    return _start("mlflow", [str(BIN / "mlflow"), "server", *backend, "--artifacts-destination", artifacts,
                             "--serve-artifacts", "--host", HOST, "--port", str(port), "--workers", "1"],
                  port, f"http://{HOST}:{port}", root / "logs", env)


def wait_mlflow(svc: Service, timeout: float = 240) -> None:
    """Return once the MLflow server `svc` answers its health check."""
    _wait(svc, _http_ok(f"{svc.url}/health"), timeout)


def _ray_node_args(cpus: int) -> list[str]:
    # A free port for what Ray would otherwise put on a fixed one (dashboard agent 52365), so the nodes start
    # beside other Ray instances on the machine.
    return ["--node-ip-address", HOST, "--num-cpus", str(cpus), "--object-store-memory", str(OBJECT_STORE_BYTES),
            "--dashboard-agent-listen-port", str(free_port()), "--block", "--disable-usage-stats"]


def ray_node_env(extra: dict[str, str]) -> dict[str, str]:
    """Environment of a Ray node on this machine: the in-process Ray's quiet settings (no drain watcher, no metrics
    export, Ray Train polling its workers every 0.5 s), token auth, and `extra` (the S3 variables: as on a cluster
    whose nodes hold credentials for the object store)."""
    return {"RAY_USAGE_STATS_ENABLED": "0", **LOCAL_RAY_ENV, **RAY_CLIENT_ENV, **extra}


def start_ray_head(root: Path, port: int, temp_dir: str, cpus: int, env: dict[str, str],
                   dashboard_port: int | None = None) -> Service:
    """A Ray head node (GCS on HOST:`port`) with `cpus` CPUs; not waited for (wait_ray_nodes). No dashboard unless
    `dashboard_port` is given: then it serves Ray's state API (`ray.util.state`) on HOST:`dashboard_port`."""
    ensure_auth_token()
    dashboard = (["--include-dashboard", "true", "--dashboard-host", HOST, "--dashboard-port", str(dashboard_port)]
                 if dashboard_port else ["--include-dashboard", "false"])
    cmd = [str(BIN / "ray"), "start", "--head", "--port", str(port), "--temp-dir", temp_dir, *dashboard,
           *_ray_node_args(cpus)]
    return _start("ray-head", cmd, port, f"{HOST}:{port}", root / "logs", env)


def start_ray_worker(root: Path, head_port: int, cpus: int, env: dict[str, str],
                     resources: dict[str, float] | None = None, wrap: list[str] | None = None,
                     gpus: int | None = None) -> Service:
    """A Ray worker node joining the head on HOST:`head_port`, with `cpus` CPUs, custom `resources` and `gpus` GPUs
    advertised (Ray takes the number as given, GPU or not); not waited for. `wrap` is a command that runs the node's
    `ray start` (its arguments appended), e.g. in its own namespace."""
    cmd = [str(BIN / "ray"), "start", "--address", f"{HOST}:{head_port}", *_ray_node_args(cpus)]
    if gpus is not None:
        cmd += ["--num-gpus", str(gpus)]
    if resources:
        cmd += ["--resources", json.dumps(resources)]
    return _start("ray-worker", [*(wrap or []), *cmd], head_port, f"{HOST}:{head_port}", root / "logs", env)


def wait_gcs(head: Service, timeout: float = 240) -> None:
    """Return once the head node's GCS accepts connections: enough for a worker node to join (`ray start` waits for
    the rest), and much sooner than a driver could connect."""
    def listening() -> bool:
        try:
            socket.create_connection((HOST, head.port), timeout=1).close()
            return True
        except OSError:
            return False
    _wait(head, listening, timeout)


def wait_ray_nodes(svc: Service, head_port: int, count: int, timeout: float = 240) -> None:
    """Return once the cluster of the head on HOST:`head_port` has `count` alive nodes; `svc` is the node waited
    for (its exit ends the wait).

    One driver process joins and polls the node list (joining costs seconds; it is started again only if it fails,
    e.g. while the head is still starting). Ours stays Ray-free.
    """
    code = ("import time, ray\n"
            f"ray.init(address='{HOST}:{head_port}', logging_level='ERROR', log_to_driver=False)\n"
            f"while sum(n['Alive'] for n in ray.nodes()) < {count}:\n"
            "    time.sleep(0.2)\n")
    probe: subprocess.Popen | None = None

    def joined() -> bool:
        nonlocal probe
        if probe is not None and probe.poll() == 0:
            return True
        if probe is None or probe.returncode is not None:
            probe = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                     env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **RAY_CLIENT_ENV})
        return False

    try:
        _wait(svc, joined, timeout)
    finally:
        if probe is not None and probe.poll() is None:
            probe.kill()
            probe.wait()


def kill(svc: Service, wait: float = 10) -> None:
    """SIGKILL every process of the service's session at once (no grace), reap its leader, and wait (up to
    `wait` seconds) until they are gone. A killed process with much memory to free stays listed for a moment, and
    a server's master can fork a new worker between our listing and the kill: the remaining ones are killed again
    (the clean-clone CI once found four MLflow processes alive right after `alignpipe down` on a loaded machine)."""
    deadline = time.monotonic() + wait
    while True:
        _signal(_session_pids(svc.pid), signal.SIGKILL)
        _reap(svc.pid)
        time.sleep(0.05)
        if not _session_pids(svc.pid) or time.monotonic() > deadline:
            return


def down(workdir: str | Path, grace: float = 15) -> list[str]:
    """Stop every recorded service and forget the stack; returns the services that were still running.

    Each service is stopped as a whole session (its pid is the session id, from `start_new_session`), not a
    process group: Ray worker processes put themselves in groups of their own but stay in the session.
    All get SIGTERM at once (Ray nodes drain for a while; PostgreSQL gets its own STOP_SIGNALS), what is left after
    `grace` seconds gets SIGKILL.
    """
    stack = load(workdir)
    if stack is None:
        return []
    running = [s for s in stack.services if _session_pids(s.pid)]
    for svc in running:
        if svc.name in STOP_SIGNALS:
            _signal([svc.pid], STOP_SIGNALS[svc.name])
        else:
            _signal(_session_pids(svc.pid), signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_session_pids(s.pid) for s in running):
        time.sleep(0.3)
    for svc in running:
        kill(svc)
    state_file(workdir).unlink(missing_ok=True)
    shutil.rmtree(ray_temp_dir(workdir), ignore_errors=True)
    return [s.name for s in running]


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes whose session id is `sid`, and their children that started sessions of their own:
    PostgreSQL's postmaster puts each of its processes in a new session, and one killed with them left would leave
    its checkpointer running."""
    procs = {}  # pid: (parent pid, session id)
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if stat[0] != "Z":
                procs[int(proc.name)] = (int(stat[1]), int(stat[3]))
    members = {pid for pid, (_, session) in procs.items() if session == sid}
    return sorted(members | {pid for pid, (parent, _) in procs.items() if parent in members})


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def status(workdir: str | Path) -> list[tuple[Service, bool]]:
    """Each recorded service and whether its process still runs."""
    stack = load(workdir)
    return [(s, alive(s.pid)) for s in stack.services] if stack else []
