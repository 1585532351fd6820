"""One artifact's evaluation, inside its own Ray task: batched greedy decoding, scores, perplexity, preference
log-probs, speed and peak memory. The driver side (`tasks.evaluate`) puts the artifacts side by side.
"""

from __future__ import annotations

import json
import math
import resource
import time
from typing import Any

from alignpipe import chat, int8_cpu, models, ray_runner
from alignpipe.data.formats import load_canonical
from alignpipe.merge import load_with_adapter


def score(predictions: list[str], references: list[str], json_targets: bool) -> dict[str, float]:
    """Exact match always; JSON validity and per-field accuracy when answers are JSON objects."""
    n = max(len(references), 1)
    out = {"exact_match": sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / n}
    if not json_targets:
        return out
    parsed = [_as_object(p) for p in predictions]
    out["json_validity"] = sum(p is not None for p in parsed) / n
    hits: dict[str, list[bool]] = {}
    for pred, ref in zip(parsed, references):
        for key, value in (_as_object(ref) or {}).items():
            hits.setdefault(key, []).append(pred is not None and key in pred and pred[key] == value
                                            and type(pred[key]) is type(value))
    for key, values in hits.items():
        out[f"field_accuracy/{key}"] = sum(values) / len(values)
    if hits:
        out["field_accuracy"] = sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values())
    return out


def evaluate_model(spec: dict, eval_path: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Load one model, generate greedily for every held-out prompt, score it. Runs inside a Ray task."""
    ray_runner.set_worker_threads(settings["threads"])
    if spec.get("quantized_dir"):  # a saved quantized folder: transformers rebuilds it from its quantization_config
        fused = settings.get("int8_cpu_kernel") == "fbgemm" and int8_cpu.is_int8_dynamic(spec["quantized_dir"])
        model = models.load_model(spec["quantized_dir"], dtype="float32" if fused else settings["dtype"])
        tokenizer = models.load_tokenizer(spec["quantized_dir"])
        if fused:
            int8_cpu.use_fbgemm_linears(model, settings.get("int8_per_token_modules", int8_cpu.PER_TOKEN_MODULES))
    elif spec["adapter_dir"]:  # merged in memory where possible: same outputs, faster decoding
        model, tokenizer = load_with_adapter(spec["base_path"], spec["adapter_dir"], settings["dtype"])
    else:
        model, tokenizer = models.load_model(spec["base_path"], dtype=settings["dtype"]), \
            models.load_tokenizer(spec["base_path"])
    tokenizer.padding_side = "left"
    model.eval()
    rows = load_canonical(eval_path)[: settings["limit"]]
    convs = [chat.split_prompt_answer(chat.with_system(r["messages"], settings["system_prompt"])) for r in rows]
    prompts = [chat.render(tokenizer, msgs, add_generation_prompt=True) for msgs, _ in convs]
    references = [ref for _, ref in convs]

    predictions, logprobs, gen_tokens, gen_time, latencies = _generate(model, tokenizer, prompts, settings)
    metrics = score(predictions, references, settings["json_targets"])
    n_ppl = settings["perplexity_rows"] or len(prompts)
    metrics["perplexity"] = _perplexity(model, tokenizer, prompts[:n_ppl], references[:n_ppl], settings["batch_size"])
    metrics["tokens_per_s"] = gen_tokens / gen_time if gen_time else 0.0
    metrics["latency_p50_ms"] = _percentile(latencies, 0.50) * 1000
    metrics["latency_p95_ms"] = _percentile(latencies, 0.95) * 1000
    metrics["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    metrics["size_mb"] = size_on_disk(spec) / 1e6
    metrics["rows"] = len(rows)
    pair_logps = None
    if settings.get("preference_eval_path"):
        preference, pair_logps = _preference_metrics(model, tokenizer, spec, settings)
        metrics.update(preference)
    return {"label": spec["label"], "metrics": metrics, "pair_logps": pair_logps,
            "predictions": [{"prompt": p, "reference": r, "prediction": y, "mean_logprob": lp,
                             "correct": y.strip() == r.strip()}
                            for (p, _), r, y, lp in zip(convs, references, predictions, logprobs)]}


def size_on_disk(spec: dict) -> int:
    """Bytes of the weights an artifact is served from: the quantized folder, or base (+ adapter) weights."""
    from pathlib import Path

    folders = [spec["quantized_dir"]] if spec.get("quantized_dir") else [spec["base_path"], spec["adapter_dir"]]
    return sum(f.stat().st_size for d in folders if d and Path(d).is_dir()
               for f in Path(d).iterdir() if f.suffix in (".safetensors", ".bin"))


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: every value reported was observed)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _preference_metrics(model, tokenizer, spec: dict, settings: dict[str, Any]):
    """Held-out preference accuracy; with a reference, also the mean DPO reward margin against it.

    The reference's log-probs come from `settings["reference_logps"]` when the suite already scored that model
    (the sft artifact, for aligned), else from `spec["reference_path"]` loaded here. Returns (metrics, the
    policy's own pair log-probs, for a later artifact that uses this one as its reference).
    """
    from alignpipe.preference import metrics_from_logps, pair_logps

    caps = [n for n in (settings["limit"], settings.get("preference_rows")) if n]
    pairs = load_canonical(settings["preference_eval_path"])[: min(caps) if caps else None]
    policy = pair_logps(model, tokenizer, pairs, settings["system_prompt"], settings["batch_size"])
    reference = settings.get("reference_logps")
    if reference is None and spec.get("reference_path"):
        ref_model = models.load_model(spec["reference_path"], dtype=settings["dtype"]).eval()
        reference = pair_logps(ref_model, tokenizer, pairs, settings["system_prompt"], settings["batch_size"])
        del ref_model
    return {**metrics_from_logps(policy, settings["beta"], reference), "preference_pairs": len(pairs)}, policy


def _generate(model, tokenizer, prompts: list[str], settings: dict[str, Any]):
    """Batched greedy decoding with the KV cache; prompts sorted by length so batches pad little.

    Returns answers, each answer's mean token log-prob (its own confidence: the cascade's signal), generated
    tokens, decoding time, and one latency per request: the wall time of the batch that served it.
    """
    import torch

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    logprobs: list[float] = [0.0] * len(prompts)
    total_tokens, total_time, latencies = 0, 0.0, []
    eos = tokenizer.eos_token_id
    bs = settings["batch_size"]
    for start in range(0, len(order), bs):
        idx = order[start : start + bs]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=settings["max_new_tokens"], do_sample=False,
                                 eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, use_cache=True,
                                 output_logits=True, return_dict_in_generate=True)
        elapsed = time.perf_counter() - t0
        total_time += elapsed
        latencies += [elapsed] * len(idx)
        new = out.sequences[:, enc["input_ids"].shape[1] :]
        # log-prob of each chosen token under the raw (unprocessed) logits, one step at a time (small peak RSS)
        chosen = torch.stack([step.float().log_softmax(-1).gather(-1, new[:, j, None]).squeeze(-1)
                              for j, step in enumerate(out.logits)], dim=1)
        for row, lp, i in zip(new, chosen, idx):
            ids = row.tolist()
            n = ids.index(eos) + 1 if eos in ids else len(ids)
            total_tokens += n
            answers[i] = tokenizer.decode(ids[:n], skip_special_tokens=True).strip()
            logprobs[i] = lp[:n].mean().item() if n else float("-inf")
    return answers, logprobs, total_tokens, total_time, latencies


def _perplexity(model, tokenizer, prompts: list[str], references: list[str], batch_size: int) -> float:
    """exp(mean negative log-likelihood) of the reference answers (and end-of-turn) given their prompts.

    Left padding puts every answer at the end of its row, so only the last positions need vocabulary logits.
    """
    import torch

    end = tokenizer.eos_token or ""
    nll, count = 0.0, 0
    for start in range(0, len(prompts), batch_size):
        ps, rs = prompts[start : start + batch_size], references[start : start + batch_size]
        answers = [len(tokenizer(r + end, add_special_tokens=False)["input_ids"]) for r in rs]
        enc = tokenizer([p + r + end for p, r in zip(ps, rs)], return_tensors="pt", padding=True,
                        add_special_tokens=False)
        keep = max(answers) + 1
        labels = enc["input_ids"][:, -keep:].clone()
        for j, n in enumerate(answers):
            labels[j, : keep - n] = -100
        with torch.inference_mode():
            logits = model(**enc, logits_to_keep=keep).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100,
                                                 reduction="sum")
        nll += loss.item()
        count += int((labels[:, 1:] != -100).sum())
    return math.exp(nll / count) if count else float("nan")


def _as_object(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None
    return value if isinstance(value, dict) else None
