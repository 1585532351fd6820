"""RLHF with something to fix (issue 30; rows fixed in bench/PROTOCOL.md "Issue 30").

The demo pipeline from an under-trained SFT model (`sft.max_steps`, default 12 of the usual 143), then
`align: rlhf` for each of 3 align seeds. The SFT model is the same for every seed (trained once, then taken from
the cache), and so is the reward model: the first seed trains it, the others reuse it
(`align.rlhf.reward_adapter`), so every seed's rewards are on one scale and the seeds' starts differ only by their
sampled answers. The policy trains `--policy-steps` at `--policy-lr` (the demo's 20 at 1e-4 left it where it
started: KL 0.001 after the last step). Per seed: the policy's mean reward on
the fixed held-out prompts before and after (`policy/reward_start`, `policy/reward_end`), and exact match of the
aligned model against the SFT model on the same first held-out rows (`evaluate.limit`, every model on every row).

    .venv/bin/python bench/rlhf_evidence.py [--sft-steps 12] [--seeds 0 1 2] [--rows 100] [--policy-steps 40]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.run import run_demo  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft-steps", type=int, default=12)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rows", type=int, default=100)
    ap.add_argument("--policy-steps", type=int, default=40)
    ap.add_argument("--policy-lr", type=float, default=5e-4)
    ap.add_argument("--out", default=str(ROOT / "bench/out/rlhf_evidence.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-rlhf-"))
    models = ROOT / ".alignpipe" / "models"
    if models.is_dir():
        (work / "models").symlink_to(models)
    common = [f"sft.max_steps={args.sft_steps}", "align.method=rlhf", "quantize.method=none",
              f"evaluate.limit={args.rows}", "evaluate.screen_rows=0", "evaluate.prompted_base.enabled=false",
              "register.enabled=false", f"align.rlhf.policy_steps={args.policy_steps}",
              f"align.rlhf.policy_learning_rate={args.policy_lr}"]
    seeds = {}
    reward = []  # the first seed's reward model, for the others
    for seed in args.seeds:
        wall, summary = run_demo(work, *common, f"align.seed={seed}", *reward)
        if not reward:
            reward = [f"align.rlhf.reward_adapter={work / 'stages' / 'align' / summary['aligned']['content_key']}"
                      "/reward_adapter"]
        train, m = summary["aligned"]["metrics"], summary["metrics"]
        seeds[seed] = {"wall_s": round(wall, 1), "reward_start": train["policy/reward_start"],
                       "reward_end": train["policy/reward_end"], "reward_model_accuracy": train.get("reward_model/accuracy"),
                       "sft_exact_match": m["sft"]["exact_match"], "aligned_exact_match": m["aligned"]["exact_match"]}
        print(f"seed {seed}: {seeds[seed]}", flush=True)
    starts = [s["reward_start"] for s in seeds.values()]
    ends = [s["reward_end"] for s in seeds.values()]
    gains = [s["aligned_exact_match"] - s["sft_exact_match"] for s in seeds.values()]
    verdict = {"every_end_above_every_start": min(ends) > max(starts),
               "reward_gain_mean": statistics.mean(e - s for s, e in zip(starts, ends)),
               "start_spread": max(starts) - min(starts), "end_spread": max(ends) - min(ends),
               "exact_match_gain_mean": statistics.mean(gains), "exact_match_gains": gains}
    print(json.dumps(verdict, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"sft_steps": args.sft_steps, "rows": args.rows, "settings": common + reward,
                                          "seeds": seeds, "verdict": verdict}, indent=1))


if __name__ == "__main__":
    main()
