"""Many pipelines on one shared stack (bench/PROTOCOL.md, issue 27): concurrent smoke pipelines and promotions.

Starts `alignpipe up`'s stack (PostgreSQL behind Prefect and MLflow, S3, a 2-node Ray cluster) in a temporary
workdir, then:
  * one `alignpipe run smoke` alone, then four at once with distinct SFT seeds: failures and the wall-time ratio;
  * 16 `alignpipe promote` processes released together on two versions: lost alias moves and champions.

    .venv/bin/python bench/shared_stack.py [--out bench/out/shared_stack.json]
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from alignpipe import registry, tracking  # noqa: E402
from alignpipe.cli import stack  # noqa: E402
from testlib import READY_SET_GO, registry_version  # noqa: E402

def smoke(env: dict[str, str], work: Path, seed: int) -> subprocess.Popen:
    sets = {"workdir": str(work), "sft.seed": seed, "compute.cpus_per_worker": 1, "evaluate.cpus": 1,
            "quantize.cpus": 1, "tracking.experiment": "bench-shared", "tracking.registered_model": "bench-shared"}
    cmd = [sys.executable, "-m", "alignpipe.cli.main", "run", "smoke", "--config", str(ROOT / "pipelines.yaml"),
           *[arg for k, v in sets.items() for arg in ("--set", f"{k}={v}")]]
    log = open(work.parent / f"smoke-{seed}.log", "w")
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)


def pipelines(env: dict[str, str], root: Path) -> dict:
    t0 = time.perf_counter()
    alone = smoke(env, root / "work", 1).wait()
    alone_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    procs = [smoke(env, root / "work", seed) for seed in (2, 3, 4, 5)]
    codes = [p.wait() for p in procs]
    together_s = time.perf_counter() - t0
    return {"alone_exit": alone, "alone_s": round(alone_s, 1), "concurrent_exits": codes,
            "concurrent_failures": sum(c != 0 for c in codes), "concurrent_s": round(together_s, 1),
            "concurrent_over_alone": round(together_s / alone_s, 3)}


def promotions(env: dict[str, str], root: Path, calls: int = 16) -> dict:
    name = "bench-promote"
    client = tracking.client_for(env["MLFLOW_TRACKING_URI"])
    base = {"exact_match": 0.1, "json_validity": 0.5}
    v1 = registry_version(client, name, {"exact_match": 0.5, "json_validity": 1.0}, base, root / "v1")
    v2 = registry_version(client, name, {"exact_match": 0.7, "json_validity": 1.0}, base, root / "v2")
    go = root / "go"
    procs = [subprocess.Popen([sys.executable, "-c", READY_SET_GO, str(go), "promote", name, v, "--reason",
                               f"bench {i}", "--config", str(ROOT / "pipelines.yaml")], cwd=ROOT,
                              env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i, v in enumerate([v1, v2] * (calls // 2))]
    for p in procs:
        p.stdout.readline()
    t0 = time.perf_counter()
    go.touch()
    for p in procs:
        p.communicate()
    seconds = time.perf_counter() - t0
    codes = [p.returncode for p in procs]
    events = [e for v in (v1, v2) for e in json.loads(client.get_model_version(name, v).tags.get("alias_history", "[]"))
              if e["alias"] == registry.CHAMPION and e["action"] == "set"]
    champions = [v for v in (v1, v2) if registry.CHAMPION in client.get_registered_model(name).aliases
                 and client.get_registered_model(name).aliases[registry.CHAMPION] == v]
    return {"calls": calls, "exits": codes, "promoted": codes.count(0), "champion_set_events": len(events),
            "lost_moves": codes.count(0) - len(events), "champions": len(champions),
            "champion_is_better_version": champions == [v2], "seconds": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "shared_stack.json")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-shared-"))
    workdir = root / "stack"
    try:
        env = stack.up(workdir, on_wait=lambda what: print(f"waiting for {what}", flush=True)).env
        result = {"promotions": promotions(env, root), "pipelines": pipelines(env, root)}
    finally:
        stack.down(workdir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
