"""Wall time of `alignpipe run smoke` with storage on a local folder vs on an S3 API server (bench/PROTOCOL.md).

Starts a moto S3 server on 127.0.0.1 (the local stack's own service), then runs the smoke pipeline in fresh
processes, interleaved local, s3, s3, local, ... so a host that drifts affects both sides alike.

    .venv/bin/python bench/storage_overhead.py --trials 3 [--out bench/out/storage_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alignpipe.cli import stack  # noqa: E402

BUCKET = "bench"


def trial(kind: str, root: Path, s3_env: dict[str, str], n: int) -> float:
    """One `alignpipe run smoke` in a fresh workdir; returns its wall time in seconds."""
    work = root / f"{kind}-{n}"
    sets = {"workdir": str(work), "tracking.mlflow_uri": f"sqlite:///{work / 'mlflow.db'}",
            "compute.storage_path": f"s3://{BUCKET}/{kind}-{n}" if kind == "s3" else str(work / "storage")}
    cmd = [sys.executable, "-m", "alignpipe.cli.main", "run", "smoke", "--config", str(ROOT / "pipelines.yaml"),
           *[arg for k, v in sets.items() for arg in ("--set", f"{k}={v}")]]
    env = {**os.environ, "PREFECT_API_URL": "", **(s3_env if kind == "s3" else {})}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{kind} trial {n} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    print(f"{kind} trial {n}: {seconds:.1f} s", flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "storage_overhead.json")
    args = parser.parse_args()
    order = [kind for i in range(args.trials) for kind in (("local", "s3") if i % 2 == 0 else ("s3", "local"))]
    with tempfile.TemporaryDirectory(prefix="storage-bench-") as tmp:
        root = Path(tmp)
        try:
            s3 = stack.start_s3(root, stack.free_port())
            stack.save(stack.Stack(workdir=str(root), services=[s3]))
            env = stack.s3_env(s3.url, stack.s3_credentials(root))
            stack.wait_s3(s3, BUCKET, env, 120)
            times: dict[str, list[float]] = {"local": [], "s3": []}
            for n, kind in enumerate(order):
                times[kind].append(trial(kind, root, env, n))
        finally:
            stack.down(root)
    local, s3_median = statistics.median(times["local"]), statistics.median(times["s3"])
    result = {"local_s": times["local"], "s3_s": times["s3"], "local_median_s": local, "s3_median_s": s3_median,
              "s3_over_local": s3_median / local, "target": 1.3, "order": order,
              "date": time.strftime("%Y-%m-%d"), "host": _host()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def _host() -> str:
    flags = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "?")
    return f"{model}, {os.cpu_count()} cores, {'native bf16' if ' avx512_bf16' in flags else 'no native bf16'}"


if __name__ == "__main__":
    main()
