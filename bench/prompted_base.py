"""Choose k for the prompted base model (issue 30; rule fixed in bench/PROTOCOL.md "Issue 30").

The demo's base model with the task and its JSON schema in a system turn (`chat.task_instructions`) and the first
k training conversations as earlier turns (`chat.few_shot`), scored by exact match on a development slice of 64
training rows (rows 9-72: never an in-context example, never a held-out row), for k in {0, 2, 4, 8}; greedy
decoding with the demo's evaluate settings, in this process. The highest exact match wins, a tie goes to the
smaller k.

    .venv/bin/python bench/prompted_base.py [--ks 0 2 4 8] [--out bench/out/prompted_base.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alignpipe import chat, models  # noqa: E402
from alignpipe.config import load_pipeline  # noqa: E402
from alignpipe.data.formats import load_canonical  # noqa: E402
from alignpipe.tasks.evaluate import generate, prompted_prompts, score  # noqa: E402

DEV = slice(8, 72)  # rows 9-72 of the training split
MAX_K = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 2, 4, 8])
    parser.add_argument("--out", default=str(ROOT / "bench/out/prompted_base.json"))
    args = parser.parse_args()
    if max(args.ks) > MAX_K:
        parser.error(f"k above {MAX_K} would put development rows in context")
    cfg = load_pipeline(ROOT / "pipelines.yaml", "demo", {})
    rows = load_canonical(ROOT / cfg.data.sft.path)
    examples = [chat.with_system(r["messages"], cfg.model.system_prompt) for r in rows[:MAX_K]]
    dev = [chat.split_prompt_answer(chat.with_system(r["messages"], cfg.model.system_prompt)) for r in rows[DEV]]
    instructions = chat.task_instructions(cfg.model.system_prompt, chat.split_prompt_answer(examples[0])[1])
    base = models.resolve_model(cfg.model.name, Path(cfg.workdir) / "models")
    dtype, why = models.precision_choice(cfg.evaluate.precision)
    print(f"prompted_base: {why}\ninstructions: {instructions}")
    model, tokenizer = models.load_model(base, dtype=dtype).eval(), models.load_tokenizer(base)
    tokenizer.padding_side = "left"
    results = {}
    for k in args.ks:
        prompts, prefix = prompted_prompts(tokenizer, [msgs for msgs, _ in dev], instructions, examples[:k])
        t0 = time.perf_counter()
        answers, _, tokens, seconds, _ = generate(model, tokenizer, prompts, cfg.evaluate, prefix=prefix)
        m = score(answers, [ref for _, ref in dev], cfg.data.json_targets)
        results[k] = {"exact_match": m["exact_match"], "json_validity": m.get("json_validity"),
                      "prompt_tokens_mean": sum(len(tokenizer(p)["input_ids"]) for p in prompts) / len(prompts),
                      "tokens_per_s": tokens / seconds if seconds else 0.0, "wall_s": time.perf_counter() - t0,
                      "prefix_cached": bool(prefix), "first_answer": answers[0]}
        print(f"k={k}: exact match {m['exact_match']:.3f}, JSON {m.get('json_validity', 0):.3f}, "
              f"{results[k]['prompt_tokens_mean']:.0f} prompt tokens, {results[k]['wall_s']:.1f} s; "
              f"e.g. {answers[0]!r}")
    best = max(results, key=lambda k: (results[k]["exact_match"], -k))
    print(f"chosen k = {best}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": len(dev), "instructions": instructions, "dtype": dtype,
                                          "results": results, "chosen_k": best}, indent=1))


if __name__ == "__main__":
    main()
