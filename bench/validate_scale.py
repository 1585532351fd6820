"""`validate` at scale: rows/s and peak memory on generated SFT files of 100k / 200k / 1M rows (issue 29).

Each file is the demo's SFT rows repeated, each user turn with a unique reference appended (so no row is a
duplicate); the held-out split is the demo's. Each size runs `validate_data` (the demo pipeline's settings) in a
fresh process, which samples every 0.2 s the RSS of itself and of every process it started (Ray's GCS, raylet and
workers): the peak of the driver, of the largest single process and of their sum.

    .venv/bin/python bench/validate_scale.py --rows 100000 200000 [1000000] [--out bench/out/validate_scale.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def generate(path: Path, rows: int) -> int:
    """The demo's SFT rows with ` (ref <i>)` appended to each user turn; returns the file's size in bytes."""
    demo = [json.loads(line) for line in (ROOT / "data/demo/sft_train.jsonl").read_text().splitlines()]
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            row = demo[i % len(demo)]
            msgs = [dict(m, content=m["content"] + f" (ref {i})") if m["role"] == "user" else m
                    for m in row["messages"]]
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    return path.stat().st_size


class RssSampler(threading.Thread):
    """Peak RSS of this process, of the largest single process and of the sum over it and all its descendants."""

    def __init__(self, every: float = 0.2):
        super().__init__(daemon=True)
        import psutil

        self.me, self.every, self.stop = psutil.Process(), every, threading.Event()
        self.driver = self.largest = self.total = 0

    def run(self) -> None:
        import psutil

        while not self.stop.is_set():
            rss = {}
            for p in [self.me, *self.me.children(recursive=True)]:
                try:
                    rss[p.pid] = p.memory_info().rss
                except psutil.Error:  # ended between listing and reading
                    pass
            self.driver = max(self.driver, rss.get(self.me.pid, 0))
            self.largest = max(self.largest, *rss.values())
            self.total = max(self.total, sum(rss.values()))
            self.stop.wait(self.every)


def measure(path: str, work: str) -> dict:
    """In a fresh process: validate_data on `path` with the demo's settings; wall time and peak memory."""
    from alignpipe.tasks.validate import validate_data

    from alignpipe.config import load_pipeline
    from alignpipe.models import resolve_model

    cfg = load_pipeline(str(ROOT / "pipelines.yaml"), "demo", {"workdir": work})
    cfg.data.sft.path, cfg.data.preference, cfg.data.preference_eval = path, None, None
    tokenizer = resolve_model(cfg.model.name, Path(work) / "models")
    sampler = RssSampler()
    sampler.start()
    t0 = time.perf_counter()
    report = validate_data(cfg, tokenizer, Path(work) / "validate")
    seconds = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    rows = int(report.stats["rows_train"])
    gib = 2**30
    return {"rows": rows, "success": report.success, "seconds": round(seconds, 1),
            "rows_per_s": round(rows / seconds), "engine": "ray" if len(list(Path(report.train_path).glob(
                "part-*.parquet"))) > 1 else "in-process",
            "peak_rss_driver_gib": round(sampler.driver / gib, 2), "peak_rss_largest_gib": round(sampler.largest / gib, 2),
            "peak_rss_sum_gib": round(sampler.total / gib, 2), "max_batch_rows": report.stats["max_batch_rows"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 200_000])
    parser.add_argument("--out", default=str(ROOT / "bench/out/validate_scale.json"))
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)  # the child process: <file> <workdir>
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="validate-scale-") as tmp:
        for rows in args.rows:
            path = Path(tmp) / f"sft_{rows}.jsonl"
            size = generate(path, rows)
            proc = subprocess.run([sys.executable, __file__, "--measure", str(path), str(Path(tmp) / f"work{rows}")],
                                  capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                sys.exit(f"{rows} rows: validate failed:\n{proc.stderr[-3000:]}")
            result = {"file_mb": round(size / 2**20, 1), **json.loads(proc.stdout.strip().splitlines()[-1])}
            print(json.dumps(result), flush=True)
            results.append(result)
            path.unlink()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
