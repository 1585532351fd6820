"""Preference metrics: length-normalised accuracy and the DPO reward margin against a reference."""

import pytest

from alignpipe.data.preference import load_preference
from alignpipe.models import load_model, load_tokenizer
from alignpipe.preference import answer_logps, preference_metrics
from testlib import DEMO_DATA


def test_accuracy_is_length_normalised_and_margin_is_zero_against_itself(tiny_model):
    model, tok = load_model(tiny_model).eval(), load_tokenizer(tiny_model)
    prompt = [{"role": "user", "content": "Ana Lima is 34 and lives in Porto."}]
    card = '{"name": "Ana Lima", "age": 34, "city": "Porto"}'
    # Long chosen vs short rejected answers: summed log-probs would always prefer the short one.
    pairs = [{"prompt": prompt, "chosen": [{"role": "assistant", "content": card + " " + card * k}],
              "rejected": [{"role": "assistant", "content": "{}"}]} for k in range(1, 7)]
    chosen = answer_logps(model, tok, [p["prompt"] for p in pairs], [p["chosen"] for p in pairs], batch_size=4)
    rejected = answer_logps(model, tok, [p["prompt"] for p in pairs], [p["rejected"] for p in pairs], batch_size=4)
    assert all(nc > nr for (_, nc), (_, nr) in zip(chosen, rejected))
    assert sum(c > r for (c, _), (r, _) in zip(chosen, rejected)) == 0  # the sum-based share would be 0

    out = preference_metrics(model, tok, pairs, None, beta=0.1, reference=model, batch_size=4)
    by_mean = sum(c / nc > r / nr for (c, nc), (r, nr) in zip(chosen, rejected)) / len(pairs)
    assert out["preference_accuracy"] == pytest.approx(by_mean)
    assert out["reward_margin"] == pytest.approx(0.0, abs=1e-6) and out["reward_accuracy"] == 0.0


def test_batching_and_padding_do_not_change_log_probs(tiny_model):
    model, tok = load_model(tiny_model).eval(), load_tokenizer(tiny_model)
    pairs = load_preference(str(DEMO_DATA / "pref_heldout.jsonl"), limit=5)
    prompts, answers = [p["prompt"] for p in pairs], [p["rejected"] for p in pairs]
    one_by_one = answer_logps(model, tok, prompts, answers, batch_size=1)
    batched = answer_logps(model, tok, prompts, answers, batch_size=5)
    assert [n for _, n in one_by_one] == [n for _, n in batched]
    assert [s for s, _ in batched] == pytest.approx([s for s, _ in one_by_one], abs=1e-3)
    assert "reward_margin" not in preference_metrics(model, tok, pairs, "Extract.", beta=0.1)


def test_answer_logps_match_a_full_logits_forward_and_keep_the_callers_order(tiny_model):
    """Only the answer positions get vocabulary logits, and rows are batched by prompt length: neither may change
    a value or its order. The check is an unbatched forward over every position, summed by hand."""
    import torch

    from alignpipe import chat

    model, tok = load_model(tiny_model).eval(), load_tokenizer(tiny_model)
    pairs = load_preference(str(DEMO_DATA / "pref_heldout.jsonl"), limit=7)
    prompts = [chat.with_system(p["prompt"], "Extract.") for p in pairs]
    got = answer_logps(model, tok, prompts, [p["chosen"] for p in pairs], batch_size=3)
    for (total, n), prompt, pair in zip(got, prompts, pairs):
        head = chat.render(tok, prompt, add_generation_prompt=True)
        tail = chat.render(tok, prompt + pair["chosen"])[len(head):].rstrip("\n")
        p_ids, a_ids = tok(head, add_special_tokens=False)["input_ids"], tok(tail, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logps = model(input_ids=torch.tensor([p_ids + a_ids])).logits[0].float().log_softmax(-1)
        expected = sum(logps[len(p_ids) - 1 + k, t].item() for k, t in enumerate(a_ids))
        assert n == len(a_ids) and total == pytest.approx(expected, abs=1e-3)
