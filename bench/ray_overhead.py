"""Where SFT time goes inside Ray Train: CPU seconds per process (and per worker thread) while training, and
tokens/s of the same trainer inside Ray Train vs in this process, run interleaved (A B A B) in fresh processes.

CPU attribution is read from /proc (utime+stime deltas), so it holds up on a machine shared with other work;
tokens/s does not, hence the interleaving and medians.

    .venv/bin/python bench/ray_overhead.py --rounds 3 --steps 12 [--model /path/to/smollm2-135m-instruct]
    .venv/bin/python bench/ray_overhead.py --one ray --steps 12 --out trial.json     # a single trial
    .venv/bin/python bench/ray_overhead.py --rounds 1 --steps 20 --load 0.4   # beside a 40%-of-a-core load
    .venv/bin/python bench/ray_overhead.py --rounds 2 --steps 30 --cpus 1     # one torch thread, a core to spare
    .venv/bin/python bench/ray_overhead.py --one ray --steps 120 --pause 15   # Ray's daemons stopped 15 s in 30
    .venv/bin/python bench/ray_overhead.py --against ../before --rounds 5 --steps 30   # this checkout vs another

`--load` runs, beside every trial, a process at nice 0 that keeps one core busy that share of each 50 ms (the
kind of load a flow process, Prefect's API or a browser puts on a laptop). Ray starts its workers at nice 15
unless told otherwise; `RAY_worker_niceness=15` in the environment brings that default back for a comparison
(ray_runner.LOCAL_RAY_ENV says what it cost).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TICK = os.sysconf("SC_CLK_TCK")


def _proc_label(proc: psutil.Process, driver: int) -> str:
    """A stable name for a process of this run: driver, gcs_server, raylet, or the Ray actor it hosts."""
    if proc.pid == driver:
        return "driver"
    try:
        cmd = proc.cmdline()
    except psutil.Error:
        return "?"
    head = cmd[0] if cmd else proc.name()
    if head.startswith("ray::"):  # a Ray worker renames itself after the actor/task it runs
        name = head[5:].split(" ")[0]
        return {"RayTrainWorker": "train worker", "TrainController": "train controller"}.get(
            name.split(".")[0].lstrip("_"), name)
    for key in ("gcs_server", "raylet", "dashboard_agent", "runtime_env_agent", "log_monitor", "monitor.py",
                "dashboard.py", "default_worker"):
        if any(key in part for part in cmd[:3]):
            return key.replace(".py", "")
    return Path(head).name


def _thread_times(pid: int) -> dict[str, float]:
    """CPU seconds per thread ("tid comm") of process `pid`."""
    out: dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[f"{tid} {comm}"] = (int(fields[11]) + int(fields[12])) / TICK
    return out


class CpuSampler(threading.Thread):
    """Samples cumulative CPU time of this process, its descendants (Ray's processes) and their threads."""

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True, name="cpu-sampler")
        self.interval, self.samples, self._halt = interval, [], threading.Event()
        self.own_cpu = 0.0  # this thread's own CPU, to subtract from the driver

    def run(self):
        me = psutil.Process()
        names: dict[int, str] = {}
        while not self._halt.is_set():
            t, per_proc, per_thread = time.time(), {}, {}
            for proc in [me, *me.children(recursive=True)]:
                try:
                    cpu = proc.cpu_times()
                except psutil.Error:
                    continue
                label = _proc_label(proc, me.pid)
                if label != "IDLE" or proc.pid not in names:  # keep the actor name after it exits to IDLE
                    names[proc.pid] = label
                per_proc[proc.pid] = (names[proc.pid], cpu.user + cpu.system)
                if names[proc.pid] in ("train worker", "driver"):
                    per_thread[proc.pid] = _thread_times(proc.pid)
            busy = psutil.cpu_times()
            self.samples.append({"t": t, "procs": per_proc, "threads": per_thread,
                                 "machine_busy": sum(busy) - busy.idle - busy.iowait})
            self.own_cpu = time.thread_time()
            self._halt.wait(self.interval)

    def stop(self):
        self._halt.set()
        self.join()

    def window(self, t0: float, t1: float) -> dict:
        """CPU seconds per process label and per worker thread between the samples nearest to t0 and t1."""
        inside = [s for s in self.samples if t0 <= s["t"] <= t1]
        if len(inside) < 2:
            return {}
        a, b = inside[0], inside[-1]
        procs: dict[str, float] = defaultdict(float)
        for pid, (label, cpu) in b["procs"].items():
            start = a["procs"].get(pid, (label, 0.0))[1]  # a process born in the window started at 0
            procs[label] += cpu - start
        # Threads ranked by CPU within their process (tids differ between runs; ranks compare).
        threads: dict[str, float] = {}
        for pid, names in b["threads"].items():
            label = b["procs"][pid][0]
            deltas = sorted(((cpu - a["threads"].get(pid, {}).get(name, 0.0), name.split(" ", 1)[1])
                             for name, cpu in names.items()), reverse=True)
            for i, (cpu, comm) in enumerate(deltas[:6]):
                threads[f"{label} thread #{i + 1} ({comm[:15]})"] = cpu
        ours = sum(procs.values())
        machine = b["machine_busy"] - a["machine_busy"]
        return {"seconds": b["t"] - a["t"], "procs": dict(procs), "threads": dict(threads),
                "ours": ours, "machine_busy": machine, "others": machine - ours}


PAUSE_WARMUP_S = 25.0  # training before the first stopped window: start-up, and steps to read it against


class Pauser(threading.Thread):
    """Stops (SIGSTOP) every process of this run's Ray but the training worker for `window` seconds, then lets them
    run `window` seconds, `cycles` times, starting once the worker has trained `warmup` seconds.

    Training does not need them between two reports: the worker logs to MLflow itself, and Ray hears from it again
    only at the end. Steps that fall wholly inside a paused window show what Ray's daemons and helper actors (GCS,
    raylet, log monitor, agents, Train's controller and sync actor) cost the worker; what is left of the gap to
    in-process training sits in the worker process itself (its own Ray threads) and in the host's drift.
    """

    def __init__(self, window: float, cycles: int, warmup: float = PAUSE_WARMUP_S):
        super().__init__(daemon=True, name="ray-pauser")
        self.window, self.cycles, self.warmup = window, cycles, warmup
        self.paused: list[tuple[float, float]] = []  # wall-clock (start, end) of each paused window
        self._halt = threading.Event()
        self._stopped: list[psutil.Process] = []

    def _others(self) -> list[psutil.Process]:
        me = psutil.Process()
        return [p for p in me.children(recursive=True) if _proc_label(p, me.pid) != "train worker"]

    def _resume(self) -> None:
        for proc in self._stopped:
            try:
                proc.send_signal(signal.SIGCONT)
            except psutil.Error:
                pass
        self._stopped = []

    def run(self):
        me = psutil.Process()
        while not any(_proc_label(p, me.pid) == "train worker" for p in me.children(recursive=True)):
            if self._halt.wait(1.0):
                return
        if self._halt.wait(self.warmup):
            return
        for _ in range(self.cycles):
            self._stopped = self._others()
            start = time.time()
            for proc in self._stopped:
                try:
                    proc.send_signal(signal.SIGSTOP)
                except psutil.Error:
                    pass
            halted = self._halt.wait(self.window)
            self._resume()
            self.paused.append((start, time.time()))
            if halted or self._halt.wait(self.window):
                return

    def stop(self):
        self._halt.set()
        self.join()
        self._resume()  # after join: if the thread died mid-window, what it stopped runs again


def steps_within(stamps: list[float], rates: list[float], a: float, b: float) -> list[float]:
    """Rates of the steps that ran wholly within [a, b]: step i ran from stamps[i-1] to stamps[i] (so the first,
    warm-up step is never counted)."""
    return [r for t0, t1, r in zip(stamps, stamps[1:], rates[1:]) if a <= t0 and t1 <= b]


def pause_cycles(stamps: list[float], rates: list[float], windows: list[tuple[float, float]]) -> list[dict]:
    """Per paused window: median tokens/s inside it, and in the running time just before and just after it (as
    long as the window each side). Each window is read against its own neighbours: this host's speed drifts by
    ±15% over tens of seconds, more than the effect measured, and a linear drift cancels between the two sides."""
    out = []
    for a, b in windows:
        inside = steps_within(stamps, rates, a, b)
        around = steps_within(stamps, rates, 2 * a - b, a) + steps_within(stamps, rates, b, 2 * b - a)
        if inside and around:
            out.append({"paused": statistics.median(inside), "running": statistics.median(around),
                        "paused_steps": len(inside), "running_steps": len(around)})
    return out


def _setup(steps: int, rows: int, model: str | None, cpus: int | None = None, kernels: str | None = None):
    from alignpipe import tracking
    from alignpipe.config import load_pipeline
    from alignpipe.data.formats import load_sft, write_jsonl
    from alignpipe.models import resolve_model

    work = Path(tempfile.mkdtemp(prefix="bench-rayoh-"))
    overrides = {"workdir": str(work), "sft.max_steps": steps, "sft.eval_fraction": 0.0, "sft.logging_steps": 1,
                 "sft.save_steps": 10_000, "tracking.experiment": "bench"}
    if cpus:
        overrides["compute.cpus_per_worker"] = cpus
    if kernels:
        overrides["compute.kernels"] = kernels
    cfg = load_pipeline(ROOT / "pipelines.yaml", "demo", overrides, env={})
    base = model or resolve_model(cfg.model.name, ROOT / ".alignpipe" / "models")
    train = write_jsonl(load_sft(cfg.data.sft.path, limit=rows), work / "train.jsonl")
    return cfg, base, train, work, tracking.tracking_uri(cfg), tracking.ensure_experiment(cfg)


def trial(mode: str, steps: int, rows: int, model: str | None, cpus: int | None = None,
          pause: Pauser | None = None, kernels: str | None = None) -> dict:
    """One SFT run (`ray`: the pipeline's path, run_sft on Ray Train; `inproc`: the same trainer here).

    With `pause` (Ray only), Ray's other processes are stopped in windows (`Pauser`); the result adds, per window,
    the median tokens/s inside it and around it (`pause_cycles`), and the median of their ratios (`pause_gain`)."""
    from alignpipe import tracking
    from alignpipe.runs import RunContext, file_digest

    cfg, base, train, work, uri, exp = _setup(steps, rows, model, cpus, kernels)
    sampler = CpuSampler()
    sampler.start()
    if mode == "ray":
        from alignpipe.tasks.sft import run_sft

        ctx = RunContext(run_id="bench", pipeline="demo", tracking_uri=uri, experiment_id=exp,
                         parent_run_id=tracking.start_run(uri, exp, "ray", {}), workdir=str(work), base_model=base)
        if pause is not None:
            pause.start()
        try:
            run_id = run_sft(cfg, ctx, str(train), file_digest(train)).mlflow_run_id
        finally:
            if pause is not None:
                pause.stop()
    else:
        import torch

        from alignpipe.callbacks import MlflowStream
        from alignpipe.tasks.sft import build_trainer, job_for

        torch.set_num_threads(int(cfg.compute.cpus_per_worker))
        run_id = tracking.start_run(uri, exp, "in-process", {})
        trainer, _ = build_trainer(job_for(cfg, base, str(train)), str(work / "inproc"),
                                   [MlflowStream(uri, run_id)], log_progress=False)
        trainer.train()
    sampler.stop()
    history = sorted(tracking.client_for(uri).get_metric_history(run_id, "tokens_per_s"), key=lambda m: m.step)
    stamps = [m.timestamp / 1000 for m in history]
    rates = [m.value for m in history]
    steady = rates[1:] if len(rates) > 2 else rates  # the first interval holds warm-up
    step_s = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    cpu = sampler.window(stamps[1] if len(stamps) > 2 else stamps[0], stamps[-1])
    cpu["steps"] = max(1, len(stamps) - 2 if len(stamps) > 2 else len(stamps) - 1)
    import torch

    out = {"mode": mode, "tokens_per_s": statistics.median(steady), "step_s": statistics.median(step_s or [0.0]),
           "cpu": cpu, "torch_threads_driver": torch.get_num_threads()}
    if pause is not None:
        cycles = pause_cycles(stamps, rates, pause.paused)
        if not cycles:
            raise RuntimeError(f"--pause: no paused window with steps inside and around it ({len(pause.paused)} "
                               "windows); train more steps or shorten the windows")
        out.update({"pause_cycles": cycles, "pause_window_s": pause.window,
                    "pause_gain": statistics.median(c["paused"] / c["running"] for c in cycles),
                    "paused_windows": pause.paused, "step_stamps_rates": list(zip(stamps, rates))})
    return out


def _table(trials: list[dict]) -> str:
    lines = []
    by_mode = defaultdict(list)
    for t in trials:
        by_mode[t["mode"]].append(t)
    lines.append("trial order: " + " ".join(t["mode"] for t in trials))
    for mode, ts in by_mode.items():
        lines.append(f"{mode:7s} tokens/s: " + ", ".join(f"{t['tokens_per_s']:.1f}" for t in ts)
                     + f"  median {statistics.median(t['tokens_per_s'] for t in ts):.1f};"
                     f"  s/step median {statistics.median(t['step_s'] for t in ts):.2f}")
    if "ray" in by_mode and "inproc" in by_mode:
        ratio = [r["tokens_per_s"] / i["tokens_per_s"] for r, i in zip(by_mode["ray"], by_mode["inproc"])]
        lines.append(f"ray/inproc per pair: {', '.join(f'{x:.3f}' for x in ratio)}  median {statistics.median(ratio):.3f}"
                     f"  (ratio of medians {statistics.median(t['tokens_per_s'] for t in by_mode['ray']) / statistics.median(t['tokens_per_s'] for t in by_mode['inproc']):.3f})")
    for mode, ts in by_mode.items():
        lines.append(f"\nCPU s per second of training and per step ({mode}, median over {len(ts)} trials; "
                     f"machine has {os.cpu_count()} cores):")
        rows: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for t in ts:
            c = t["cpu"]
            secs, steps = c.get("seconds") or 1.0, c.get("steps", 1)
            for label, v in c.get("procs", {}).items():
                rows[label].append((v / secs, v / steps))
            for label, v in c.get("threads", {}).items():
                rows["  " + label].append((v / secs, v / steps))
            rows["= ours (all above)"].append((c.get("ours", 0.0) / secs, c.get("ours", 0.0) / steps))
            rows["= other users' processes"].append((c.get("others", 0.0) / secs, c.get("others", 0.0) / steps))
        lines.append(f"  {'process / thread':45s} {'cpu/s':>6s} {'cpu/step':>8s}")
        for label, vals in sorted(rows.items(), key=lambda kv: (kv[0].startswith("="),
                                                                -statistics.median(v[0] for v in kv[1]))):
            pad = [(0.0, 0.0)] * (len(ts) - len(vals))
            per_s = statistics.median(v[0] for v in vals + pad)
            per_step = statistics.median(v[1] for v in vals + pad)
            if per_s >= 0.005 or label.startswith("="):
                lines.append(f"  {label:45s} {per_s:6.3f} {per_step:8.3f}")
    return "\n".join(lines)


BURNER = """
import sys, time
busy = 0.05 * float(sys.argv[1])
while True:
    t = time.perf_counter()
    while time.perf_counter() - t < busy:
        pass
    time.sleep(0.05 - busy)
"""


def compare_checkouts(other: Path, args) -> None:
    """Ray SFT tokens/s of this checkout ("after") against another one ("before"), interleaved in pairs (before,
    after, after, before, ...), each trial a fresh process running its own checkout's code (Ray workers included,
    through PYTHONPATH). Prints every trial, each side's median and the median of the per-pair after ÷ before."""
    sides = {"before": other, "after": ROOT}
    tokens: dict[str, list[float]] = {"before": [], "after": []}
    for r in range(args.rounds):
        for side in (("before", "after") if r % 2 == 0 else ("after", "before")):
            root = sides[side]
            out = Path(tempfile.mkdtemp(prefix="rayoh-")) / "trial.json"
            cmd = [sys.executable, str(root / "bench" / "ray_overhead.py"), "--one", "ray", "--out", str(out),
                   "--steps", str(args.steps), "--rows", str(args.rows)] + (["--model", args.model] if args.model else [])
            proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(root)})
            if proc.returncode:
                sys.exit(f"{side} trial failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            tokens[side].append(json.loads(out.read_text())["tokens_per_s"])
            print(f"pair {r} {side}: {tokens[side][-1]:.1f} tokens/s", flush=True)
    ratios = [a / b for a, b in zip(tokens["after"], tokens["before"])]
    result = {"before": tokens["before"], "after": tokens["after"], "pair_ratios": ratios,
              "median_pair_ratio": statistics.median(ratios),
              "median_before": statistics.median(tokens["before"]), "median_after": statistics.median(tokens["after"])}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"after ÷ before per pair: {', '.join(f'{x:.3f}' for x in ratios)}; median {result['median_pair_ratio']:.3f} "
          f"(medians {result['median_after']:.1f} / {result['median_before']:.1f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", choices=["ray", "inproc"], help="run a single trial in this process")
    ap.add_argument("--out", help="with --one: write the trial's JSON here")
    ap.add_argument("--rounds", type=int, default=2, help="A B pairs (ray, inproc), each trial a fresh process")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--model", help="a local model folder (default: the embedded model under .alignpipe/models)")
    ap.add_argument("--json", help="write all trials here")
    ap.add_argument("--against", help="another checkout: compare its Ray SFT tokens/s with this one's, in pairs")
    ap.add_argument("--cpus", type=int, help="compute.cpus_per_worker (torch threads on both sides; default: the "
                    "demo's). Below the machine's cores, Ray's own processes get a core the trainer does not use")
    ap.add_argument("--pause", type=float, default=0.0,
                    help="with --one ray: stop Ray's other processes in windows of this many seconds (see Pauser)")
    ap.add_argument("--pause-cycles", type=int, default=3, help="with --pause: paused windows (each followed by a "
                    "running one of the same length)")
    ap.add_argument("--kernels", choices=["auto", "off"], help="with --one: compute.kernels (default: the demo's)")
    ap.add_argument("--against-kernels-off", action="store_true",
                    help="pair each Ray trial with a Ray trial under compute.kernels: off (instead of in-process): "
                         "the share of the pipeline's own CPU kernels")
    ap.add_argument("--load", type=float, default=0.0,
                    help="share of one core (0-1) a nice-0 process keeps busy beside every trial")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.one:
        pause = Pauser(args.pause, args.pause_cycles) if args.pause else None
        if pause is not None and args.one != "ray":
            ap.error("--pause needs --one ray")
        res = trial(args.one, args.steps, args.rows, args.model, args.cpus, pause, args.kernels)
        if args.out:
            Path(args.out).write_text(json.dumps(res))
        print(json.dumps({k: v for k, v in res.items() if k != "cpu"}))
        return
    if args.against:
        return compare_checkouts(Path(args.against).resolve(), args)
    trials = []
    pair = ("ray", "ray-kernels-off") if args.against_kernels_off else ("ray", "inproc")
    for r in range(args.rounds):
        for mode in (pair if r % 2 == 0 else pair[::-1]):  # A B B A: cancels drift
            out = Path(tempfile.mkdtemp(prefix="rayoh-")) / "trial.json"
            one = ["--one", "ray", "--kernels", "off"] if mode == "ray-kernels-off" else ["--one", mode]
            cmd = [sys.executable, __file__, *one, "--out", str(out), "--steps", str(args.steps),
                   "--rows", str(args.rows)] + (["--model", args.model] if args.model else []) + (
                       ["--cpus", str(args.cpus)] if args.cpus else [])
            burner = (subprocess.Popen([sys.executable, "-c", BURNER, str(min(args.load, 0.95))])
                      if args.load > 0 else None)
            try:
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            finally:
                if burner:
                    burner.kill()
                    burner.wait()
            if proc.returncode:
                sys.exit(f"{mode} trial failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            trials.append({**json.loads(out.read_text()), "mode": mode})
            print(f"round {r} {mode}: {trials[-1]['tokens_per_s']:.1f} tokens/s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(trials, indent=1))
    print(_table(trials))


if __name__ == "__main__":
    main()
