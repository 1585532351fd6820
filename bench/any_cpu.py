"""The demo on both host classes of bench/PROTOCOL.md (issue 28, "Any hardware a user has").

For each host class, `alignpipe run demo` in a fresh workdir, as `make demo` runs it on a fresh clone after the
install (the embedded model is converted by its `prepare` stage, inside the timed run):
  * native: this machine as it is (`precision: auto`);
  * avx2: this machine capped at AVX2 (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS,
    FBGEMM_ENABLE_INSTRUCTIONS) with `precision: fp32` for sft, align and evaluate: a CPU without AVX-512.
Reads the wall time of the process, the stages' times, the SFT step time (MLflow), the serving choice (what was
registered, and its objective figure against the fastest candidate's) and the decoding speed of each artifact.

    .venv/bin/python bench/any_cpu.py [--hosts native avx2] [--out bench/out/any_cpu.json]
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

from alignpipe import tracking  # noqa: E402
from alignpipe.ray_runner import ISA_ENV  # noqa: E402
from alignpipe.serving_choice import HIGHER_IS_BETTER  # noqa: E402

HOSTS = {
    "native": ({}, []),
    "avx2": ({key: "AVX2" for key in ISA_ENV} | {"ATEN_CPU_CAPABILITY": "avx2"},
             ["sft.precision=fp32", "align.precision=fp32", "evaluate.precision=fp32"]),
}
USER_AVX2 = {"demo_min": 44, "sft_min": 8.5, "sft_steps": 143, "fp32_tokens_per_s": 75.2, "int8_tokens_per_s": 17.7}


def demo_process(work: Path, sets: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[int, float]:
    """`alignpipe run demo` in `work` with `--set`s, its output to `log`: exit code and wall time of the process."""
    cmd = [str(Path(sys.executable).parent / "alignpipe"), "run", "demo", "--set", f"workdir={work}"]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=out,
                              stderr=subprocess.STDOUT).returncode
    return code, time.perf_counter() - t0


def run_demo(host: str, root: Path) -> dict:
    env, sets = HOSTS[host]
    work = root / host
    log = root / f"{host}.log"
    code, wall = demo_process(work, sets, log, env)
    if code:
        sys.exit(f"demo on {host} failed (exit {code}); log: {log}")
    [summary_file] = (work / "runs").glob("*.json")
    summary = json.loads(summary_file.read_text())
    return {"host": host, "env": env, "sets": sets, "wall_s": round(wall, 1), "log": str(log),
            "stage_s": {s["stage"]: round(s["seconds"], 1) for s in summary["stages"]},
            "sft": sft_figures(work, summary["mlflow_run_id"]),
            "decode": {label: {k: m.get(k) for k in ("tokens_per_s", "latency_p95_ms", "exact_match", "rows",
                                                     "eval_seconds")}
                       for label, m in summary["metrics"].items()},
            "serving": serving(summary["serving_choice"]), "registered": summary["registered"]}


def sft_figures(work: Path, parent: str) -> dict:
    """The SFT stage's own figures: steps, seconds per step, tokens/s and the precision it chose (and why).

    Tokens/s is the Trainer's count of non-padding input tokens over its train runtime (`final/train_tokens_per_s`,
    bench/PROTOCOL.md), as the plain-TRL peers count theirs. A run from before the pipeline logged that count has
    only TRL's `num_tokens` at its logging steps: its last value, carried to the final step at the pace of its last
    logging interval, over the train runtime (`tokens_from` says which)."""
    client = tracking.client_for(f"sqlite:///{work}/mlflow.db")
    exp = client.get_experiment_by_name("alignpipe")
    [run] = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}' and "
                                                    f"tags.`{tracking.TAG_STAGE}` = 'sft'")
    m, p = run.data.metrics, run.data.params
    steps_per_s, runtime = m.get("train/steps_per_second"), m.get("train/runtime")
    tokens_per_s, tokens_from = m.get("final/train_tokens_per_s"), "trainer count"
    if tokens_per_s is None and runtime:
        seen = sorted((x.step, x.value) for x in client.get_metric_history(run.info.run_id, "num_tokens"))
        (s0, n0), (s1, n1) = seen[-2], seen[-1]
        steps = m.get("final/global_step", s1)
        tokens_per_s = (n1 + (steps - s1) * (n1 - n0) / (s1 - s0)) / runtime
        tokens_from = f"num_tokens at step {s1:.0f}, carried to step {steps:.0f}"
    return {"train_runtime_s": runtime, "s_per_step": round(1 / steps_per_s, 3) if steps_per_s else None,
            "tokens_per_s": tokens_per_s, "tokens_from": tokens_from,
            "last_interval_tokens_per_s": m.get("tokens_per_s"), "precision": p.get("precision.chosen"),
            "precision_reason": p.get("precision.reason")}


def serving(choice: dict) -> dict:
    """The registered artifact's objective figure over the best candidate's (1.0 = it is the fastest)."""
    objective = choice["objective"]
    figures = {c["label"]: c["figures"][objective] for c in choice["candidates"]}
    higher = HIGHER_IS_BETTER[objective]
    best = max(figures.values()) if higher else min(figures.values())
    won = figures[choice["winner"]]
    return {"winner": choice["winner"], "reason": choice["reason"], "objective": objective, "figures": figures,
            "registered_vs_best": round(best / won if higher else won / best, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", nargs="+", choices=list(HOSTS), default=list(HOSTS))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "any_cpu.json")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-any-cpu-"))
    flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[-1].split("\n", 1)[0].split()
    results = {"native_bf16": "avx512_bf16" in flags, "user_avx2": USER_AVX2, "workdir": str(root)}
    for host in args.hosts:
        print(f"any_cpu: demo on {host} in {root / host}", flush=True)
        results[host] = run_demo(host, root)
        print(json.dumps(results[host], indent=2), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
