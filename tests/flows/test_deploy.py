"""Deployments on a real local Prefect server (the `alignpipe up` stack): schedules, the parameter form, runs
launched through the API as the UI launches them (on the 2-node Ray cluster), cancellation, and the UI page."""

import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Cancelling

from alignpipe import tracking
from alignpipe.cli import stack
from alignpipe.flows.deploy import apply_deployments, build_deployments
from testlib import REPO, stack_pipelines

# one stack per test process: with `make test`'s two xdist workers, every module using it (or `offbox`, built on
# it) shares one worker
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("stack")]
SCHEDULES = {"smoke": {"cron": "0 3 * * 1", "timezone": "Europe/Lisbon"}, "demo": {"interval_seconds": 86400}}
ARTIFACTS = REPO / "tests" / "output"  # gitignored: screenshots for humans to look at
CHROMIUM = shutil.which("chromium-headless-shell") or shutil.which("chromium")


@pytest.fixture(scope="module")
def deployed(local_stack, tmp_path_factory, tiny_model):
    """Both shipped pipelines deployed to the stack's Prefect server; yields (pipelines file, name -> id)."""
    path = stack_pipelines(tmp_path_factory.mktemp("deploy"), tiny_model, SCHEDULES)
    with temporary_settings({PREFECT_API_URL: local_stack.env["PREFECT_API_URL"]}):
        yield path, apply_deployments(build_deployments(path))


@pytest.fixture(scope="module")
def server(local_stack, deployed):
    """`alignpipe deploy --serve` against the stack, as a user runs it; stopped (whole session) at the end."""
    log = open(deployed[0].parent / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "alignpipe.cli.main", "deploy", "--serve", "--config", str(deployed[0])],
                            cwd=REPO, env={**os.environ, **local_stack.env, "PREFECT_RUNNER_POLL_FREQUENCY": "1"},
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # picks a run up within 1 s
    try:
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _client(local_stack):
    with temporary_settings({PREFECT_API_URL: local_stack.env["PREFECT_API_URL"]}):
        return get_client(sync_client=True)


def _wait_state(client, run_id, done, timeout=900):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.read_flow_run(run_id)
        if done(run.state):
            return run
        time.sleep(0.5)
    raise AssertionError(f"flow run {run_id} still {run.state.name} after {timeout}s")


def _train_workers(local_stack) -> list[int]:
    """Ray Train worker processes of the stack's cluster (other Ray instances on the machine do not count)."""
    sessions = {s.pid for s in local_stack.services if s.name.startswith("ray")}
    return [pid for sid in sessions for pid in stack._session_pids(sid) if b"RayTrainWorker" in _cmdline(pid)]


def _cmdline(pid: int) -> bytes:
    """A process's command line; empty once it has exited (workers exit while we list them after a cancel)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return b""


def test_deployments_have_schedules_and_a_typed_form(local_stack, deployed):
    with _client(local_stack) as client:
        smoke = client.read_deployment_by_name("alignpipe/smoke")
        demo = client.read_deployment_by_name("alignpipe/demo")
    assert {str(smoke.id), str(demo.id)} == set(deployed[1].values())
    (cron,) = [s.schedule for s in smoke.schedules]
    assert (cron.cron, cron.timezone) == ("0 3 * * 1", "Europe/Lisbon")
    (interval,) = [s.schedule for s in demo.schedules]
    assert interval.interval.total_seconds() == 86400
    assert smoke.parameters == {"pipeline": "smoke", "overrides": {}, "config_file": str(deployed[0])}
    props = smoke.parameter_openapi_schema["properties"]
    assert props["pipeline"]["type"] == "string" and props["pipeline"]["enum"] == ["demo", "smoke"]
    assert [t["type"] for t in props["overrides"]["anyOf"]] == ["object", "null"]
    assert "section.key" in props["overrides"]["description"]  # the form explains itself
    assert props["config_file"]["type"] == "string"
    assert smoke.enforce_parameter_schema


def test_the_servers_scheduler_creates_the_scheduled_runs(local_stack, deployed):
    """The schedules fire: the server's scheduler service puts each deployment's upcoming runs on the calendar
    (it schedules a freshly changed deployment within seconds). Then the schedules are paused and their runs
    gone, so that none comes due while later tests serve the deployments.

    (With SQLAlchemy 2.1 the scheduler service of Prefect 3.8.8 failed on every pass, "Can't evaluate bulk DML
    statement", and no schedule ever fired; the lock pins 2.0.)"""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with _client(local_stack) as client:
        ids = list(deployed[1].values())
        deadline, runs = time.monotonic() + 120, []
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=ids)))
            if {str(r.deployment_id) for r in runs} == set(ids):
                break
            time.sleep(2)
        for deployment_id in ids:
            for schedule in client.read_deployment(deployment_id).schedules:
                client.update_deployment_schedule(deployment_id, schedule.id, active=False)
        left = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=ids)))
    seen = {str(r.deployment_id) for r in runs}
    assert seen == set(ids), "the scheduler created no runs for " + ", ".join(
        name for name, i in deployed[1].items() if i not in seen)
    assert all(r.state.is_scheduled() and r.expected_start_time > datetime.now(timezone.utc) for r in runs)
    assert left == []  # pausing a schedule removed the runs it had put on the calendar


@pytest.fixture(scope="module")
def launched_run(local_stack, deployed, server):
    """As the UI's "Run" button: a flow run from the deployment, picked up by the serve process; its final
    state (the UI test opens its page)."""
    with _client(local_stack) as client:
        run = client.create_flow_run_from_deployment(
            deployed[1]["smoke"], parameters={"overrides": {"compute.num_workers": 2, "quantize.method": "none",
                                                            "evaluate.compare_base": False}})
        # SFT and DPO are under test (and the artifacts the UI test opens, which need no base model)
        return _wait_state(client, run.id, lambda s: s.is_final())


def test_run_launched_through_the_api_trains_ddp_on_two_nodes(local_stack, launched_run):
    """Launched as the UI's "Run" button does, the run trains with DDP on the cluster's two nodes."""
    assert launched_run.state.is_completed(), launched_run.state.message

    mlflow = tracking.client_for(local_stack.env["MLFLOW_TRACKING_URI"])
    experiment = mlflow.get_experiment_by_name("alignpipe-smoke").experiment_id
    for stage, rows, steps in (("sft", 64, 6), ("align", 32, 4)):  # smoke's rows and pairs, max_steps
        (run,) = mlflow.search_runs([experiment], f"tags.`{tracking.TAG_FLOW_RUN}` = '{launched_run.id}' and "
                                                  f"tags.`{tracking.TAG_STAGE}` = '{stage}'")
        metrics = run.data.metrics
        # Two workers of 1 CPU on nodes of 1 CPU each: one per node; DDP kept their weights identical.
        assert metrics["final/ranks_in_sync"] == 1.0, stage
        # Each read only its own half of validate's shards (one row group: split within it), none twice.
        assert (metrics["final/rows_disjoint"], metrics["final/rows_read"]) == (1.0, rows), stage
        assert metrics["final/global_step"] == steps, stage


def test_cancelling_a_run_stops_its_ray_training_workers(local_stack, deployed, server):
    with _client(local_stack) as client:
        run = client.create_flow_run_from_deployment(
            deployed[1]["smoke"], parameters={"overrides": {"sft.max_steps": 100000, "sft.save_steps": 100000,
                                                            "sft.eval_steps": 100000}})
        deadline = time.monotonic() + 600
        while not _train_workers(local_stack):
            assert time.monotonic() < deadline, "training never started"
            assert not client.read_flow_run(run.id).state.is_final()
            time.sleep(2)
        client.set_flow_run_state(run.id, Cancelling(), force=True)  # what the UI's "Cancel" does
        final = _wait_state(client, run.id, lambda s: s.is_final(), timeout=300)
    assert final.state.is_cancelled(), final.state
    deadline = time.monotonic() + 120
    while _train_workers(local_stack) and time.monotonic() < deadline:
        time.sleep(1)
    assert _train_workers(local_stack) == []


def _browse(url: str, shot_name: str) -> str:
    """The page's DOM after the SPA rendered it (headless Chromium), and its screenshot in tests/output/."""
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / shot_name
    shot.unlink(missing_ok=True)
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000",
            "--window-size=1400,900"]
    dom = subprocess.run([*args, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    subprocess.run([*args, f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 10_000
    return dom


@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium: `make browser` installs chromium-headless-shell")
def test_prefect_ui_lists_the_deployments_with_their_schedules(local_stack, deployed):
    dom = _browse(local_stack.env["PREFECT_API_URL"].removesuffix("/api") + "/deployments",
                  "prefect-ui-deployments.png")
    assert ">smoke<" in dom and ">demo<" in dom, dom[-2000:]  # the SPA rendered the deployments table
    assert SCHEDULES["demo"] == {"interval_seconds": 86400}  # what `deployed` gave demo, not the shipped cron
    assert "Daily" in dom, dom[-2000:]  # how the UI writes an interval of 86400 s


def _click_tab_and_read(url: str, tab: str, wait_for: list[str], shot_name: str, timeout: float = 60) -> str:
    """Open `url` in headless Chromium, click the page's tab labelled `tab` (over the DevTools protocol: the
    flow-run page drops `?tab=` while the run is still loading), wait until the page shows every string in
    `wait_for`; returns the DOM and saves a screenshot in tests/output/."""
    import base64
    import itertools
    import json
    import re
    import tempfile
    import urllib.request

    from websockets.sync.client import connect  # websockets comes with Prefect

    ARTIFACTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,900",
                                 "--remote-debugging-port=0", f"--user-data-dir={profile}", url],
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            address = next(m.group(1) for line in proc.stderr
                           if (m := re.search(r"DevTools listening on ws://([^/]+)/", line)))
            pages = json.load(urllib.request.urlopen(f"http://{address}/json/list", timeout=30))
            ids = itertools.count(1)
            with connect(next(p["webSocketDebuggerUrl"] for p in pages if p["type"] == "page"), max_size=None) as ws:
                def call(method, **params):
                    n = next(ids)
                    ws.send(json.dumps({"id": n, "method": method, "params": params}))
                    while (msg := json.loads(ws.recv(timeout=30))).get("id") != n:  # skip events
                        pass
                    return msg["result"]

                def js(expr):
                    return call("Runtime.evaluate", expression=expr, returnByValue=True)["result"].get("value")

                click = ("(() => { const t = [...document.querySelectorAll('.p-tab')]"
                         f".find(e => e.textContent.trim() === {json.dumps(tab)}); if (t) t.click(); return !!t; }})()")
                deadline = time.monotonic() + timeout
                while not js(click):
                    assert time.monotonic() < deadline, f"no {tab!r} tab on {url}"
                    time.sleep(0.5)
                dom = ""
                while not all(s in dom for s in wait_for) and time.monotonic() < deadline:
                    time.sleep(0.5)
                    dom = js("document.documentElement.outerHTML")
                shot = call("Page.captureScreenshot", format="png")["data"]
                (ARTIFACTS / shot_name).write_bytes(base64.b64decode(shot))
                return dom
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the binary forks its renderers
            proc.wait()


@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium: `make browser` installs chromium-headless-shell")
def test_prefect_ui_shows_the_evaluation_table_on_the_finished_run(local_stack, launched_run):
    """The flow-run page's Artifacts tab lists the evaluation table and the promotion decision
    (flows/artifacts.py), where a user looks after a run."""
    assert launched_run.state.is_completed(), launched_run.state.message
    base = local_stack.env["PREFECT_API_URL"].removesuffix("/api")
    description = "Evaluation of smoke: each model side by side"  # the table artifact's
    want = ["evaluation-smoke", "promotion-smoke", description]  # all waited for: the list fills in as it loads
    dom = _click_tab_and_read(f"{base}/runs/flow-run/{launched_run.id}", "Artifacts", want,
                              "prefect-ui-flow-run-artifacts.png")
    assert all(text in dom for text in want), dom[-3000:]

