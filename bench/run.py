"""`make bench`: measure the issue targets on this machine and write bench/results.{json,md} + the README table
(rendered from results.json alone by bench/table.py: one sitting, one host, one date).

Measures (all on the embedded SmolLM2-135M-Instruct and the demo data):
  * SFT tokens/s: inside Ray Train (the pipeline's path), the same trainer in-process, and TRL's SFTTrainer
    with its default settings on the same conversations;
  * the whole `demo` pipeline (validate, SFT, DPO, int8, four-artifact evaluation with cascade, register): wall
    time and every metric; then the same run again (cached) and `align: rlhf` on the same SFT model;
  * int8 vs fp32 generation speed at batch 16 and 1 on the demo's own merged and quantized folders (best of 3, taking turns);
  * orchestration overhead of `smoke` against the local stack (bench/orchestration.py);
  * concurrent smoke pipelines and promotions on one PostgreSQL-backed stack (bench/shared_stack.py);
  * the demo in a fresh workdir on both host classes, native bf16 and emulated AVX2/fp32 (bench/any_cpu.py);
  * the same work as the demo done by a plain TRL script (bench/plain_trl.py): wall time and exact match;
  * LoRA vs full fine-tuning of the same model, each in its own process (bench/lora_vs_full.py): trainable
    parameters, peak RSS, tokens/s, and achieved training FLOP/s over a measured matmul FLOP/s (bench/flops.py).
"""

from __future__ import annotations

import argparse
import json
import math
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
from alignpipe.kernels import int8_cpu  # noqa: E402
from alignpipe.models import resolve_model  # noqa: E402
from bench import flops, ray_overhead, table  # noqa: E402

RESULTS = ROOT / "bench" / "results.json"
TABLE = ROOT / "bench" / "results.md"
MARK_BEGIN, MARK_END = "<!-- bench:begin -->", "<!-- bench:end -->"
DEMO_BEGIN, DEMO_END = "<!-- demo:begin -->", "<!-- demo:end -->"  # the demo's side-by-side table
CHART = ROOT / "docs" / "demo_comparison.png"  # the demo's side-by-side chart (evaluate's plots/comparison.png)
# results.json keys read beyond the README table's (bench/table.py): results.md's header and detail, and
# `--int8-speed`'s rerun on the last demo's artifacts and `--reread-sft`'s. Nothing else is written to results.json.
DETAIL_KEYS = ("machine", "python", "versions", "allocator", "demo_workdir", "demo_stage_s",
               "sft_tokens_per_s_inprocess", "sft_ray_paused", "int8_tokens_per_s_bs1", "fp32_tokens_per_s_bs1",
               "int8_runtime", "plain_trl_metrics", "plain_trl_stage_s", "plain_trl_eval_dtype", "flops_n",
               "matmul_flops_per_s", "matmul_dtype_used", "matmul_threads", "plain_trl_competent_stage_s",
               "plain_trl_competent_metrics", "rlhf_stage_s")
TOP_LEVEL_READ = {key.split(".")[0] for key in table.keys_read()} | set(DETAIL_KEYS)
VERSIONED = ("torch", "transformers", "trl", "peft", "torchao", "datasets", "ray", "prefect", "mlflow")


def steady_tokens_per_s(uri: str, run_id: str) -> float:
    """Median of the per-interval tokens/s logged by MlflowStream, skipping the first (warm-up) interval."""
    values = [v for _, v in sorted(tracking.metric_history(uri, run_id, "tokens_per_s"))]
    return statistics.median(values[1:] if len(values) > 2 else values)


def sft_throughput(steps: int, rows: int, rounds: int) -> dict:
    import torch
    from trl import SFTConfig, SFTTrainer

    from alignpipe.callbacks import MlflowStream
    from alignpipe.training import peft_config

    work = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    overrides = {"workdir": str(work), "sft.max_steps": steps, "sft.eval_fraction": 0.0, "sft.logging_steps": 1,
                 "sft.save_steps": 10_000, "tracking.experiment": "bench"}
    cfg = load_pipeline(ROOT / "pipelines.yaml", "demo", overrides, env={})
    base = resolve_model(cfg.model.name, ROOT / ".alignpipe" / "models")
    train = write_jsonl(load_sft(cfg.data.sft.path, limit=rows), work / "train.jsonl")
    uri, exp = tracking.tracking_uri(cfg), tracking.ensure_experiment(cfg)

    def new_run(name):
        return tracking.start_run(uri, exp, name, {})

    # 1-2. The pipeline's own path (run_sft: Ray Train TorchTrainer, one worker with 2 CPUs) and the same trainer in
    # a plain process, taking turns (A B B A ...), each trial a fresh process (bench/ray_overhead.py): the host's
    # speed drifts within minutes, and a pair run back to back is read at one speed.
    trials = work / "ray_vs_inprocess.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "ray_overhead.py"), "--rounds", str(rounds),
                           "--steps", str(steps), "--rows", str(rows), "--model", base, "--json", str(trials)],
                          cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"bench/ray_overhead.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    by_mode: dict[str, list[float]] = {"ray": [], "inproc": []}
    ray_step_s = []
    for t in json.loads(trials.read_text()):
        by_mode[t["mode"]].append(t["tokens_per_s"])
        if t["mode"] == "ray":
            ray_step_s.append(t["step_s"])
    out = {"sft_tokens_per_s_ray": statistics.median(by_mode["ray"]),
           "sft_tokens_per_s_inprocess": statistics.median(by_mode["inproc"]),
           "sft_ray_trials": by_mode["ray"], "sft_inprocess_trials": by_mode["inproc"]}
    out["sft_ray_paused"] = ray_paused(base, rows, step_s=min(ray_step_s))
    out.update(kernels_off(base, steps, rows, rounds=3))
    torch.set_num_threads(int(cfg.compute.cpus_per_worker))

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


def kernels_off(base: str, steps: int, rows: int, rounds: int) -> dict:
    """The pipeline's Ray SFT path with `compute.kernels: off` against `auto`, in interleaved pairs of fresh
    processes (bench/ray_overhead.py --against-kernels-off): the share of the speed that is our own CPU kernels."""
    trials = Path(tempfile.mkdtemp(prefix="bench-kernels-")) / "trials.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "ray_overhead.py"), "--against-kernels-off",
                           "--rounds", str(rounds), "--steps", str(steps), "--rows", str(rows), "--model", base,
                           "--json", str(trials)], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:  # the rows read before it stay
        print(f"bench/ray_overhead.py --against-kernels-off failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return {}
    by_mode: dict[str, list[float]] = {"ray": [], "ray-kernels-off": []}
    for t in json.loads(trials.read_text()):
        by_mode[t["mode"]].append(t["tokens_per_s"])
    return {"sft_kernels_auto_trials": by_mode["ray"], "sft_kernels_off_trials": by_mode["ray-kernels-off"]}


def ray_paused(base: str, rows: int, step_s: float, window: float = 10.0, cycles: int = 6) -> dict:
    """One more Ray trial, in which Ray's other processes are stopped for `window` s in every 2·`window` s
    (bench/ray_overhead.py `Pauser`): what they cost the training worker, read within one trial. `step_s`, the
    fastest Ray step time of the interleaved trials, sizes the run to outlast the warm-up and every window."""
    trial = Path(tempfile.mkdtemp(prefix="bench-pause-")) / "trial.json"
    seconds = ray_overhead.PAUSE_WARMUP_S + (2 * cycles + 1) * window
    steps = math.ceil(1.3 * seconds / step_s)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "ray_overhead.py"), "--one", "ray", "--steps",
                           str(steps), "--rows", str(rows), "--model", base, "--out", str(trial), "--pause",
                           str(window), "--pause-cycles", str(cycles)], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"bench/ray_overhead.py --pause failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    t = json.loads(trial.read_text())
    return {k: t[k] for k in ("pause_gain", "pause_cycles", "pause_window_s")}


def run_demo(work: Path, *sets: str) -> tuple[float, dict]:
    """`alignpipe run demo` in `work` (with `--set`s); wall time and the run's summary."""
    args = [str(Path(sys.executable).parent / "alignpipe"), "run", "demo", "--set", f"workdir={work}"]
    for s in sets:
        args += ["--set", s]
    before = set((work / "runs").glob("*.json")) if (work / "runs").is_dir() else set()
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"demo {sets} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    [new] = set((work / "runs").glob("*.json")) - before
    return wall, json.loads(new.read_text())


def demo_run(rlhf: bool = True) -> dict:
    """The demo as `make demo` runs it after the install (bench/any_cpu.py --hosts native: a fresh workdir, the
    embedded model's conversion inside the timed run), then the same again in that workdir (cached), then
    `align: rlhf` beside it on the same SFT model."""
    native = script("any_cpu", "--hosts", "native")
    if "native" not in native:
        sys.exit("the native demo failed (bench/any_cpu.py); see its log under bench/out")
    work = Path(native["workdir"]) / "native"
    [first] = (work / "runs").glob("*.json")
    summary = json.loads(first.read_text())
    m, q = summary["metrics"], summary["quantized"]
    copy_chart(work, summary["mlflow_run_id"])
    out = {"any_cpu": {k: native[k] for k in ("native", "native_bf16", "user_avx2")},
           "demo_wall_s": native["native"]["wall_s"], "demo_stage_s": native["native"]["stage_s"],
           "demo_metrics": m, "cascade": summary["cascade"], "align_train": summary["aligned"]["metrics"],
           "quantized_sizes": {k: q[k] for k in ("size_bytes", "fp32_size_bytes", "linear_bytes",
                                                 "linear_fp32_bytes", "embedding_bytes")},
           "promotion": summary["promotion"], "demo_workdir": str(work)}
    # Unchanged re-run: every stage but register comes from the cache.
    out["cached_wall_s"], again = run_demo(work)
    out["cached_stage_status"] = {s["stage"]: s["status"] for s in again["stages"]}
    if not rlhf:
        return out
    # RLHF on the same SFT model (validate and sft come from the cache): reward model + RLOO.
    out["rlhf_wall_s"], rl = run_demo(work, "align.method=rlhf", "quantize.method=none", "evaluate.limit=50",
                                       "register.enabled=false")
    out["rlhf_train"] = rl["aligned"]["metrics"]
    out["rlhf_stage_s"] = {s["stage"]: round(s["seconds"], 1) for s in rl["stages"]}
    return out


def copy_chart(work: Path, parent: str) -> None:
    """The sitting's side-by-side chart (evaluate's plots/comparison.png, from the demo's MLflow store) to
    docs/demo_comparison.png, which the README shows."""
    client = tracking.client_for(f"sqlite:///{work}/mlflow.db")
    exp = client.get_experiment_by_name("alignpipe")
    runs = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}' and "
                                                   f"tags.`{tracking.TAG_STAGE}` = 'evaluate'")
    for run in runs:
        try:
            path = client.download_artifacts(run.info.run_id, "plots/comparison.png", str(work))
        except Exception as e:  # noqa: BLE001 - a missing chart leaves the last one in place, said so
            print(f"bench: no comparison chart in evaluate run {run.info.run_id}: {e}")
            continue
        CHART.parent.mkdir(exist_ok=True)
        CHART.write_bytes(Path(path).read_bytes())
        return


def int8_speed(workdir: str, rows: int = 64, repeats: int = 3) -> dict:
    """Generation tokens/s of the merged fp32 aligned model vs its int8 copy, at batch 16 and batch 1, in this process.

    fp32 and int8 take turns, `repeats` times each, and each keeps its best run: the host's speed drifts over
    minutes, which one back-to-back pair can't tell from a kernel's speed.
    """
    from alignpipe.config import load_pipeline
    from alignpipe.tasks.evaluate import ModelSpec, evaluate_model, job_for

    cfg = load_pipeline(ROOT / "pipelines.yaml", "demo", {"workdir": workdir}, env={})
    [merged] = Path(workdir).glob("stages/quantize/*/merged")
    quant = merged.parent / "quantized"
    [eval_path] = [p for p in Path(workdir).glob("stages/validate/*/eval") if p.is_dir()]  # validate's shards
    out = {}
    for bs, n in ((16, rows), (1, 8)):
        job = job_for(cfg, threads=2).model_copy(update={"dtype": "float32", "evaluate": cfg.evaluate.model_copy(
            update={"limit": n, "batch_size": bs, "perplexity_rows": 1})})
        specs = (("fp32", ModelSpec(label="fp32", base_path=str(merged))),
                 ("int8", ModelSpec(label="int8", base_path=str(merged), quantized_dir=str(quant))))
        runs = {label: [] for label, _ in specs}
        for _ in range(repeats):
            for label, spec in specs:
                runs[label].append(evaluate_model(spec, str(eval_path), job)["metrics"])
        for label, metrics in runs.items():  # greedy decoding: exact match is the same in every run
            out[f"{label}_tokens_per_s_bs{bs}_runs"] = [m["tokens_per_s"] for m in metrics]
            out[f"{label}_tokens_per_s_bs{bs}"] = max(m["tokens_per_s"] for m in metrics)
            out[f"{label}_exact_match_bs{bs}"] = metrics[-1]["exact_match"]
    out["int8_runtime"] = cfg.quantize.cpu_runtime(cfg.compute.kernels)
    return out


def _int8_kernel(r: dict) -> str:
    rt = r.get("int8_runtime") or {"int8_cpu_kernel": "torchao"}
    if int8_cpu.resolve_cpu_kernel(rt["int8_cpu_kernel"], rt.get("kernels", "auto")) != "fbgemm":
        return "torchao kernels"
    kept = ", ".join(rt.get("int8_per_token_modules") or [])
    return f"fbgemm kernels, {kept} on torchao's per-token path" if kept else "fbgemm kernels"


def orchestration() -> dict:
    """bench/orchestration.py: smoke against the local stack (its own processes), overhead and fixed costs."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "orchestration.py"), "--runs", "2"], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode:
        print(f"orchestration bench failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return {}
    return json.loads((ROOT / "bench" / "out" / "orchestration.json").read_text())


def script(name: str, *args: str, driver_malloc: bool = False) -> dict:
    """Run `bench/<name>.py` in its own process and read what it wrote to `bench/out/<name>.json` ({} if it failed):
    shared_stack (concurrent pipelines and promotions on one PostgreSQL-backed stack), any_cpu (the demo on both
    host classes)."""
    out = ROOT / "bench" / "out" / f"{name}.json"
    env = dict(os.environ)
    if driver_malloc:  # the script measures a pipeline's driver process, which runs on the system's malloc (only
        env.pop("LD_PRELOAD", None)  # its Ray workers get compute.allocator's library, through Ray's runtime_env)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py"), "--out", str(out), *args], cwd=ROOT,
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        print(f"{name} bench failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return {}
    return json.loads(out.read_text())


def plain_trl(args: list[str] | None = None, env: dict[str, str] | None = None) -> dict:
    """bench/plain_trl.py in its own process: the demo's work with TRL directly; wall time around the process."""
    out = Path(tempfile.mkdtemp(prefix="bench-plain-trl-"))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "plain_trl.py"), "--out", str(out), *(args or [])],
                          cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0  # like demo_wall_s: process start (imports included) to exit
    if proc.returncode:
        sys.exit(f"plain TRL script failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return plain_summary(json.loads((out / "result.json").read_text()), wall)


def plain_summary(res: dict, wall: float) -> dict:
    """The plain TRL script's result.json as results.json keys."""
    return {"plain_trl_wall_s": wall, "plain_trl_stage_s": {k: round(v, 1) for k, v in res["stage_s"].items()},
            "plain_trl_metrics": res["metrics"], "plain_trl_eval_dtype": res["eval_dtype"],
            "plain_trl_sft_tokens_per_s": res.get("sft_tokens_per_s")}


def lora_vs_full(steps: int, rows: int) -> dict:
    """bench/lora_vs_full.py once per mode, each in a fresh process; then FLOP/s over measured matmul FLOP/s."""
    runs = {}
    for mode in ("lora", "full", "full-amp"):
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / "lora_vs_full.py"), "--mode", mode,
                               "--steps", str(steps), "--rows", str(rows)], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"lora_vs_full --mode {mode} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        runs[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    return utilisation(runs)


def utilisation(runs: dict[str, dict]) -> dict:
    """Each run's training FLOP/s (tokens/s x FLOPs per token) over a matmul measured here with its threads."""
    lora = runs["lora"]
    n, head = flops.matmul_params_of(lora["model"])
    threads = lora["threads"]  # the training runs' torch threads
    peak = {dtype: flops.matmul_flops_per_s(dtype, threads) for dtype in ("float32", "bfloat16")}
    # every mode trains under the same autocast dtype (bf16 where native), so its matmuls run in that dtype
    used = lora["autocast"]
    for mode, r in runs.items():
        method = "lora" if mode == "lora" else "full"
        per_token = flops.training_flops_per_token(n, method, r["trainable_params"] if mode == "lora" else 0)
        r.update(flops_per_token=per_token, train_flops_per_s=r["tokens_per_s"] * per_token)
        r["utilisation"] = r["train_flops_per_s"] / peak[used]
        executed = flops.executed_flops_per_token(n, head, method, r["trainable_params"] if mode == "lora" else 0,
                                                  r["label_share"])
        r["executed_utilisation"] = r["tokens_per_s"] * executed / peak[used]
    return {"lora_vs_full": runs, "flops_n": n, "flops_head": head, "matmul_flops_per_s": peak,
            "matmul_dtype_used": used,
            "matmul_threads": threads}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in VERSIONED:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _pair_ratios(r: dict) -> list[float]:
    """Ray ÷ in-process tokens/s of each interleaved pair of trials."""
    return [a / b for a, b in zip(r.get("sft_ray_trials", []), r.get("sft_inprocess_trials", []))]


def ray_vs_inprocess(r: dict) -> str:
    """The paired reading (three decimals: a target sits at 0.90, and 0.897 is no 0.90), each pair, and the ratio
    of the medians of each side."""
    pairs = _pair_ratios(r)
    medians = (f"{r['sft_tokens_per_s_ray']:.0f} / {r['sft_tokens_per_s_inprocess']:.0f} = "
               f"{r['sft_tokens_per_s_ray'] / r['sft_tokens_per_s_inprocess']:.3f}")
    if len(pairs) < 2:
        return medians
    return (f"{table.ray_over_inprocess(r):.3f}: median of {len(pairs)} interleaved pairs of trials, fresh processes "
            f"(" + ", ".join(f"{x:.2f}" for x in pairs) + f"); ratio of each side's median tokens/s {medians}")


def detail_notes(r: dict) -> list[str]:
    """What the README's one-line rows leave out: the Ray pairs, Ray's own cost, int8 at batch 1, the suite."""
    md = []
    if "sft_ray_trials" in r and "sft_tokens_per_s_inprocess" in r:
        md += ["", f"SFT tokens/s, Ray Train ÷ in-process = {ray_vs_inprocess(r)}."]
    if p := r.get("sft_ray_paused"):
        windows = ", ".join(f"{c['paused'] / c['running']:.2f}" for c in p["pause_cycles"])
        md += ["", (f"SFT tokens/s on Ray with Ray's other processes stopped ÷ running (one trial; each "
                    f"{p['pause_window_s']:.0f} s stopped window against the running {p['pause_window_s']:.0f} s "
                    f"either side; bench/ray_overhead.py --pause): {p['pause_gain']:.3f} (median of "
                    f"{len(p['pause_cycles'])} windows: {windows}).")]
    if "int8_tokens_per_s_bs1" in r and "fp32_tokens_per_s_bs1" in r:
        md += ["", (f"int8 ÷ fp32 decoding at batch 1: {r['int8_tokens_per_s_bs1']:.1f} / "
                    f"{r['fp32_tokens_per_s_bs1']:.1f} = "
                    f"{r['int8_tokens_per_s_bs1'] / r['fp32_tokens_per_s_bs1']:.2f} ({_int8_kernel(r)}).")]
    if "demo_metrics" in r and "demo_stage_s" in r:
        m = r["demo_metrics"]
        labels = list(m)
        keys = ("exact_match", "json_validity", "field_accuracy", "preference_accuracy", "perplexity", "tokens_per_s",
                "latency_p95_ms", "peak_rss_mb", "size_mb")
        stages = ", ".join(f"{k} {v:.0f} s" for k, v in r["demo_stage_s"].items())
        rows = int(m.get("aligned", {}).get("rows", 0))
        md += ["", f"Demo stages: {stages}. The suite on {rows} held-out rows:", "",
               "| metric | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        md += [f"| {k} | " + " | ".join(f"{m[label].get(k, float('nan')):.3f}" for label in labels) + " |"
               for k in keys]
    return md


def evidence_notes(r: dict) -> list[str]:
    """The plain TRL script beside the demo, and LoRA vs full fine-tuning, in detail."""
    md = []
    if "plain_trl_metrics" in r and "demo_metrics" in r:
        d, p = r["demo_metrics"], r["plain_trl_metrics"]
        labels = [k for k in d if k in p]
        stages = ", ".join(f"{k} {v:.0f} s" for k, v in r["plain_trl_stage_s"].items())
        md += ["", f"Demo vs plain TRL (bench/plain_trl.py, {r['plain_trl_eval_dtype']} evaluation; its stages: "
               f"{stages}). Same hyperparameters, data and system prompt; TRL's defaults otherwise (loss on the "
               "whole conversation, fp32 weights + bf16 autocast, gradient checkpointing on, unsorted batches, "
               "its own checkpoint schedule); no validation, tracking or registration:", "",
               "| metric | " + " | ".join(f"{k} demo | {k} TRL" for k in labels) + " |",
               "|---|" + "---|---|" * len(labels)]
        for key in ("exact_match", "json_validity", "field_accuracy", "preference_accuracy", "perplexity"):
            md.append(f"| {key} | " + " | ".join(f"{d[k].get(key, float('nan')):.3f} | "
                                                 f"{p[k].get(key, float('nan')):.3f}" for k in labels) + " |")
    if "lora_vs_full" in r:
        lora, full, amp = (r["lora_vs_full"][m] for m in ("lora", "full", "full-amp"))
        mm = r["matmul_flops_per_s"]
        md += ["", f"LoRA vs full fine-tuning: the pipeline's SFT trainer in-process, {lora['steps']} steps on "
               f"{lora['rows']} demo rows at batch {lora['batch_size']}, {lora['weights_dtype']} base weights for LoRA "
               f"and full FT, fp32 for mixed-precision full FT, all under {r['matmul_dtype_used']} autocast, "
               f"{lora['threads']} torch threads; peak RSS = the kernel's high-water mark (VmHWM) over training, reset "
               f"as it starts (LoRA {lora.get('loaded_rss_mb', float('nan')):.0f} MB with the model loaded, before "
               f"step 1; {lora.get('import_rss_mb', float('nan')):.0f} MB after imports). Training FLOP/s = non-padding "
               f"tokens/s × FLOPs per token, N = {r['flops_n'] / 1e6:.1f} M = every parameter but the embedding "
               "lookup, with the tied LM head's matmul counted (attention scores left out); LoRA 4N (frozen "
               "weights get no weight gradients) + 6 per adapter parameter, full 6N. Measured 2048×2048 matmul "
               f"with {r['matmul_threads']} threads: fp32 {mm['float32'] / 1e9:.1f} GFLOP/s, bf16 "
               f"{mm['bfloat16'] / 1e9:.1f} GFLOP/s; the ratio uses {r['matmul_dtype_used']} (training's autocast "
               f"dtype). Full FT: {full['peak_rss_mb']:.0f} MB, {full['tokens_per_s']:.0f} tokens/s; mixed precision: "
               f"{amp['peak_rss_mb']:.0f} MB, {amp['tokens_per_s']:.0f} tokens/s; pure bf16 full FT: LoRA ÷ full "
               f"peak RSS {lora['peak_rss_mb'] / full['peak_rss_mb']:.2f}. Trainable parameters: LoRA "
               f"{lora['trainable_params'] / 1e6:.2f} M, full {full['trainable_params'] / 1e6:.1f} M. Counting only "
               f"the FLOPs the trainer runs (LM head on the {lora['label_share']:.0%} of tokens that carry a label): LoRA "
               f"{lora['executed_utilisation']:.2f}, full {full['executed_utilisation']:.2f}."]
    return md


def write(results: dict) -> None:
    """results.json (only the keys the table and these notes read), results.md (the table and the detail), and the
    README's table between its markers (bench/table.py: the table is a function of results.json alone)."""
    r = {k: v for k, v in results.items() if k in TOP_LEVEL_READ}
    readme = ROOT / "README.md"
    body = readme.read_text()
    for _ in range(2) if MARK_BEGIN in body else ():  # the README's size with this table (and this row) in it
        r["doc_bytes"] = {"readme": len(table.splice(body, table.render(r), MARK_BEGIN, MARK_END).encode()),
                          "notes": len((ROOT / "bench" / "NOTES.md").read_bytes())}
    text = table.render(r)
    v = r.get("versions") or {}
    md = [f"Measured {r['date']} on {r.get('machine', 'an unrecorded machine')} (`make bench`; raw numbers in "
          "`bench/results.json`)." + (f" Every process ran on {r['allocator']}, as the pipeline's Ray workers do."
                                      if r.get("allocator") else "")
          + (f" Python {r['python']}." if r.get("python") else "")
          + (" Versions: " + ", ".join(f"{k} {x}" for k, x in v.items()) + "." if v else ""), "", text]
    md += detail_notes(r) + evidence_notes(r)
    o = r.get("orchestration") or {}
    if o:
        md += ["", "Fixed costs around a run: " + ", ".join(f"{k} {x:.1f} s" for k, x in o.items()
                                                          if isinstance(x, (int, float)))]
    TABLE.write_text("\n".join(md) + "\n")
    RESULTS.write_text(json.dumps(r, indent=2) + "\n")
    if MARK_BEGIN in body:
        body = table.splice(body, text, MARK_BEGIN, MARK_END)
        if DEMO_BEGIN in body and "demo_metrics" in r:
            body = table.splice(body, table.demo_table(r), DEMO_BEGIN, DEMO_END)
        readme.write_text(body)
    print(text)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), which the table's host class names; the architecture elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def under_pipeline_malloc() -> str:
    """Run this bench with the malloc library the demo's Ray workers get (`compute.allocator`), re-executing itself
    once if needed, so every row compares like with like: the in-process and TRL-defaults trainers, the plain TRL
    script and the LoRA / full runs allocate as the Ray workers do. Returns what the rows ran on."""
    from alignpipe.ray_runner import malloc_library

    library = malloc_library(load_pipeline(ROOT / "pipelines.yaml", "demo", {}, env={}).compute)
    preload = os.environ.get("LD_PRELOAD", "")
    if library and library not in preload.split(":"):
        env = {**os.environ, "LD_PRELOAD": ":".join(filter(None, [library, preload]))}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    return library or "the system's malloc"


PARTS = ("demo", "int8", "sft", "plain-trl", "sft-pairs", "lora-full", "orchestration", "shared-stack", "storage",
         "validate-scale", "avx2", "avx2-peer", "rlhf-evidence")


def int8_avx2(workdir: str, pairs: int = 3) -> dict:
    """bench/int8_cpu.py under the AVX2 caps on the demo's merged and int8 models: fp32 and the default int8
    runtime there (fbgemm, per-token layers dequantized), taking turns, `pairs` pairs (bench/PROTOCOL.md, issue 28)."""
    [folder] = Path(workdir).glob("stages/quantize/*/merged")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "int8_cpu.py"), "--model-dir", str(folder.parent),
                           "--emulate", "avx2", "--variants", "fp32", "fbgemm_dq", "--timing-rows", "64",
                           "--rounds", str(pairs)], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        print(f"int8_cpu bench failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return {}
    timing = json.loads(proc.stdout[proc.stdout.index("\n{") + 1:] if not proc.stdout.startswith("{")
                        else proc.stdout)["avx2"]["timing"]
    return {"int8_avx2": {"ratio": timing["fbgemm_dq"]["ratio_to_fp32"], "pairs": pairs,
                          "int8_tokens_per_s": timing["fbgemm_dq"]["tokens_per_s"],
                          "fp32_tokens_per_s": timing["fp32"]["tokens_per_s"]}}


def competent_peer_avx2() -> dict:
    """The competent plain-TRL peer under the AVX2 caps (fp32 weights, as bf16 is not native there): beside the
    AVX2/fp32 demo's SFT tokens/s (bench/PROTOCOL.md, issue 30)."""
    from bench.any_cpu import HOSTS  # the AVX2 demo's caps

    res = plain_trl(["--recipe", "competent"], env={**os.environ, **HOSTS["avx2"][0]})
    return {"plain_trl_competent_avx2": {"wall_s": res["plain_trl_wall_s"], "stage_s": res["plain_trl_stage_s"],
                                         "sft_tokens_per_s": res["plain_trl_sft_tokens_per_s"]}}


def competent_peer() -> dict:
    """bench/plain_trl.py --recipe competent (bench/PROTOCOL.md, issue 30), under its own keys."""
    res = plain_trl(["--recipe", "competent"])
    return {"plain_trl_competent_wall_s": res["plain_trl_wall_s"],
            "plain_trl_competent_stage_s": res["plain_trl_stage_s"],
            "plain_trl_competent_metrics": res["plain_trl_metrics"],
            "sft_tokens_per_s_trl_competent": res["plain_trl_sft_tokens_per_s"]}


def reread_sft() -> None:
    """The SFT figures of the sitting's demos read again with bench/any_cpu.py's `sft_figures` (a run measured
    before a fix to how they are read): each demo's first run, in the workdir next to its log."""
    from bench.any_cpu import sft_figures

    results = json.loads(RESULTS.read_text())
    for host, demo in results.get("any_cpu", {}).items():
        if not isinstance(demo, dict) or "log" not in demo:
            continue
        work = Path(demo["log"]).with_suffix("")
        first = min((work / "runs").glob("*.json"), key=lambda f: f.stat().st_mtime)
        demo["sft"] = sft_figures(work, json.loads(first.read_text())["mlflow_run_id"])
        print(f"{host}: {demo['sft']}")
    write(results)


MEASURED_BY = {"demo": "demo_metrics", "int8": "int8_tokens_per_s_bs16", "sft": "sft_ray_trials",
               "plain-trl": "plain_trl_competent_wall_s", "sft-pairs": "sft_pairs", "lora-full": "lora_vs_full",
               "orchestration": "orchestration", "shared-stack": "shared_stack", "storage": "storage_overhead",
               "validate-scale": "validate_scale", "avx2": "any_cpu.avx2", "avx2-peer": "plain_trl_competent_avx2",
               "rlhf-evidence": "rlhf_evidence"}


def measured(part: str, results: dict) -> bool:
    """Whether the sitting in `results` holds the part's readings (its key, as bench/table.py looks keys up)."""
    return table.lookup(results, MEASURED_BY[part]) is not table.ABSENT


def same_sitting(last: dict, cpu: str, today: str | None = None) -> bool:
    """Whether results.json is a sitting `--resume` may go on with: this CPU, begun today or yesterday (UTC; a
    sitting that runs past midnight keeps the date it began on)."""
    if last.get("cpu") != cpu or "date" not in last:
        return False
    today_ = datetime.strptime(today or datetime.now(timezone.utc).strftime("%Y-%m-%d"), "%Y-%m-%d")
    return 0 <= (today_ - datetime.strptime(last["date"], "%Y-%m-%d")).days <= 1


def sit(todo: list[str], steps: dict, results: dict) -> list[str]:
    """Measure each part in order into `results`, writing results.json and the README after each one (a sitting cut
    short keeps what it measured); a part that fails leaves its rows unmeasured and the sitting goes on. Returns the
    failed parts."""
    failed = []
    for part in todo:
        t0 = time.perf_counter()
        print(f"bench: {part} ...", flush=True)
        try:
            results.update({k: v for k, v in steps[part]().items() if v != {}})
        except (Exception, SystemExit) as e:  # one part failing leaves its rows unmeasured, not the sitting
            failed.append(part)
            print(f"bench: {part} FAILED after {time.perf_counter() - t0:.0f} s: {e}", flush=True)
            continue
        print(f"bench: {part} done in {time.perf_counter() - t0:.0f} s", flush=True)
        write(results)
    return failed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=30, help="SFT steps per throughput measurement (and per LoRA / "
                    "full fine-tuning run): 10 gave Ray ÷ in-process 0.91 and 0.98 in two runs of the same code")
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--sft-rounds", type=int, default=5,
                    help="Ray / in-process SFT trial pairs, taking turns (each trial a fresh process): single trials "
                         "vary with the host's speed, and with few pairs one slow trial moves the median ratio")
    ap.add_argument("--skip", nargs="+", choices=PARTS, default=[],
                    help="parts not measured: their rows read 'not measured in this sitting' (a sitting never "
                         "carries a reading over from an earlier one)")
    ap.add_argument("--resume", action="store_true",
                    help="go on with today's sitting on this host: keep bench/results.json (same date and CPU) and "
                         "measure only the parts it does not hold yet (those left out by --skip, failed or cut short)")
    ap.add_argument("--int8-speed", metavar="WORKDIR",
                    help="only measure int8 vs fp32 speed again on a demo workdir, into the current results.json")
    ap.add_argument("--reread-sft", action="store_true",
                    help="only read the SFT figures of the sitting's demos again from their MLflow stores (their "
                         "workdirs must still exist), into the current results.json")
    args = ap.parse_args()
    if args.reread_sft:
        reread_sft()
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    allocator = under_pipeline_malloc()
    last = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if args.int8_speed:
        last.update(int8_speed(args.int8_speed))
        write(last)
        return
    cpu = cpu_model()
    # One sitting: this run's readings only. The last sitting's aligned exact match is kept as the reference of
    # the "within ±0.01" row, under its own key.
    results = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "cpu": cpu,
               "machine": f"{os.cpu_count()} CPU cores ({cpu}), "
                          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, no GPU",
               "python": platform.python_version(), "versions": versions(), "allocator": allocator}
    if args.resume:
        if not same_sitting(last, cpu):
            sys.exit(f"--resume: bench/results.json is a sitting of {last.get('date')} on {last.get('cpu')}, not "
                     f"one begun on this host since yesterday: run the whole bench")
        results = last
    elif "demo_metrics" in last:
        results["previous_sitting"] = {"date": last["date"],
                                       "aligned_exact_match": last["demo_metrics"]["aligned"]["exact_match"]}
    todo = [p for p in PARTS if p not in args.skip and not (args.resume and measured(p, results))]
    steps = {
        "demo": lambda: demo_run(),
        "int8": lambda: {**int8_speed(results["demo_workdir"]), **int8_avx2(results["demo_workdir"])},
        "sft": lambda: sft_throughput(args.steps, args.rows, args.sft_rounds),
        "plain-trl": lambda: {**plain_trl(), **competent_peer()},  # the same sitting as the demo: walls compared
        "sft-pairs": lambda: {"sft_pairs": script("sft_pairs")},  # ours ÷ competent peer, in turns
        "lora-full": lambda: lora_vs_full(args.steps, args.rows),
        "orchestration": lambda: {"orchestration": orchestration()},
        "shared-stack": lambda: {"shared_stack": script("shared_stack")},
        "storage": lambda: {"storage_overhead": script("storage_overhead")},
        "validate-scale": lambda: {"validate_scale": script("validate_scale", "--rows", "100000", "200000",
                                                            "1000000", driver_malloc=True)},
        "avx2": lambda: {"any_cpu": {**results.get("any_cpu", {}), **script("any_cpu", "--hosts", "avx2")}},
        "avx2-peer": lambda: competent_peer_avx2(),
        "rlhf-evidence": lambda: {"rlhf_evidence": script("rlhf_evidence")},
    }
    if "int8" in todo and "demo" not in todo and "demo_workdir" not in results:
        sys.exit("int8 is measured on this sitting's demo: drop --skip demo, or skip int8 too")
    failed = sit(todo, steps, results)
    if failed:
        sys.exit(f"bench: parts failed (their rows read 'not measured in this sitting'): {', '.join(failed)}")


if __name__ == "__main__":
    main()
