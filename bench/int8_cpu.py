"""int8 vs fp32 greedy decoding on CPU, per int8 runtime, on a host class real or emulated; prints JSON.

Loads a quantize stage's `merged` (fp32) and `quantized` (torchao int8-dynamic) folders and decodes the same
held-out prompts (rendered as evaluate renders them) at one batch size under each variant:

    fp32        the merged model
    torchao     the int8 model as from_pretrained gives it (torchao's per-token path in every linear)
    fbgemm      fused fbgemm linears except down_proj / o_proj, which stay on torchao's per-token path (the
                default on CPUs with VNNI)
    fbgemm_all  fused fbgemm linears everywhere (per-tensor activation scales in every linear)
    fbgemm_o    fused fbgemm linears except down_proj (o_proj fused too)
    fbgemm_dq   fbgemm, with down_proj / o_proj dequantized to fp32 weights (int8 on disk, fp32 matmul; the
                default on AVX2-only CPUs: `int8_cpu.per_token_in_int8`)

Timing: every row decodes exactly `--new-tokens` tokens (no early stop: each variant does the same work), the
variants interleaved round after round (the order rotates each round); tokens/s per variant is the median over
rounds, and its ratio to fp32 the median of the per-round ratios. Accuracy (`--accuracy-rows`): greedy with EOS,
exact match against the reference answers, and agreement with fp32's answers.

Each host class runs in its own process, since ATen, oneDNN, MKL and fbgemm read their ISA caps at import:

    .venv/bin/python bench/int8_cpu.py --model-dir /tmp/ci/.alignpipe/stages/quantize/<key> --emulate avx2 native
    .venv/bin/python bench/int8_cpu.py ... --emulate avx2 --profile torchao   # top ops by self CPU time
    .venv/bin/python bench/int8_cpu.py ... --emulate avx2 native --micro     # one linear per runtime

`--micro` times one linear of each of the model's shapes per runtime in thread CPU time on one thread: on a shared
machine, other processes stretch wall time (every op waits for its slowest thread) but barely this.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# an AVX2-only CPU (no AVX-512, no VNNI, no AMX) on an AVX-512 host, the way bench/PROTOCOL.md defines it
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
            "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}
VARIANTS = ("fp32", "torchao", "fbgemm", "fbgemm_all", "fbgemm_o", "fbgemm_dq")
SYSTEM_PROMPT = "Extract the contact card."


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True, help="a quantize stage folder holding merged/ and quantized/")
    p.add_argument("--data", default=str(ROOT / "data/demo/sft_heldout.jsonl"))
    p.add_argument("--emulate", nargs="+", default=["avx2"], choices=["avx2", "native"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=40)
    p.add_argument("--timing-rows", type=int, default=32, help="rows decoded per variant per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--accuracy-rows", type=int, default=0, help="rows scored for exact match (0 = skip)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile", default=None, help="profile one timed batch of this variant instead of timing")
    p.add_argument("--micro", action="store_true", help="time single linears instead of decoding")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(micro() if args.micro else run(args)), flush=True)
        return
    results = {}
    for host in args.emulate:  # one fresh process per host class
        env = {**os.environ, **(AVX2_ENV if host == "avx2" else {})}
        if host == "native":
            for key in AVX2_ENV:
                env.pop(key, None)
        argv = [a for a in sys.argv[1:] if a not in ("--emulate", "avx2", "native")]
        cmd = [sys.executable, __file__, *argv, "--child", "--emulate", host]
        out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=False)  # progress on stderr
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode or not lines:
            sys.exit(f"{host}: child failed ({out.returncode})")
        results[host] = json.loads(lines[-1][len("RESULT "):])
        print(f"--- {host}", file=sys.stderr)
        print(out.stdout.replace(lines[-1], "").strip(), file=sys.stderr)
    print(json.dumps(results, indent=2))


def run(args) -> dict:
    """One host class, in this process: load every variant, time them interleaved, score them."""
    sys.path.insert(0, str(ROOT))
    import torch

    from alignpipe import chat, models
    from alignpipe.data.formats import load_canonical

    torch.set_num_threads(args.threads)
    folder = Path(args.model_dir)
    tokenizer = models.load_tokenizer(str(folder / "merged"))
    tokenizer.padding_side = "left"
    rows = load_canonical(args.data)[: max(args.timing_rows, args.accuracy_rows)]
    convs = [chat.split_prompt_answer(chat.with_system(r["messages"], SYSTEM_PROMPT)) for r in rows]
    prompts = [chat.render(tokenizer, msgs, add_generation_prompt=True) for msgs, _ in convs]
    references = [ref for _, ref in convs]

    built = {name: build(name, folder) for name in args.variants}
    host = {"capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "loadavg_1min_at_start": os.getloadavg()[0],
            "env": {k: os.environ.get(k) for k in AVX2_ENV if os.environ.get(k)},
            "fused_linears": {name: n for name, (_, n) in built.items()}}
    timing_prompts = sorted(prompts[: args.timing_rows], key=len)
    if args.profile:
        return {"host": host, "profile": profile(built[args.profile][0], tokenizer, timing_prompts[: args.batch],
                                                 args.new_tokens)}
    for name, (model, _) in built.items() if args.rounds else ():  # warm-up: first calls allocate, pick kernels
        decode(model, tokenizer, timing_prompts[: args.batch], 4, fixed=True)

    seconds: dict[str, list[float]] = {name: [] for name in built}
    cpu: dict[str, list[float]] = {name: [] for name in built}  # with --threads 1: all the compute, in CPU time
    names = list(built)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0, c0 = time.perf_counter(), time.thread_time()
            for start in range(0, len(timing_prompts), args.batch):
                decode(built[name][0], tokenizer, timing_prompts[start: start + args.batch], args.new_tokens,
                       fixed=True)
            seconds[name].append(time.perf_counter() - t0)
            cpu[name].append(time.thread_time() - c0)
            print(f"round {r}: {name} {seconds[name][-1]:.1f} s cpu {cpu[name][-1]:.1f} s", file=sys.stderr,
                  flush=True)
    tokens = len(timing_prompts) * args.new_tokens
    timing = {name: {"tokens_per_s": tokens / statistics.median(s), "rounds_s": [round(x, 2) for x in s]}
              for name, s in seconds.items() if s}
    if "fp32" in seconds and args.rounds:
        for name, s in seconds.items():
            timing[name]["ratio_to_fp32"] = statistics.median(b / a for a, b in zip(s, seconds["fp32"]))
            if args.threads == 1:  # other processes barely change a single thread's CPU time: the cleaner ratio
                timing[name]["cpu_ratio_to_fp32"] = statistics.median(b / a for a, b in zip(cpu[name], cpu["fp32"]))

    accuracy = {}
    if args.accuracy_rows:
        answers = {}
        for name, (model, _) in built.items():
            order = sorted(range(args.accuracy_rows), key=lambda i: len(prompts[i]))
            got = [""] * args.accuracy_rows
            for start in range(0, len(order), args.batch):
                idx = order[start: start + args.batch]
                for i, text in zip(idx, decode(model, tokenizer, [prompts[i] for i in idx], args.new_tokens)):
                    got[i] = text
            answers[name] = got
            accuracy[name] = {"exact_match": sum(g.strip() == ref.strip() for g, ref in zip(got, references))
                              / len(got)}
            print(f"accuracy: {name} {accuracy[name]}", file=sys.stderr, flush=True)
        for name, got in answers.items():
            if "fp32" in answers:
                accuracy[name]["same_as_fp32"] = sum(a == b for a, b in zip(got, answers["fp32"])) / len(got)
        accuracy["rows"] = args.accuracy_rows
    host["loadavg_1min_at_end"] = os.getloadavg()[0]  # other work on the machine: contention inflates small ops
    return {"host": host, "batch": args.batch, "new_tokens": args.new_tokens, "timing_rows": len(timing_prompts),
            "rounds": args.rounds, "timing": timing, "accuracy": accuracy}


def micro(rows=(16, 960), shapes=((576, 576), (576, 1536), (1536, 576))) -> dict:
    """Thread CPU time (ms) of one linear call per runtime, at decode (16 rows) and prefill-like (960) sizes."""
    import torch
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    sys.path.insert(0, str(ROOT))
    from alignpipe.kernels import int8_cpu

    torch.set_num_threads(1)

    def cpu_ms(fn, calls: int) -> float:
        fn()
        times = []
        for _ in range(3):
            t0 = time.thread_time()
            for _ in range(calls):
                fn()
            times.append((time.thread_time() - t0) / calls * 1e3)
        return round(statistics.median(times), 3)

    out = {"capability": torch.backends.cpu.get_cpu_capability()}
    for k, n in shapes:
        fp32 = torch.nn.Linear(k, n, bias=False).eval()
        runtimes = {"fp32": fp32}
        for name, keep in (("torchao", None), ("fbgemm", ())):
            q = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False))
            q[0].weight.data.copy_(fp32.weight.data)
            quantize_(q, Int8DynamicActivationInt8WeightConfig())
            if keep is not None:
                int8_cpu.use_fbgemm_linears(q, keep)
            runtimes[name] = q
        for m in rows:
            x = torch.randn(m, k)
            a8, w8 = torch.randint(-127, 127, (m, k), dtype=torch.int8), torch.randint(-127, 127, (n, k), dtype=torch.int8)
            calls = 50 if m <= 16 else 3
            with torch.inference_mode():
                out[f"{k}x{n} rows={m}"] = {**{name: cpu_ms(lambda f=f, x=x: f(x), calls) for name, f in runtimes.items()},
                                            "_int_mm": cpu_ms(lambda a=a8, w=w8: torch._int_mm(a, w.t()), calls)}
    return out


def build(name: str, folder: Path):
    """(model, fused linears) for a variant, in eval mode, fp32 activations."""
    from alignpipe import models
    from alignpipe.kernels import int8_cpu

    if name == "fp32":
        return models.load_model(str(folder / "merged"), dtype="float32").eval(), 0
    model = models.load_model(str(folder / "quantized"), dtype="float32").eval()
    int8, fp32 = frozenset(int8_cpu.PER_TOKEN_INT8_FLAGS), frozenset()  # per-token layers: torchao / dequantized
    fused = 0
    if name == "fbgemm":
        fused = int8_cpu.use_fbgemm_linears(model, flags=int8)
    elif name == "fbgemm_all":
        fused = int8_cpu.use_fbgemm_linears(model, per_token_modules=())
    elif name == "fbgemm_o":
        fused = int8_cpu.use_fbgemm_linears(model, per_token_modules=("down_proj",), flags=int8)
    elif name == "fbgemm_dq":
        fused = int8_cpu.use_fbgemm_linears(model, flags=fp32)
    return model, fused


def decode(model, tokenizer, prompts: list[str], new_tokens: int, fixed: bool = False) -> list[str]:
    """Greedy answers; `fixed`: exactly `new_tokens` tokens a row (no stop at EOS)."""
    import torch

    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    stop = {"min_new_tokens": new_tokens} if fixed else {}
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, use_cache=True,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **stop)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def profile(model, tokenizer, prompts: list[str], new_tokens: int, top: int = 20) -> dict:
    """Top ops by self CPU time over one batch's decode, with the share of time under each linear's dispatch."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        decode(model, tokenizer, prompts, new_tokens, fixed=True)
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    print(events.table(sort_by="self_cpu_time_total", row_limit=top), flush=True)
    return {"wall_s": wall, "self_cpu_total_s": total / 1e6,
            "top": [{"op": e.key, "calls": e.count, "self_cpu_s": round(e.self_cpu_time_total / 1e6, 3),
                     "share": round(e.self_cpu_time_total / total, 3)} for e in ranked]}


if __name__ == "__main__":
    main()
