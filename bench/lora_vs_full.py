"""One SFT run of the demo model, LoRA or full fine-tuning, in this process; prints its costs as JSON.

bench/run.py starts it once per mode, each in a fresh process, so one run's peak RSS cannot hide the other's.
All modes use the pipeline's own trainer (`alignpipe.tasks.sft.build_trainer`: demo SFT settings, its tokenization with
assistant-only loss, bf16 weights + autocast where native, no gradient checkpointing, length-grouped batches)
on the same rows, steps and batch size; `full` only switches the adapter off, so every weight trains, in bf16
(weights, gradients and AdamW states all bf16, as torchtune's full fine-tuning in bf16 does); `full-amp` also
loads the weights in fp32, so the trainer keeps fp32 master weights, gradients and AdamW states and computes under
bf16 autocast: mixed precision as transformers' Trainer (and TRL) run `bf16=True` on a model loaded in fp32.

    python bench/lora_vs_full.py --mode lora --steps 10 --rows 200
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers import TrainerCallback  # noqa: E402

import alignpipe.tasks.sft as sft_stage  # noqa: E402
from alignpipe import models, training  # noqa: E402
from alignpipe.config import load_pipeline  # noqa: E402
from alignpipe.data.formats import load_sft, write_jsonl  # noqa: E402
from alignpipe.models import dtype_for, resolve_model  # noqa: E402


FULL_MODES = ("full", "full-amp")


def vm_hwm_mb() -> float:
    """This process's peak resident set (VmHWM, kB). Unlike ru_maxrss it is not carried over from the process
    that exec'd this one: bench/run.py, ~4 GB after the demo, starts these runs through vfork + exec."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024


def current_rss_mb() -> float:
    """This process's resident set now (/proc/self/statm: pages)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRss:
    """The peak RSS between enter and exit, exactly: the kernel's high-water mark, reset on entry by writing 5 to
    /proc/self/clear_refs (Linux 4.0+). A lifetime peak would show loading the checkpoint (fp32, then cast to
    bf16), which peaks higher than a LoRA training step and hides the difference; sampling the RSS every few ms
    misses peaks shorter than the interval (the LM head's, at the end of each forward, lasts a few ms)."""

    def __init__(self):
        self.peak_mb = 0.0

    def __enter__(self):
        Path("/proc/self/clear_refs").write_text("5")
        return self

    def __exit__(self, *exc):
        self.peak_mb = vm_hwm_mb()


class TokenRate(TrainerCallback):
    """Non-padding tokens/s between consecutive logs (TRL logs the running `num_tokens` count)."""

    def __init__(self):
        self.rates: list[float] = []
        self._last: tuple[float, float] | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "num_tokens" not in logs or "loss" not in logs:
            return
        now, tokens = time.perf_counter(), logs["num_tokens"]
        if self._last and tokens > self._last[1]:
            self.rates.append((tokens - self._last[1]) / (now - self._last[0]))
        self._last = (now, tokens)


def run(mode: str, steps: int, rows: int, model: str | None) -> dict:
    """Train `steps` steps on the first `rows` demo conversations; trainable params, peak RSS, tokens/s."""
    import torch

    baseline = current_rss_mb()  # imports only: the floor every mode shares
    work = Path(tempfile.mkdtemp(prefix=f"bench-{mode}-"))
    cfg = load_pipeline(ROOT / "pipelines.yaml", "demo", {"workdir": str(work), "sft.max_steps": steps,
                                                          "sft.eval_fraction": 0.0, "sft.logging_steps": 1,
                                                          "sft.save_steps": 10_000}, env={})
    base = model or resolve_model(cfg.model.name, ROOT / ".alignpipe" / "models")
    train = write_jsonl(load_sft(cfg.data.sft.path, limit=rows), work / "train.jsonl")
    threads = int(cfg.compute.cpus_per_worker)  # a Ray Train worker's torch threads
    torch.set_num_threads(threads)
    conf = sft_stage.job_for(cfg, base, str(train))
    rate = TokenRate()
    load_model = models.load_model
    with ExitStack() as stack:
        if mode in FULL_MODES:  # the same trainer with no adapter; build_trainer looks peft_config up at call time
            stack.enter_context(mock.patch.object(training, "peft_config", return_value=None))
        if mode == "full-amp":  # fp32 weights; build_trainer still sets bf16 autocast from sft.precision
            stack.enter_context(mock.patch.object(models, "load_model",
                                                  lambda path, dtype, **kw: load_model(path, "float32", **kw)))
        trainer, _ = sft_stage.build_trainer(conf, str(work / "out"), [rate], log_progress=False)
    weights_dtype = str(next(trainer.model.parameters()).dtype).removeprefix("torch.")
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    ds = trainer.train_dataset  # tokens whose next token is a label: the only rows the LM head projects
    label_share = sum(sum(x != -100 for x in row) for row in ds["labels"]) / sum(len(i) for i in ds["input_ids"])
    total = sum(p.numel() for p in trainer.model.parameters())
    loaded_rss = current_rss_mb()  # model and data in memory, before the first step
    loading_peak = vm_hwm_mb()
    with PeakRss() as peak:
        out = trainer.train()
    steady = rate.rates[1:] if len(rate.rates) > 2 else rate.rates  # the first interval pays for warm-up
    return {"mode": mode, "trainable_params": trainable, "total_params": total,
            "peak_rss_mb": peak.peak_mb, "loaded_rss_mb": loaded_rss,
            "lifetime_peak_rss_mb": max(loading_peak, peak.peak_mb),
            "import_rss_mb": baseline, "label_share": label_share,
            "tokens_per_s": statistics.median(steady) if steady else float("nan"),
            "train_runtime_s": out.metrics.get("train_runtime", float("nan")), "steps": steps, "rows": rows,
            "batch_size": cfg.sft.batch_size, "threads": threads, "weights_dtype": weights_dtype,
            "autocast": dtype_for(cfg.sft.precision),
            "model": base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("lora", *FULL_MODES), required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--model", default=None, help="model folder (default: the demo's embedded model)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    result = run(args.mode, args.steps, args.rows, args.model)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
