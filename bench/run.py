"""`make bench`: measure the issue targets on this machine and write bench/results.{json,md} + the README table.

Measures (all on the embedded SmolLM2-135M-Instruct and the demo data):
  * SFT tokens/s: inside Ray Train (the pipeline's path), the same trainer in-process, and TRL's SFTTrainer
    with its default settings (gradient checkpointing on) on the same conversations;
  * the whole `demo` pipeline: wall time, and held-out exact match of base vs tuned.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alignpipe import tracking  # noqa: E402
from alignpipe.config import load_pipeline  # noqa: E402
from alignpipe.data.formats import load_sft, write_jsonl  # noqa: E402
from alignpipe.models import resolve_model  # noqa: E402
from alignpipe.runs import RunContext, file_digest  # noqa: E402

RESULTS = ROOT / "bench" / "results.json"
TABLE = ROOT / "bench" / "results.md"
MARK_BEGIN, MARK_END = "<!-- bench:begin -->", "<!-- bench:end -->"


def steady_tokens_per_s(uri: str, run_id: str) -> float:
    """Median of the per-interval tokens/s logged by MlflowStream, skipping the first (warm-up) interval."""
    values = [v for _, v in sorted(tracking.metric_history(uri, run_id, "tokens_per_s"))]
    return statistics.median(values[1:] if len(values) > 2 else values)


def sft_throughput(steps: int, rows: int) -> dict[str, float]:
    import torch
    from trl import SFTConfig, SFTTrainer

    from tasks.sft import MlflowStream, build_trainer, loop_settings, peft_config, run_sft

    work = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    overrides = {"workdir": str(work), "sft.max_steps": steps, "sft.eval_fraction": 0.0, "sft.logging_steps": 1,
                 "sft.save_steps": 10_000, "tracking.experiment": "bench"}
    cfg = load_pipeline(ROOT / "pipelines.yaml", "demo", overrides, env={})
    base = resolve_model(cfg.model.name, ROOT / ".alignpipe" / "models")
    train = write_jsonl(load_sft(cfg.data.sft.path, limit=rows), work / "train.jsonl")
    uri, exp = tracking.tracking_uri(cfg), tracking.ensure_experiment(cfg)

    def new_run(name):
        return tracking.start_run(uri, exp, name, {})

    out = {}
    # 1. The pipeline's own path: Ray Train TorchTrainer, one worker with 2 CPUs.
    parent = new_run("ray")
    ctx = RunContext(run_id="bench", pipeline="demo", tracking_uri=uri, experiment_id=exp, parent_run_id=parent,
                     workdir=str(work), base_model=base)
    res = run_sft(cfg, ctx, str(train), file_digest(train))
    out["sft_tokens_per_s_ray"] = steady_tokens_per_s(uri, res.mlflow_run_id)

    # 2. The same trainer in this process (torch threads = the 2 cores).
    torch.set_num_threads(int(cfg.compute.cpus_per_worker))
    run_id = new_run("in-process")
    conf = {**loop_settings(cfg, base, str(train))}
    trainer, _ = build_trainer(conf, str(work / "inproc"), [MlflowStream(uri, run_id)], log_progress=False)
    trainer.train()
    out["sft_tokens_per_s_inprocess"] = steady_tokens_per_s(uri, run_id)

    # 3. TRL's SFTTrainer with its defaults (same LoRA, batch size, length, data), in this process.
    from datasets import Dataset

    from alignpipe.chat import with_system

    rows_ = [{"messages": with_system(r["messages"], cfg.model.system_prompt)} for r in load_sft(str(train))]
    run_id = new_run("trl-defaults")
    trl_trainer = SFTTrainer(
        model=base,
        args=SFTConfig(output_dir=str(work / "trl"), max_steps=steps, per_device_train_batch_size=cfg.sft.batch_size,
                       max_length=cfg.sft.max_length, logging_steps=1, report_to="none", save_strategy="no",
                       use_cpu=True, disable_tqdm=True),
        train_dataset=Dataset.from_list(rows_),
        peft_config=peft_config(cfg.sft.peft),
        callbacks=[MlflowStream(uri, run_id)],
    )
    trl_trainer.train()
    out["sft_tokens_per_s_trl_defaults"] = steady_tokens_per_s(uri, run_id)
    return out


def demo_run() -> dict[str, float]:
    """The whole demo pipeline through the CLI in a fresh workdir (embedded model already built is reused)."""
    work = Path(tempfile.mkdtemp(prefix="bench-demo-"))
    models = ROOT / ".alignpipe" / "models"
    if models.is_dir():  # reuse the one-off GGUF conversion; its cost is reported by `prepare` in a fresh clone
        (work / "models").symlink_to(models)
    t0 = time.perf_counter()
    proc = subprocess.run([str(Path(sys.executable).parent / "alignpipe"), "run", "demo", "--set", f"workdir={work}"],
                          cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"demo failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    summary = json.loads(next((work / "runs").glob("*.json")).read_text())
    base, tuned = summary["metrics"]["base"], summary["metrics"]["sft"]
    return {"demo_wall_s": wall, "demo_stage_s": {s["stage"]: round(s["seconds"], 1) for s in summary["stages"]},
            "base_exact_match": base["exact_match"], "tuned_exact_match": tuned["exact_match"],
            "tuned_json_validity": tuned["json_validity"], "tuned_field_accuracy": tuned["field_accuracy"],
            **{f"tuned_{k.replace('/', '_')}": v for k, v in tuned.items() if k.startswith("field_accuracy/")}}


def write(results: dict) -> None:
    r = results
    rows = [
        ("`make demo` wall time (deps installed, model built)", f"{r['demo_wall_s'] / 60:.1f} min", "≤ 10 min",
         r["demo_wall_s"] <= 600),
        ("Tuned exact match (held-out, 400 rows)", f"{r['tuned_exact_match']:.3f}", "≥ 0.85",
         r["tuned_exact_match"] >= 0.85),
        ("Tuned − base exact match", f"{r['tuned_exact_match'] - r['base_exact_match']:+.3f} "
         f"(base {r['base_exact_match']:.3f})", "≥ +0.40", r["tuned_exact_match"] - r["base_exact_match"] >= 0.40),
        ("SFT tokens/s, Ray Train ÷ in-process", f"{r['sft_tokens_per_s_ray']:.0f} / {r['sft_tokens_per_s_inprocess']:.0f}"
         f" = {r['sft_tokens_per_s_ray'] / r['sft_tokens_per_s_inprocess']:.2f}", "≥ 0.90",
         r["sft_tokens_per_s_ray"] / r["sft_tokens_per_s_inprocess"] >= 0.9),
        ("SFT tokens/s, ours (Ray) ÷ TRL defaults", f"{r['sft_tokens_per_s_ray']:.0f} / "
         f"{r['sft_tokens_per_s_trl_defaults']:.0f} = {r['sft_tokens_per_s_ray'] / r['sft_tokens_per_s_trl_defaults']:.2f}",
         "≥ 1.50", r["sft_tokens_per_s_ray"] / r["sft_tokens_per_s_trl_defaults"] >= 1.5),
    ]
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in r.get("demo_stage_s", {}).items())
    md = [f"Measured {r['date']} on {r['machine']} (`make bench`; raw numbers in `bench/results.json`).", "",
          "| measure | result | target | met |", "|---|---|---|---|"]
    md += [f"| {a} | {b} | {c} | {'yes' if ok else 'no'} |" for a, b, c, ok in rows]
    md += ["", f"Demo stages: {stages}. Tuned model on the held-out split: JSON validity "
               f"{r['tuned_json_validity']:.3f}, field accuracy {r['tuned_field_accuracy']:.3f} (name "
               f"{r.get('tuned_field_accuracy_name', float('nan')):.3f}, age {r.get('tuned_field_accuracy_age', float('nan')):.3f}, "
               f"city {r.get('tuned_field_accuracy_city', float('nan')):.3f})."]
    text = "\n".join(md) + "\n"
    TABLE.write_text(text)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    readme = ROOT / "README.md"
    body = readme.read_text()
    if MARK_BEGIN in body:
        head, rest = body.split(MARK_BEGIN, 1)
        body = head + MARK_BEGIN + "\n" + text + MARK_END + rest.split(MARK_END, 1)[1]
        readme.write_text(body)
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=10, help="SFT steps per throughput measurement")
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--skip-demo", action="store_true", help="reuse the demo numbers from the last results.json")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results.update({"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
                    "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
                               f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, no GPU",
                    "python": platform.python_version()})
    results.update(sft_throughput(args.steps, args.rows))
    if not args.skip_demo:
        results.update(demo_run())
    write(results)


if __name__ == "__main__":
    main()
