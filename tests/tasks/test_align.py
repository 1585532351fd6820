"""Tests for the align stage: the SFT reference at step 0, DPO on Ray Train, RLHF; tiny model, real TRL/Ray/MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignpipe import tracking
from alignpipe.data.formats import write_jsonl
from alignpipe.data.preference import load_preference
from alignpipe.merge import load_with_adapter, merge_adapter
from alignpipe.models import load_model, load_tokenizer
from alignpipe.preference import preference_metrics
from alignpipe.runs import file_digest
from alignpipe.config.compute import ComputeConfig
from alignpipe.kernels import select
from alignpipe.kernels.swiglu import is_swiglu_mlp, use_recomputing_swiglu
from alignpipe.tasks.align import AlignJob, build_trainer, run_align
from testlib import DEMO_DATA, run_context

SYSTEM = "Extract the contact card."


@pytest.fixture(scope="module")
def sft_adapter(tiny_model, tmp_path_factory) -> str:
    """A saved LoRA adapter standing in for the SFT stage's output (non-zero, so SFT model != base model)."""
    from peft import LoraConfig, get_peft_model

    out = tmp_path_factory.mktemp("sft") / "adapter"
    model = get_peft_model(load_model(tiny_model), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(out)
    load_tokenizer(tiny_model).save_pretrained(out)
    return str(out)


def pairs_file(tmp_path, name: str, limit: int) -> str:
    return str(write_jsonl(load_preference(str(DEMO_DATA / name), limit=limit), tmp_path / name))


def test_step0_reference_is_the_sft_model_from_its_saved_artifact(tiny_model, sft_adapter, tmp_path):
    import torch

    from alignpipe.config.align import AlignConfig

    reference = merge_adapter(tiny_model, sft_adapter, str(tmp_path / "sft_merged"))
    config = AlignJob(align=AlignConfig(precision="fp32", batch_size=4, max_steps=1), compute=ComputeConfig(),
                      reference_path=reference, preference_path=pairs_file(tmp_path, "pref_train.jsonl", 8),
                      system_prompt=SYSTEM)
    trainer, _ = build_trainer(config, str(tmp_path / "out"), [])
    assert trainer.args.activation_checkpointing is False  # the config's default, not TRL's (True: ~50% slower on CPU)
    # compute.kernels auto: the kernels measured for this CPU are on (the references below go through them)
    enabled = select("auto", use_gpu=False)
    assert bool(getattr(trainer.model.get_base_model().forward, "_alignpipe_compact", False)) == (
        "compact_lm_head" in enabled)
    assert any(map(is_swiglu_mlp, trainer.model.modules()))
    assert (use_recomputing_swiglu(trainer.model) == 0) == ("recomputing_swiglu" in enabled)
    assert trainer.model.config._attn_implementation == "eager"  # auto on CPU, max_length 256; fresh_sft: sdpa
    batch = next(iter(trainer.get_train_dataloader()))
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)

    def summed_logps(model):
        with torch.inference_mode():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        logps = torch.log_softmax(logits[:, :-1], -1).gather(2, batch["input_ids"][:, 1:, None]).squeeze(-1)
        return (logps * batch["completion_mask"][:, 1:]).sum(1).chunk(2)

    # The SFT model loaded afresh from disk (base + the saved SFT adapter), a different object from the trainer's.
    fresh_sft, _ = load_with_adapter(tiny_model, sft_adapter)
    assert fresh_sft is not trainer.model
    for ours, theirs in zip((ref_chosen, ref_rejected), summed_logps(fresh_sft.eval())):
        torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=1e-4)
    base_chosen, _ = summed_logps(load_model(tiny_model).eval())  # ...and not the raw base model
    assert (base_chosen - ref_chosen).abs().max() > 1e-2

    trainer.compute_loss(trainer.model, batch)  # step 0: the new adapter is zero, policy == reference
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert metrics["rewards/chosen"] == pytest.approx(0, abs=1e-5)
    assert metrics["rewards/rejected"] == pytest.approx(0, abs=1e-5)
    assert metrics["rewards/margins"] == pytest.approx(0, abs=1e-5)


def test_sft_loss_weight_adds_the_chosen_answers_nll_to_the_dpo_loss(tiny_model, sft_adapter, tmp_path):
    import math

    import torch

    from alignpipe.config.align import AlignConfig

    reference = merge_adapter(tiny_model, sft_adapter, str(tmp_path / "sft_merged"))
    pairs = pairs_file(tmp_path, "pref_train.jsonl", 4)

    def step0_loss(weight):
        config = AlignJob(align=AlignConfig(precision="fp32", batch_size=4, max_steps=1, sft_loss_weight=weight),
                          compute=ComputeConfig(), reference_path=reference, preference_path=pairs,
                          system_prompt=SYSTEM)
        trainer, _ = build_trainer(config, str(tmp_path / f"out{weight}"), [])
        batch = next(iter(trainer.get_train_dataloader()))
        with torch.no_grad():
            return trainer.compute_loss(trainer.model, batch).item(), batch

    plain, batch = step0_loss(0.0)
    assert plain == pytest.approx(math.log(2), abs=1e-4)  # step 0: policy == reference, sigmoid(0)
    # The chosen answers' mean token NLL under the SFT model, computed here independently of TRL.
    sft_model = load_model(reference).eval()
    with torch.no_grad():
        logits = sft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logps = torch.log_softmax(logits[:, :-1], -1).gather(2, batch["input_ids"][:, 1:, None]).squeeze(-1)
    chosen_logps, _ = logps.chunk(2)
    chosen_mask, _ = batch["completion_mask"][:, 1:].chunk(2)
    nll = -chosen_logps[chosen_mask.bool()].mean().item()
    assert nll > 0.1
    assert step0_loss(0.5)[0] == pytest.approx(math.log(2) + 0.5 * nll, rel=1e-3)


@pytest.mark.parametrize("method", ["orpo", "kto"])
def test_orpo_and_kto_train_a_new_adapter_on_the_sft_model(method, tiny_model, sft_adapter, tmp_path):
    from alignpipe.config.align import AlignConfig

    reference = merge_adapter(tiny_model, sft_adapter, str(tmp_path / "sft_merged"))
    config = AlignJob(align=AlignConfig(method=method, precision="fp32", batch_size=4, max_steps=2, learning_rate=1e-2,
                                        logging_steps=1), compute=ComputeConfig(),
                      reference_path=reference, preference_path=pairs_file(tmp_path, "pref_train.jsonl", 4),
                      system_prompt=SYSTEM)
    trainer, _ = build_trainer(config, str(tmp_path / "out"), [])
    assert len(trainer.train_dataset) == (8 if method == "kto" else 4)  # kto: one desirable + one undesirable row
    trainer.train()
    logged = {k for h in trainer.state.log_history for k in h}
    assert trainer.state.global_step == 2 and "loss" in logged
    trainer.save_model(str(tmp_path / "adapter"))
    load_with_adapter(reference, str(tmp_path / "adapter"))  # a LoRA adapter on the merged SFT model


@pytest.mark.parametrize("optimizer", ["rloo", "grpo"])
def test_policy_optimisers_step_against_a_reward_model(optimizer, tiny_model, sft_adapter, tmp_path):
    from alignpipe.config.align import AlignConfig
    from alignpipe.tasks.align import _scorer, build_policy_trainer, policy_reward

    reference = merge_adapter(tiny_model, sft_adapter, str(tmp_path / "sft_merged"))
    align = AlignConfig(method="rlhf", precision="fp32", batch_size=4, logging_steps=1)
    align.rlhf.policy_optimizer, align.rlhf.policy_steps, align.rlhf.max_new_tokens = optimizer, 1, 4
    config = AlignJob(align=align, compute=ComputeConfig(), reference_path=reference, system_prompt=SYSTEM,
                      preference_path=pairs_file(tmp_path, "pref_train.jsonl", 4))
    reward_model = _scorer(reference, "float32", load_tokenizer(reference)).eval()
    trainer, _ = build_policy_trainer(config, reward_model, str(tmp_path / "out"), [])
    assert type(trainer).__name__ == {"rloo": "RLOOTrainer", "grpo": "GRPOTrainer"}[optimizer]
    assert len(trainer.eval_dataset) == 4  # the fixed prompts of policy/reward_start and _end (all 4 here)
    start = policy_reward(trainer, seed=0)
    assert start == policy_reward(trainer, seed=0)  # same prompts, same seed, same policy: the same answers
    trainer.train()
    assert trainer.state.global_step == 1
    assert any("reward" in h for h in trainer.state.log_history)  # the policy's mean reward, per step
    assert isinstance(policy_reward(trainer, seed=0), float)


def test_a_reward_adapter_to_reuse_must_hold_a_reward_model(smoke_cfg, tiny_model, tmp_path):
    from alignpipe.errors import ConfigError
    from alignpipe.tasks.align import reward_adapter_dir

    smoke_cfg.align.method = "rlhf"
    ctx = run_context(smoke_cfg, tiny_model)
    assert reward_adapter_dir(smoke_cfg, ctx, "k").endswith("/align/k/reward_adapter")  # trained here, kept here
    smoke_cfg.align.rlhf.reward_adapter = str(tmp_path / "not-a-reward-model")
    (tmp_path / "not-a-reward-model").mkdir()
    with pytest.raises(ConfigError, match=r"align.rlhf.reward_adapter=.*holds no trained reward model"):
        reward_adapter_dir(smoke_cfg, ctx, "k")


def align_cfg(smoke_cfg, tmp_path, **align):
    smoke_cfg.data.preference.path = pairs_file(tmp_path, "pref_train.jsonl", 64)
    smoke_cfg.data.preference.limit = None
    for key, value in {"precision": "fp32", "batch_size": 8, "logging_steps": 2, **align}.items():
        setattr(smoke_cfg.align, key, value)
    return smoke_cfg


@pytest.mark.slow
def test_dpo_raises_heldout_preference_accuracy(smoke_cfg, ray_local, tiny_model, sft_adapter, tmp_path):
    cfg = align_cfg(smoke_cfg, tmp_path, method="dpo", max_steps=8, batch_size=4, learning_rate=2e-2, save_steps=4)
    ctx = run_context(cfg, tiny_model)
    out = run_align(cfg, ctx, sft_adapter, cfg.data.preference.path, file_digest(cfg.data.preference.path))

    held = load_preference(str(DEMO_DATA / "pref_heldout.jsonl"), limit=48)
    tokenizer = load_tokenizer(out.base_path)
    sft_model = load_model(out.base_path).eval()
    aligned, _ = load_with_adapter(out.base_path, out.adapter_dir)
    before = preference_metrics(sft_model, tokenizer, held, SYSTEM, cfg.align.beta)
    after = preference_metrics(aligned.eval(), tokenizer, held, SYSTEM, cfg.align.beta, reference=sft_model)
    assert after["preference_accuracy"] > before["preference_accuracy"] + 0.15, (before, after)
    assert after["reward_margin"] > 0

    client = tracking.client_for(ctx.tracking_uri)
    run = client.get_run(out.mlflow_run_id)
    assert run.data.tags["mlflow.parentRunId"] == ctx.parent_run_id and run.data.tags[tracking.TAG_STAGE] == "align"
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(run.data.metrics)
    margins = [m.value for m in client.get_metric_history(out.mlflow_run_id, "rewards/margins")]
    assert len(margins) >= 3 and margins[-1] > margins[0]
    assert "adapter/adapter_model.safetensors" in {a.path for a in client.list_artifacts(out.mlflow_run_id, "adapter")}
    assert "plots/align_curves.png" in {a.path for a in client.list_artifacts(out.mlflow_run_id, "plots")}
    assert out.metrics["global_step"] == 8

    again = run_align(cfg, ctx, sft_adapter, cfg.data.preference.path, file_digest(cfg.data.preference.path))
    assert again.content_key == out.content_key and again.metrics == out.metrics  # reused, not retrained


@pytest.mark.slow
def test_rlhf_completes_and_logs_reward_model_accuracy(smoke_cfg, ray_local, tiny_model, sft_adapter, tmp_path):
    cfg = align_cfg(smoke_cfg, tmp_path, method="rlhf", max_steps=-1)
    cfg.align.rlhf.reward_steps, cfg.align.rlhf.policy_steps, cfg.align.rlhf.max_new_tokens = 4, 2, 8
    cfg.align.batch_size = 4
    ctx = run_context(cfg, tiny_model)
    held = pairs_file(tmp_path, "pref_heldout.jsonl", 16)
    out = run_align(cfg, ctx, sft_adapter, cfg.data.preference.path, file_digest(cfg.data.preference.path), held)

    assert 0.0 <= out.metrics["reward_model/accuracy"] <= 1.0
    assert out.metrics["reward_model/eval_pairs"] == 16
    assert {"policy/reward_start", "policy/reward_end"} <= set(out.metrics)
    run = tracking.client_for(ctx.tracking_uri).get_run(out.mlflow_run_id)
    assert {"reward_model/accuracy", "reward_model/loss", "reward"} <= set(run.data.metrics)  # streamed curves
    assert run.data.metrics["reward_model/eval_accuracy"] == out.metrics["reward_model/accuracy"]  # held-out
    assert run.data.metrics["final/policy/reward_end"] == out.metrics["policy/reward_end"]
    _, tokenizer = load_with_adapter(out.base_path, out.adapter_dir)  # the policy adapter loads on the SFT model

    # Another policy seed against the same reward model: reused, not trained again.
    reward = Path(ctx.stage_uri("align", out.content_key, "reward_adapter"))
    cfg.align.seed, cfg.align.rlhf.reward_adapter = 1, str(reward)
    cfg.align.rlhf.policy_steps, cfg.align.rlhf.eval_prompts = 1, 0  # the reward model is what is checked here
    other = run_align(cfg, ctx, sft_adapter, cfg.data.preference.path, file_digest(cfg.data.preference.path), held)
    assert other.content_key != out.content_key
    assert other.metrics["reward_model/accuracy"] == out.metrics["reward_model/accuracy"]
    assert tracking.metric_history(ctx.tracking_uri, other.mlflow_run_id, "reward_model/loss") == []
    copied = Path(ctx.stage_uri("align", other.content_key, "reward_adapter")) / "adapter_model.safetensors"
    assert copied.read_bytes() == (reward / "adapter_model.safetensors").read_bytes()
