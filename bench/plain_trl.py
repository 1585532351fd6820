"""The `demo` pipeline's work done with TRL directly: LoRA SFT, DPO, torchao int8, four-model greedy evaluation.

No Prefect, Ray, MLflow or Great Expectations: one process, read top to bottom. The hyperparameters are the
`demo` pipeline's, read from pipelines.yaml at start. Two recipes (bench/PROTOCOL.md lists what still differs):
  * `defaults`: everything else is TRL's default (its chat-template handling, its loss on the whole
    conversation, fp32 weights + bf16 autocast, gradient checkpointing on, unsorted batches);
  * `competent`: what a competent TRL user sets, as the pipeline does: loss on the answers only (prompt-completion
    data, TRL's completion-only loss), gradient checkpointing off, bf16 weights where bf16 is native, batches
    grouped by length; and it scores each model on the rows the pipeline scores it on (`evaluate.screen_rows`
    for base, sft and int8; every held-out row for aligned).
Writes the fine-tuned folders under --out and prints one JSON object (wall time, per-stage seconds, metrics, SFT
tokens/s) that bench/run.py reads.

    python bench/plain_trl.py --out bench/out/plain_trl            # the demo's full settings, TRL's defaults
    python bench/plain_trl.py --recipe competent --out bench/out/plain_trl_competent
    python bench/plain_trl.py --tiny --sft-steps 2 --dpo-steps 1 --eval-rows 4 --train-rows 32 --out /tmp/p
    python bench/plain_trl.py --recipe competent --sft-only --out /tmp/p   # SFT alone (bench/sft_pairs.py)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from torchao.quantization import Int8DynamicActivationInt8WeightConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TorchAoConfig
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "demo"


def demo_settings(pipelines: Path = ROOT / "pipelines.yaml") -> dict:
    """The `demo` pipeline's hyperparameters, read from pipelines.yaml, so this script cannot drift from it.

    alignpipe's config loader only parses and validates the YAML (it imports no Prefect, Ray, MLflow or GX);
    it fills in the schema defaults where the file is silent, exactly as the pipeline sees them.
    """
    from alignpipe.config import load_pipeline

    cfg = load_pipeline(pipelines, "demo", {}, env={})
    s, a, e = cfg.sft, cfg.align, cfg.evaluate
    dpo = dict(max_steps=a.max_steps, learning_rate=a.learning_rate, per_device_train_batch_size=a.batch_size,
               max_length=a.max_length, beta=a.beta, lr_scheduler_type=a.lr_scheduler, warmup_steps=a.warmup_ratio,
               logging_steps=a.logging_steps, seed=a.seed)
    if a.sft_loss_weight:  # the pipeline's RPO: DPO's sigmoid loss + this weight x the chosen answers' NLL
        dpo.update(loss_type=["sigmoid", "sft"], loss_weights=[1.0, a.sft_loss_weight])
    return {
        "system_prompt": cfg.model.system_prompt,
        "sft": dict(max_steps=s.max_steps, num_train_epochs=s.epochs, learning_rate=s.learning_rate,
                    per_device_train_batch_size=s.batch_size,
                    gradient_accumulation_steps=s.grad_accum, max_length=s.max_length,
                    lr_scheduler_type=s.lr_scheduler, warmup_steps=s.warmup_ratio, logging_steps=s.logging_steps,
                    seed=s.seed),
        "sft_eval": dict(fraction=s.eval_fraction, steps=s.eval_steps),
        "dpo": dpo,
        "lora": dict(r=s.peft.r, lora_alpha=s.peft.alpha, lora_dropout=s.peft.dropout,
                     target_modules=s.peft.target_modules, task_type="CAUSAL_LM"),
        "align_lora": dict(r=a.peft.r, lora_alpha=a.peft.alpha, lora_dropout=a.peft.dropout,
                           target_modules=a.peft.target_modules, task_type="CAUSAL_LM"),
        "eval": dict(rows=e.limit, batch_size=e.batch_size, max_new_tokens=e.max_new_tokens, screen_rows=e.screen_rows,
                     perplexity_rows=e.perplexity_rows,
                     preference_rows=e.preference_rows, beta=a.beta),
    }


SETTINGS = demo_settings()
SYSTEM_PROMPT = SETTINGS["system_prompt"]
SFT, SFT_EVAL, DPO = SETTINGS["sft"], SETTINGS["sft_eval"], SETTINGS["dpo"]
LORA, ALIGN_LORA, EVAL = SETTINGS["lora"], SETTINGS["align_lora"], SETTINGS["eval"]


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def with_system(messages: list[dict]) -> list[dict]:
    """The system turn the pipeline adds to every conversation that has none."""
    return messages if messages and messages[0]["role"] == "system" else \
        [{"role": "system", "content": SYSTEM_PROMPT}, *messages]


def bf16_native() -> bool:
    """The pipeline's `precision: auto` choice (alignpipe.models, the same test: CUDA's bf16 support, else the
    CPU's native bf16 flags under any ISA cap in the environment, as on an emulated AVX2-only host)."""
    from alignpipe.models import dtype_for

    return dtype_for("auto") == "bfloat16"


def competent(native: bool) -> dict:
    """The TrainingArguments a competent user sets (both trainers): no gradient checkpointing on a model this
    small, bf16 weights and autocast where bf16 is native."""
    return dict(gradient_checkpointing=False, bf16=native, model_init_kwargs={"dtype": "bfloat16" if native else "float32"})


def train_sft(model_path: str, out: Path, steps: int, train_rows: int | None, recipe: str = "defaults",
              native: bool = False) -> tuple[Path, float]:
    """LoRA SFT; the adapter is merged and saved as a plain folder (the DPO reference). Returns it and the
    training tokens/s (non-padding input tokens over the train runtime, the Trainer's own count)."""
    convs = [with_system(r["messages"]) for r in read_jsonl(DATA / "sft_train.jsonl", train_rows)]
    if recipe == "competent":  # prompt-completion data: TRL computes the loss on the completion (answer) only
        rows = [{"prompt": c[:-1], "completion": c[-1:]} for c in convs]
        extra = {**competent(native), "completion_only_loss": True, "train_sampling_strategy": "group_by_length"}
    else:
        rows, extra = [{"messages": c} for c in convs], {}
    split = Dataset.from_list(rows).train_test_split(test_size=SFT_EVAL["fraction"], seed=SFT["seed"])
    args = SFTConfig(output_dir=str(out / "sft_run"), **{**SFT, "max_steps": steps},
                     per_device_eval_batch_size=SFT["per_device_train_batch_size"], eval_strategy="steps",
                     eval_steps=SFT_EVAL["steps"], report_to="none", use_cpu=True,  # the demo trains on CPU
                     include_num_input_tokens_seen="non_padding", **extra)  # tokens/s as the pipeline counts them
    trainer = SFTTrainer(model=model_path, args=args, train_dataset=split["train"], eval_dataset=split["test"],
                         peft_config=LoraConfig(**LORA))
    result = trainer.train()
    tokens_per_s = trainer.state.num_input_tokens_seen / result.metrics["train_runtime"]
    trainer.evaluate()  # the pipeline's final eval loss
    merged = out / "sft_merged"
    trainer.model.merge_and_unload().to(torch.float32).save_pretrained(merged)
    trainer.processing_class.save_pretrained(merged)
    return merged, tokens_per_s


def train_dpo(sft_path: Path, out: Path, steps: int, train_rows: int | None, recipe: str = "defaults",
              native: bool = False) -> Path:
    """DPO of a new LoRA on the merged SFT model; ref_model=None: TRL scores the reference with it disabled."""
    pairs = [{"prompt": with_system(r["prompt"]), "chosen": r["chosen"], "rejected": r["rejected"]}
             for r in read_jsonl(DATA / "pref_train.jsonl", train_rows)]
    extra = competent(native) if recipe == "competent" else {}
    args = DPOConfig(output_dir=str(out / "dpo_run"), **{**DPO, "max_steps": steps}, report_to="none", use_cpu=True,
                     **extra)
    trainer = DPOTrainer(model=str(sft_path), ref_model=None, args=args, train_dataset=Dataset.from_list(pairs),
                         peft_config=LoraConfig(**ALIGN_LORA))
    trainer.train()
    merged = out / "aligned_merged"
    trainer.model.merge_and_unload().to(torch.float32).save_pretrained(merged)
    trainer.processing_class.save_pretrained(merged)
    return merged


def quantize(aligned_path: Path, out: Path) -> Path:
    """torchao int8 dynamic-activation / int8-weight linears (the embedding, tied to lm_head, stays fp32)."""
    qcfg = TorchAoConfig(Int8DynamicActivationInt8WeightConfig())
    model = AutoModelForCausalLM.from_pretrained(aligned_path, dtype=torch.float32, quantization_config=qcfg)
    folder = out / "int8"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(aligned_path).save_pretrained(folder)
    return folder


def answer_logps(model, tok, heads: list[str], tails: list[str], batch_size: int) -> list[tuple[float, int]]:
    """Summed log-prob and token count of each tail given its head (right padding, one forward per batch)."""
    out = []
    for start in range(0, len(heads), batch_size):
        pairs = [(tok(h, add_special_tokens=False)["input_ids"], tok(t, add_special_tokens=False)["input_ids"])
                 for h, t in zip(heads[start:start + batch_size], tails[start:start + batch_size])]
        width = max(len(h) + len(t) for h, t in pairs)
        ids = torch.full((len(pairs), width), tok.pad_token_id)
        labels, attention = torch.full_like(ids, -100), torch.zeros_like(ids)
        for j, (h, t) in enumerate(pairs):
            ids[j, :len(h) + len(t)] = torch.tensor(h + t)
            labels[j, len(h):len(h) + len(t)] = torch.tensor(t)
            attention[j, :len(h) + len(t)] = 1  # pad = eos here, so the mask cannot be read off the ids
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=attention).logits
        logps = logits[:, :-1].float().log_softmax(-1)
        mask = labels[:, 1:] != -100
        picked = logps.gather(2, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
        out += [(float(s), int(n)) for s, n in zip(picked.sum(1), mask.sum(1))]
    return out


def score(answers: list[str], references: list[str]) -> dict[str, float]:
    """Exact match, JSON validity and per-field accuracy, as the pipeline scores them (fractions in [0, 1])."""
    def as_obj(text):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, dict) else None

    n = max(len(references), 1)
    preds, refs = [as_obj(a) for a in answers], [as_obj(r) or {} for r in references]
    fields = [p is not None and k in p and p[k] == v and type(p[k]) is type(v)
              for p, r in zip(preds, refs) for k, v in r.items()]
    return {"exact_match": sum(a.strip() == r.strip() for a, r in zip(answers, references)) / n,
            "json_validity": sum(p is not None for p in preds) / n,
            "field_accuracy": sum(fields) / max(len(fields), 1)}


def evaluate(path: Path | str, rows: list[dict], pairs: list[dict], dtype: torch.dtype, sft_pair_logps=None):
    """Greedy decoding of every held-out prompt, plus perplexity and held-out preference accuracy (as `evaluate`)."""
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.pad_token or tok.eos_token
    tok.padding_side = "left"  # generation continues from the right end of every row
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    convs = [with_system(r["messages"]) for r in rows]
    prompts = [tok.apply_chat_template(c[:-1], tokenize=False, add_generation_prompt=True) for c in convs]
    references = [c[-1]["content"] for c in convs]
    answers, new_tokens, gen_s = [""] * len(prompts), 0, 0.0
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths per batch: less padding
    for start in range(0, len(order), EVAL["batch_size"]):
        idx = order[start:start + EVAL["batch_size"]]
        enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=EVAL["max_new_tokens"], do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        gen_s += time.perf_counter() - t0
        for i, seq in zip(idx, out[:, enc["input_ids"].shape[1]:].tolist()):
            seq = seq[:seq.index(tok.eos_token_id) + 1] if tok.eos_token_id in seq else seq
            new_tokens += len(seq)
            answers[i] = tok.decode(seq, skip_special_tokens=True).strip()
    metrics = {**score(answers, references), "tokens_per_s": new_tokens / gen_s if gen_s else 0.0, "rows": len(rows)}

    n_ppl = EVAL["perplexity_rows"]
    ppl = answer_logps(model, tok, prompts[:n_ppl], [r + tok.eos_token for r in references[:n_ppl]],
                       EVAL["batch_size"])
    metrics["perplexity"] = math.exp(-sum(s for s, _ in ppl) / max(sum(n for _, n in ppl), 1))

    tok.padding_side = "right"
    heads = [tok.apply_chat_template(with_system(p["prompt"]), tokenize=False, add_generation_prompt=True)
             for p in pairs]
    logps = {}
    for side in ("chosen", "rejected"):
        full = [tok.apply_chat_template(with_system(p["prompt"]) + p[side], tokenize=False) for p in pairs]
        logps[side] = answer_logps(model, tok, heads, [f[len(h):].rstrip("\n") for f, h in zip(full, heads)],
                                   EVAL["batch_size"])
    c, r = logps["chosen"], logps["rejected"]
    metrics["preference_accuracy"] = sum(a / max(na, 1) > b / max(nb, 1) for (a, na), (b, nb) in zip(c, r)) / \
        max(len(pairs), 1)
    if sft_pair_logps:  # the aligned model's DPO reward margin against its reference, the SFT model
        rc, rr = sft_pair_logps["chosen"], sft_pair_logps["rejected"]
        metrics["reward_margin"] = sum(EVAL["beta"] * ((a - ra) - (b - rb)) for (a, _), (ra, _), (b, _), (rb, _)
                                       in zip(c, rc, r, rr)) / max(len(pairs), 1)
    return metrics, logps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / ".alignpipe" / "models" / "smollm2-135m-instruct"),
                    help="base model folder (default: the embedded SmolLM2-135M-Instruct, as built by the pipeline)")
    ap.add_argument("--tiny", action="store_true", help="use alignpipe's tiny random test model instead")
    ap.add_argument("--models-dir", default=str(ROOT / ".alignpipe" / "models"), help="where --tiny builds it")
    ap.add_argument("--sft-steps", type=int, default=SFT["max_steps"])
    ap.add_argument("--dpo-steps", type=int, default=DPO["max_steps"])
    ap.add_argument("--eval-rows", type=int, default=EVAL["rows"], help="held-out rows (and pairs) per model")
    ap.add_argument("--train-rows", type=int, default=None, help="use only the first N SFT rows and pairs")
    ap.add_argument("--recipe", choices=("defaults", "competent"), default="defaults")
    ap.add_argument("--sft-only", action="store_true",
                    help="stop after SFT (bench/sft_pairs.py: its tokens/s only; no DPO, int8 or evaluation)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "plain_trl"))
    args = ap.parse_args()
    t_start = time.perf_counter()
    if args.tiny:  # alignpipe builds the test model (and read the settings); the work below is plain TRL
        from alignpipe.config.model import TINY_MODEL
        from alignpipe.models import resolve_model

        args.model = resolve_model(TINY_MODEL, args.models_dir)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds = {}

    native = bf16_native()
    t0 = time.perf_counter()
    sft_path, sft_tokens_per_s = train_sft(args.model, out, args.sft_steps, args.train_rows, args.recipe, native)
    seconds["sft"] = time.perf_counter() - t0
    if args.sft_only:
        result = {"wall_s": time.perf_counter() - t_start, "stage_s": seconds, "recipe": args.recipe,
                  "sft_tokens_per_s": sft_tokens_per_s, "model": args.model}
        (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result))
        return
    t0 = time.perf_counter()
    aligned_path = train_dpo(sft_path, out, args.dpo_steps, args.train_rows, args.recipe, native)
    seconds["align"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    int8_path = quantize(aligned_path, out)
    seconds["quantize"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    dtype = torch.bfloat16 if native else torch.float32  # the pipeline's evaluate.precision: auto
    rows = read_jsonl(DATA / "sft_heldout.jsonl", args.eval_rows)
    caps = [n for n in (args.eval_rows, EVAL["preference_rows"]) if n]  # as `evaluate`: both cap the pairs
    pairs = read_jsonl(DATA / "pref_heldout.jsonl", min(caps) if caps else None)
    screen = EVAL["screen_rows"] if args.recipe == "competent" and EVAL["screen_rows"] else None
    few = rows[:screen] if screen else rows  # the pipeline's screen: not the verdict, fewer rows
    metrics = {}
    metrics["base"], _ = evaluate(args.model, few, pairs[:screen] if screen else pairs, dtype)
    metrics["sft"], sft_logps = evaluate(sft_path, few, pairs, dtype)  # its pairs: aligned's reference
    metrics["aligned"], _ = evaluate(aligned_path, rows, pairs, dtype, sft_pair_logps=sft_logps)
    metrics["quantized"], _ = evaluate(int8_path, few, pairs[:screen] if screen else pairs, dtype)
    seconds["evaluate"] = time.perf_counter() - t0

    result = {"wall_s": time.perf_counter() - t_start, "stage_s": seconds, "metrics": metrics,
              "recipe": args.recipe, "sft_tokens_per_s": sft_tokens_per_s,
              "model": args.model, "eval_dtype": str(dtype).removeprefix("torch."),
              "settings": {"sft_steps": args.sft_steps, "dpo_steps": args.dpo_steps, "eval_rows": args.eval_rows,
                           "train_rows": args.train_rows, "sft": SFT, "dpo": DPO, "lora": LORA,
                           "align_lora": ALIGN_LORA, "eval": EVAL}}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
