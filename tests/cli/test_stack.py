"""cli/stack.py: every socket the local stack listens on is bound to loopback, so nothing is reachable from the network."""

import socket

import psutil
import pytest

from alignpipe.cli import stack

# one stack per test process: with `make test`'s two xdist workers, these modules share one worker
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("local_stack")]

LOOPBACK = ("127.0.0.1", "::1")


def _listening(pids: list[int]) -> list[tuple[int, str, str, int]]:
    """(pid, process name, ip, port) of every listening TCP socket and every bound UDP socket of `pids`."""
    out = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            conns = proc.net_connections(kind="inet")
            name = proc.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue  # a short-lived helper that exited while we looked
        for c in conns:
            tcp_listen = c.status == psutil.CONN_LISTEN
            udp_bound = c.type == socket.SOCK_DGRAM and c.laddr and not c.raddr  # a bound UDP socket listens too
            if tcp_listen or udp_bound:
                out.append((pid, name, c.laddr.ip, c.laddr.port))
    return out


def _exposed(local_stack, names: set[str]) -> dict[str, list]:
    """Per service in `names`: its sockets beyond loopback, after checking its own port was among those read."""
    by_service = {s.name: _listening(stack._session_pids(s.pid)) for s in local_stack.services if s.name in names}
    for svc in local_stack.services:  # a server's own port is among what we read (the worker node has none)
        if svc.name in names and svc.name != "ray-worker":
            assert svc.port in {port for *_, port in by_service[svc.name]}, (svc.name, by_service[svc.name])
    return {name: [s for s in socks if s[2] not in LOOPBACK] for name, socks in by_service.items()}


def test_prefect_and_mlflow_listen_on_loopback_only(local_stack):
    exposed = _exposed(local_stack, {"prefect", "mlflow"})
    assert not any(exposed.values()), f"sockets beyond loopback: {exposed}"


@pytest.mark.xfail(strict=True, reason="Ray 2.60 binds its GCS, raylet and worker gRPC servers to :: and the "
                   "runtime-env agent to the host's address whatever --node-ip-address says; nothing in `ray start` "
                   "changes that. Token auth (RAY_AUTH_MODE=token) is the guard. Strict: passes once Ray can do it.")
def test_ray_nodes_listen_on_loopback_only(local_stack):
    exposed = _exposed(local_stack, {"ray-head", "ray-worker"})
    assert not any(exposed.values()), f"sockets beyond loopback: {exposed}"
