"""bench/ray_overhead.py: the Pauser stops every process of the run but the training worker, only in its windows,
and always lets them run again; steps are split by the windows they fall in."""

import importlib.util
import subprocess
import time

import psutil
import pytest

from testlib import REPO

spec = importlib.util.spec_from_file_location("bench_ray_overhead", REPO / "bench" / "ray_overhead.py")
ray_overhead = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ray_overhead)


def _child(name: str) -> subprocess.Popen:
    """A child of this process whose command line reads like a Ray process (`ray::RayTrainWorker`, `raylet`)."""
    return subprocess.Popen([name, "60"], executable="sleep")


def _stopped(proc: subprocess.Popen) -> bool:
    return psutil.Process(proc.pid).status() == psutil.STATUS_STOPPED


@pytest.fixture
def ray_like():
    procs = {"worker": _child("ray::RayTrainWorker"), "raylet": _child("raylet"),
             "controller": _child("ray::TrainController.run")}
    yield procs
    for p in procs.values():
        p.kill()
        p.wait()


def _until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_pauser_stops_all_but_the_training_worker_in_its_windows(ray_like):
    pauser = ray_overhead.Pauser(window=1.0, cycles=2, warmup=0.1)
    pauser.start()
    try:
        _until(lambda: _stopped(ray_like["raylet"]))
        assert _stopped(ray_like["controller"])
        assert not _stopped(ray_like["worker"])
        # the running window between the two paused ones: every process is continued (one after another: under
        # load the test can look between two of them, so it waits for both)
        _until(lambda: not _stopped(ray_like["raylet"]) and not _stopped(ray_like["controller"]))
        _until(lambda: len(pauser.paused) == 2, timeout=15)
    finally:
        pauser.stop()
    for (a, b), (c, _) in zip(pauser.paused, pauser.paused[1:]):
        assert 0.9 < b - a < 2.0 and c - b > 0.9
    assert not any(_stopped(p) for p in ray_like.values())


def test_pauser_stopped_mid_window_lets_everything_run_again(ray_like):
    pauser = ray_overhead.Pauser(window=30.0, cycles=1, warmup=0.0)
    pauser.start()
    _until(lambda: _stopped(ray_like["raylet"]))
    pauser.stop()  # what trial() does when training ends (or fails) inside a window
    assert not any(_stopped(p) for p in ray_like.values())
    assert len(pauser.paused) == 1


def test_each_paused_window_is_read_against_its_neighbours():
    # step i runs from stamps[i-1] to stamps[i]; one step a second; window 4-6 s, its neighbours 2-4 s and 6-8 s
    stamps = [float(t) for t in range(11)]
    rates = [1.0, 90.0, 100.0, 100.0, 100.0, 150.0, 150.0, 120.0, 120.0, 90.0, 90.0]
    [cycle] = ray_overhead.pause_cycles(stamps, rates, [(4.0, 6.0)])
    assert cycle == {"paused": 150.0, "running": 110.0, "paused_steps": 2, "running_steps": 4}
    # a step that straddles a window's edge counts nowhere; a window with no step wholly inside is dropped
    assert ray_overhead.steps_within(stamps, rates, 3.5, 6.0) == [150.0, 150.0]
    assert ray_overhead.pause_cycles(stamps, rates, [(4.5, 5.5)]) == []
    assert ray_overhead.steps_within(stamps, rates, 0.0, 2.0) == [90.0, 100.0]  # rates[0] (warm-up) never counts
