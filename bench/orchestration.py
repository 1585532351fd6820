"""Orchestration overhead of `smoke` against the local stack, and the fixed costs around it.

    python bench/orchestration.py [--runs 2]

Starts a stack in a temp workdir (timed), runs `alignpipe run smoke` against it with the tiny model, and
reports per run: flow duration (Prefect's start/end times), the stages' own wall time, and the difference
(the overhead target: <= 20 s). Fixed costs reported apart: stack start, CLI import, process wall time
outside the flow. Writes bench/out/orchestration.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()

    from alignpipe.cli import stack
    from testlib import stack_pipelines

    out: dict = {"runs": []}
    tmp = Path(tempfile.mkdtemp(prefix="alignpipe-bench-"))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import alignpipe.cli.main, alignpipe.flows.pipeline"], cwd=REPO, check=True)
    out["import_cli_and_flow_s"] = time.perf_counter() - t0

    from alignpipe.config import TINY_MODEL
    from alignpipe.models import resolve_model

    tiny = resolve_model(TINY_MODEL, tmp / "models")
    config = stack_pipelines(tmp, tiny)
    t0 = time.perf_counter()
    st = stack.up(tmp / "stack", on_wait=lambda what: print(f"waiting for {what}", flush=True))
    out["stack_up_s"] = time.perf_counter() - t0
    try:
        env = {**os.environ, **st.env}
        for i in range(args.runs):
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "alignpipe.cli.main", "run", "smoke", "--config", str(config)],
                                  cwd=REPO, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            assert proc.returncode == 0, proc.stderr[-3000:]
            summary = json.loads(max((tmp / "work" / "runs").glob("*.json"), key=os.path.getmtime).read_text())
            flow_s = _flow_seconds(st.env["PREFECT_API_URL"], summary["flow_run_id"])
            stages_s = sum(s["seconds"] for s in summary["stages"])
            out["runs"].append({"run": i + 1, "process_wall_s": wall, "flow_s": flow_s, "stages_s": stages_s,
                                "overhead_s": flow_s - stages_s, "outside_flow_s": wall - flow_s,
                                "stages": {s["stage"]: round(s["seconds"], 1) for s in summary["stages"]}})
            print(json.dumps(out["runs"][-1]), flush=True)
    finally:
        stack.down(tmp / "stack")
    path = REPO / "bench" / "out" / "orchestration.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}, indent=2))


def _flow_seconds(api_url: str, flow_run_id: str) -> float:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
    return (run.end_time - run.start_time).total_seconds()


if __name__ == "__main__":
    main()
