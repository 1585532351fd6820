"""The local stack behind `alignpipe up | down | status | env`: Prefect server, MLflow server, 2-node Ray cluster.

Every service is a child process in its own session (process group), asked to bind 127.0.0.1 (Prefect and
MLflow do; Ray's gRPC servers listen on every interface regardless, see RAY_CLIENT_ENV); their pids, ports
and URLs go to `<workdir>/stack/state.json`, so `down` stops exactly what `up` started and nothing else
(no `ray stop`, which would stop every Ray instance on the machine). It lives with the CLI because only the
CLI and the tests use it.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
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
        if "mlflow" in by:
            out["MLFLOW_TRACKING_URI"] = by["mlflow"].url
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


def free_port() -> int:
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


def _start(name: str, cmd: list[str], port: int, url: str, logs: Path, env: dict[str, str]) -> Service:
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **env}, start_new_session=True)
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
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **RAY_CLIENT_ENV})
    except subprocess.TimeoutExpired:  # not up yet (or gone): the caller's wait decides
        return 0
    lines = proc.stdout.strip().splitlines()
    return int(lines[-1]) if proc.returncode == 0 and lines and lines[-1].isdigit() else 0


def up(workdir: str | Path, on_wait: Callable[[str], None] = print, ray_cpus: int = 1,
       timeout: float = 240) -> Stack:
    """Start Prefect server, MLflow server and a Ray head + one worker node; returns the recorded stack."""
    workdir = Path(workdir).resolve()
    current = load(workdir)
    if current and any(alive(s.pid) for s in current.services):
        raise StackError(f"a stack from {state_file(workdir)} is already running; `alignpipe down` stops it")
    root = workdir / "stack"
    logs = root / "logs"
    stack = Stack(workdir=str(workdir))
    try:
        port = free_port()
        prefect = _start("prefect", [str(BIN / "prefect"), "server", "start", "--host", HOST, "--port", str(port)],
                         port, f"http://{HOST}:{port}", logs,
                         {"PREFECT_HOME": str(root / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                          "PREFECT_API_URL": f"http://{HOST}:{port}/api"})
        stack.services.append(prefect)
        save(stack)

        mlflow = start_mlflow(root, free_port())
        stack.services.append(mlflow)
        save(stack)
        # Both must hold their ports before Ray starts: Ray's nodes bind many ports of the same ephemeral range
        # that `free_port` picked from, and one of them took the Prefect port while Prefect was still starting
        # (its health check got an HTTP/2 answer from a Ray gRPC server).
        on_wait(f"Prefect server on {prefect.url}")
        _wait(prefect, _http_ok(f"{prefect.url}/api/health"), timeout)
        on_wait(f"MLflow server on {mlflow.url}")
        wait_mlflow(mlflow, timeout)

        temp_dir = ray_temp_dir(workdir)
        ensure_auth_token()
        port = free_port()
        # Both nodes on this machine: the in-process Ray's quiet settings (no drain watcher, no metrics export,
        # Ray Train polling its workers every 0.5 s)
        ray_env = {"RAY_USAGE_STATS_ENABLED": "0", **LOCAL_RAY_ENV, **RAY_CLIENT_ENV}
        common = ["--num-cpus", str(ray_cpus), "--object-store-memory", str(OBJECT_STORE_BYTES), "--block",
                  "--disable-usage-stats"]
        # A free port for what Ray would otherwise put on a fixed one (dashboard agent 52365), so the stack
        # starts beside other Ray instances on the machine.
        head = _start("ray-head", [str(BIN / "ray"), "start", "--head", "--node-ip-address", HOST, "--port",
                                   str(port), "--temp-dir", temp_dir, "--include-dashboard", "false",
                                   "--dashboard-agent-listen-port", str(free_port()), *common],
                      port, f"{HOST}:{port}", logs, ray_env)
        stack.services.append(head)
        save(stack)
        on_wait(f"Ray head node on {HOST}:{port}")
        _wait(head, lambda: _ray_nodes(head.port) >= 1, timeout)
        worker = _start("ray-worker", [str(BIN / "ray"), "start", "--address", f"{HOST}:{head.port}",
                                       "--node-ip-address", HOST, "--dashboard-agent-listen-port",
                                       str(free_port()), *common],
                        head.port, f"{HOST}:{head.port}", logs, ray_env)
        stack.services.append(worker)
        save(stack)

        on_wait("Ray worker node joining the head")
        _wait(worker, lambda: _ray_nodes(head.port) >= 2, timeout)
    except BaseException:
        down(workdir)
        raise
    return stack


def start_mlflow(root: Path, port: int) -> Service:
    """An MLflow server on HOST:`port` with its SQLite store and artifacts under `root`; not waited for.

    Started again with the same `root` and port, it serves the same runs (the tests stop and restart it).
    """
    (root / "mlartifacts").mkdir(parents=True, exist_ok=True)
    return _start("mlflow", [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--artifacts-destination", str(root / "mlartifacts"), "--host", HOST, "--port",
                             str(port), "--workers", "1"],
                  port, f"http://{HOST}:{port}", root / "logs", {})


def wait_mlflow(svc: Service, timeout: float = 240) -> None:
    """Return once the MLflow server `svc` answers its health check."""
    _wait(svc, _http_ok(f"{svc.url}/health"), timeout)


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
    All get SIGTERM at once (Ray nodes drain for a while), what is left after `grace` seconds gets SIGKILL.
    """
    stack = load(workdir)
    if stack is None:
        return []
    running = [s for s in stack.services if _session_pids(s.pid)]
    for svc in running:
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
    """Live (non-zombie) processes whose session id is `sid`."""
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[3]) == sid and stat[0] != "Z":
                out.append(int(proc.name))
    return out


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def status(workdir: str | Path) -> list[tuple[Service, bool]]:
    """Each recorded service and whether its process still runs."""
    stack = load(workdir)
    return [(s, alive(s.pid)) for s in stack.services] if stack else []
