"""evaluate_model adds held-out preference metrics when it is given preference pairs (and a reference)."""

import pytest

from alignpipe.data.formats import write_jsonl
from alignpipe.data.preference import load_preference
from tasks.evaluate import evaluate_model
from testlib import DEMO_DATA, canonical_split


def test_preference_accuracy_and_reward_margin(smoke_cfg, tiny_model, tmp_path):
    eval_path, _ = canonical_split(smoke_cfg, "eval", tmp_path)
    pairs = write_jsonl(load_preference(str(DEMO_DATA / "pref_heldout.jsonl"), limit=8), tmp_path / "pairs.jsonl")
    settings = {**smoke_cfg.evaluate.model_dump(), "limit": 4, "threads": 1, "json_targets": True, "dtype": "float32",
                "system_prompt": smoke_cfg.model.system_prompt, "preference_eval_path": str(pairs), "beta": 0.1}
    spec = {"label": "aligned", "base_path": tiny_model, "adapter_dir": None, "reference_path": tiny_model}
    metrics = evaluate_model(spec, eval_path, settings)["metrics"]
    assert 0.0 <= metrics["preference_accuracy"] <= 1.0
    assert metrics["reward_margin"] == pytest.approx(0.0, abs=1e-6)  # the model is its own reference

    plain = evaluate_model({**spec, "reference_path": None}, eval_path, {**settings, "preference_eval_path": None})
    assert "preference_accuracy" not in plain["metrics"] and "reward_margin" not in plain["metrics"]
