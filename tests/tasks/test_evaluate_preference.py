"""evaluate_model adds held-out preference metrics when it is given preference pairs (and a reference)."""

import pytest

from alignpipe.data.formats import write_jsonl
from alignpipe.data.preference import load_preference
from alignpipe.tasks.evaluate import EvalJob, ModelSpec, evaluate_model
from testlib import DEMO_DATA, canonical_split


def test_preference_accuracy_and_reward_margin(smoke_cfg, tiny_model, tmp_path):
    eval_path, _ = canonical_split(smoke_cfg, "eval", tmp_path)
    pairs = write_jsonl(load_preference(str(DEMO_DATA / "pref_heldout.jsonl"), limit=8), tmp_path / "pairs.jsonl")
    job = EvalJob(evaluate=smoke_cfg.evaluate.model_copy(update={"limit": 4}), json_targets=True, dtype="float32",
                  system_prompt=smoke_cfg.model.system_prompt, preference_eval_path=str(pairs), beta=0.1)
    spec = ModelSpec(label="aligned", base_path=tiny_model, reference_path=tiny_model)
    metrics = evaluate_model(spec, eval_path, job)["metrics"]
    assert 0.0 <= metrics["preference_accuracy"] <= 1.0
    assert metrics["reward_margin"] == pytest.approx(0.0, abs=1e-6)  # the model is its own reference
    assert metrics["preference_pairs"] == 4                            # `limit` caps the pairs as well as the rows

    capped = evaluate_model(spec, eval_path, job.model_copy(
        update={"evaluate": job.evaluate.model_copy(update={"limit": None, "preference_rows": 3})}))
    assert capped["metrics"]["preference_pairs"] == 3 and len(capped["pair_logps"]["chosen"]) == 3
    assert capped["metrics"]["rows"] == 16                            # the generations are not capped by it
    screened = evaluate_model(spec, eval_path, job.model_copy(update={"evaluate": job.evaluate.model_copy(
        update={"limit": None})}), rows_cap=5, pairs_cap=2)             # a screened artifact nobody reuses
    assert (screened["metrics"]["rows"], screened["metrics"]["preference_pairs"]) == (5, 2)

    plain = evaluate_model(spec.model_copy(update={"reference_path": None}), eval_path,
                           job.model_copy(update={"preference_eval_path": None}))
    assert "preference_accuracy" not in plain["metrics"] and "reward_margin" not in plain["metrics"]


def test_reference_log_probs_from_an_earlier_artifact_give_the_same_margin(smoke_cfg, tiny_model, tmp_path):
    """The suite scores the sft artifact before aligned; aligned reuses those log-probs as its reference's."""
    from peft import LoraConfig, get_peft_model

    from alignpipe.models import load_model, load_tokenizer

    adapter = tmp_path / "adapter"  # non-zero LoRA: the policy differs from its reference
    get_peft_model(load_model(tiny_model), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)) \
        .save_pretrained(adapter)
    load_tokenizer(tiny_model).save_pretrained(adapter)
    eval_path, _ = canonical_split(smoke_cfg, "eval", tmp_path)
    pairs = write_jsonl(load_preference(str(DEMO_DATA / "pref_heldout.jsonl"), limit=6), tmp_path / "pairs.jsonl")
    job = EvalJob(evaluate=smoke_cfg.evaluate.model_copy(update={"limit": 2}), json_targets=True, dtype="float32",
                  system_prompt=smoke_cfg.model.system_prompt, preference_eval_path=str(pairs), beta=0.1)
    reference = evaluate_model(ModelSpec(label="sft", base_path=tiny_model), eval_path, job)
    policy = ModelSpec(label="aligned", base_path=tiny_model, adapter_dir=str(adapter), reference_path=tiny_model)
    loaded = evaluate_model(policy, eval_path, job)["metrics"]
    reused = evaluate_model(policy.model_copy(update={"reference_path": "/nonexistent"}), eval_path, job,
                            reference["pair_logps"])["metrics"]
    assert loaded["reward_margin"] != 0.0   # the adapter moved the policy away from its reference
    assert reused["reward_margin"] == pytest.approx(loaded["reward_margin"], abs=1e-6)
    assert reused["reward_accuracy"] == loaded["reward_accuracy"]
