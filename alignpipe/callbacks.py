"""The Trainer callbacks of every training stage: the MLflow stream and the progress report.

Imported in the Ray Train workers only (`alignpipe.training.WorkerRun`): importing transformers' Trainer machinery
takes seconds, which the flow's own process does not need to spend.
"""

from __future__ import annotations

import time
from pathlib import Path

from transformers import TrainerCallback

from alignpipe import progress
from alignpipe.metric_buffer import MetricBuffer


class MlflowStream(TrainerCallback):
    """Streams the Trainer's logs to an MLflow run as training goes, with tokens/s between logs.

    Points go through a `MetricBuffer`, so a tracking server that is down or slow never stalls training;
    the end of training waits (bounded) for them to be written.

    Args:
        uri: MLflow tracking URI.
        run_id: the stage's MLflow run.
        spool: local JSONL file keeping the unwritten points across a worker restart (see `metric_buffer`).
        buffer: an existing buffer to share (one per run and process), instead of a new one.
        prefix: put in front of every metric name (a second trainer's curves in the same run).
    """

    def __init__(self, uri: str, run_id: str, spool: Path | None = None, buffer: MetricBuffer | None = None,
                 prefix: str = ""):
        self.uri, self.run_id, self.prefix = uri, run_id, prefix
        self.buffer = buffer or MetricBuffer(uri, run_id, spool)
        self._last = (time.perf_counter(), 0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        logs = {f"{self.prefix}{k}": v for k, v in logs.items()}
        metrics = {k.replace("train_", "train/") if k.startswith("train_") else k: v for k, v in logs.items()}
        now, tokens = time.perf_counter(), logs.get("num_tokens")
        if tokens is not None and "loss" in logs:
            t0, n0 = self._last
            if tokens > n0 and now > t0:
                metrics["tokens_per_s"] = (tokens - n0) / (now - t0)
            self._last = (now, tokens)
        self.buffer.log(metrics, step=state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.buffer.drain()  # what this run logged is in MLflow before anyone reads it back


class ProgressReport(TrainerCallback):
    """Reports a training stage's step, last loss, tokens/s and ETA to the run's progress board (`alignpipe.progress`),
    from rank 0, at most once a second. Tokens/s is tokens seen (TRL's `num_tokens`, else the Trainer's
    `num_input_tokens_seen`) over the wall time since training began; the ETA is the steps left at the pace so far."""

    def __init__(self, stage: str):
        self.reporter = progress.Reporter(stage)
        self.t0, self.step0, self.loss, self.tokens = time.perf_counter(), 0, None, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0, self.step0 = time.perf_counter(), state.global_step  # a resumed run counts from its checkpoint
        self._send(state, final=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        self.loss = logs.get("loss", self.loss)
        self.tokens = logs.get("num_tokens", self.tokens)

    def on_step_end(self, args, state, control, **kwargs):
        self._send(state)

    def on_train_end(self, args, state, control, **kwargs):
        self._send(state, final=True)

    def _send(self, state, final: bool = False) -> None:
        if not state.is_world_process_zero:
            return
        elapsed = time.perf_counter() - self.t0
        tokens = self.tokens or state.num_input_tokens_seen
        self.reporter.report(final=final, kind="train", done=state.global_step, total=state.max_steps,
                             loss=self.loss, tokens_per_s=tokens / elapsed if elapsed > 0 else 0.0,
                             eta_s=progress.eta_s(state.global_step - self.step0, state.max_steps - self.step0,
                                                  elapsed))
