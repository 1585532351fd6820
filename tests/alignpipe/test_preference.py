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
