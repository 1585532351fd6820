"""SFT tokens/s, ours ÷ the competent plain-TRL peer, in pairs taken in turns (bench/PROTOCOL.md, issue 30).

One run each, far apart, cannot settle this ratio on a host whose speed drifts by a third within hours. Here each
trial is a fresh process, and the two sides take turns (ours, peer, peer, ours, ours, peer, …), so a pair's
ratio is read at one host speed:
  * ours: `alignpipe run demo` with only its SFT stage doing work (align and quantize off, registration off,
    evaluation cut to one row), in a fresh workdir (nothing cached), the demo's SFT settings; its figure is
    `final/train_tokens_per_s` (the Trainer's non-padding input tokens ÷ its train runtime);
  * peer: `bench/plain_trl.py --recipe competent --sft-only`, counted the same way.
The reading is the median of the pairs' ratios; both sides' trials are kept.

    .venv/bin/python bench/sft_pairs.py [--pairs 3] [--out bench/out/sft_pairs.json]
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

from alignpipe.config.model import EMBEDDED_MODEL  # noqa: E402
from alignpipe.models import resolve_model  # noqa: E402
from bench.any_cpu import demo_process, sft_figures  # noqa: E402
from bench.run import under_pipeline_malloc  # noqa: E402

SFT_ONLY = ("align.method=none", "quantize.method=none", "register.enabled=false", "evaluate.limit=1",
            "evaluate.compare_base=false", "evaluate.prompted_base.enabled=false", "evaluate.perplexity_rows=1",
            "evaluate.preference_rows=1")


def order(pairs: int) -> list[str]:
    """Who runs when: ours, peer, peer, ours, ours, peer, … (each side first in every other pair)."""
    return [side for i in range(pairs) for side in (("ours", "peer") if i % 2 == 0 else ("peer", "ours"))]


def ours(root: Path, models: Path, trial: int) -> dict:
    """The pipeline's SFT stage in a fresh workdir (the converted model shared through a link)."""
    work = root / f"ours-{trial}"
    work.mkdir()
    (work / "models").symlink_to(models)
    log = root / f"ours-{trial}.log"
    code, wall = demo_process(work, list(SFT_ONLY), log)
    if code:
        sys.exit(f"ours, trial {trial}: `alignpipe run demo` failed (exit {code}); log: {log}")
    [summary] = (work / "runs").glob("*.json")
    figures = sft_figures(work, json.loads(summary.read_text())["mlflow_run_id"])
    return {"tokens_per_s": figures["tokens_per_s"], "train_runtime_s": figures["train_runtime_s"],
            "wall_s": round(wall, 1), "log": str(log)}


def peer(root: Path, model: str, trial: int) -> dict:
    """bench/plain_trl.py's competent recipe, SFT only, in its own process."""
    out = root / f"peer-{trial}"
    log = root / f"peer-{trial}.log"
    t0 = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.run([sys.executable, str(ROOT / "bench" / "plain_trl.py"), "--recipe", "competent",
                               "--sft-only", "--model", model, "--out", str(out)], cwd=ROOT, stdout=f,
                              stderr=subprocess.STDOUT).returncode
    if code:
        sys.exit(f"peer, trial {trial}: bench/plain_trl.py failed (exit {code}); log: {log}")
    res = json.loads((out / "result.json").read_text())
    return {"tokens_per_s": res["sft_tokens_per_s"], "sft_s": round(res["stage_s"]["sft"], 1),
            "wall_s": round(time.perf_counter() - t0, 1), "log": str(log)}


def reading(trials: dict[str, list[dict]]) -> dict:
    """Median of the pairs' ratios (ours ÷ peer), the ratios, and each side's median."""
    a = [t["tokens_per_s"] for t in trials["ours"]]
    b = [t["tokens_per_s"] for t in trials["peer"]]
    ratios = [x / y for x, y in zip(a, b)]
    return {"ratio": statistics.median(ratios), "pair_ratios": ratios, "pairs": len(ratios),
            "ours_median": statistics.median(a), "peer_median": statistics.median(b)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "sft_pairs.json"))
    args = ap.parse_args()
    allocator = under_pipeline_malloc()  # the peer allocates as the pipeline's Ray workers do (as in `make bench`)
    models = ROOT / ".alignpipe" / "models"
    model = resolve_model(EMBEDDED_MODEL, models)  # converted once, before any trial: neither side times it
    root = Path(tempfile.mkdtemp(prefix="bench-sft-pairs-"))
    trials: dict[str, list[dict]] = {"ours": [], "peer": []}
    for side in order(args.pairs):
        n = len(trials[side])
        trials[side].append(ours(root, models, n) if side == "ours" else peer(root, model, n))
        print(f"{side} {n}: {trials[side][-1]['tokens_per_s']:.1f} tokens/s", flush=True)
    result = {**reading(trials), "order": order(args.pairs), "trials": trials, "settings": list(SFT_ONLY),
              "workdir": str(root), "cpus": os.cpu_count(), "allocator": allocator}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("ratio", "pair_ratios", "ours_median", "peer_median")}))


if __name__ == "__main__":
    main()
