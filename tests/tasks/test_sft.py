"""SFT on Ray Train with the tiny model: the loss goes down, curves and adapter reach MLflow, reruns resume."""

from pathlib import Path

import pytest

from alignpipe import tracking
from alignpipe.runs import file_digest
from alignpipe.tasks.sft import cache_key, run_sft
from alignpipe.tasks.validate import check_source
from testlib import canonical_split, run_context


def _cfg(smoke_cfg):
    cfg = smoke_cfg
    cfg.data.sft.limit = 16          # a small set the tiny model can start to memorise
    cfg.sft.max_steps = 12
    cfg.sft.batch_size = 4
    cfg.sft.learning_rate = 5e-2
    cfg.sft.eval_fraction = 0.0
    cfg.sft.warmup_ratio = 0.0
    cfg.sft.lr_scheduler = "constant"
    cfg.sft.save_steps = 4
    return cfg


@pytest.mark.slow  # tens of seconds: handed out early (tests/conftest.py)
def test_sft_lowers_loss_and_logs_everything(smoke_cfg, tiny_model, ray_local, tmp_path, capfd):
    cfg = _cfg(smoke_cfg)
    ctx = run_context(cfg, tiny_model)
    check_source("sft", cfg.data.sft, cfg, tiny_model, tmp_path)  # validate's Parquet shards, as the flow hands over
    train_path, digest = str(tmp_path / "sft"), file_digest(cfg.data.sft.path)
    out = run_sft(cfg, ctx, train_path, digest)
    # the in-process Ray has no state API: its placement-group cleaner's failing checks stay off the console
    assert "PlacementGroupCleaner" not in capfd.readouterr().err

    client = tracking.client_for(ctx.tracking_uri)
    run = client.get_run(out.mlflow_run_id)
    assert run.data.tags["mlflow.parentRunId"] == ctx.parent_run_id
    assert run.data.tags[tracking.TAG_CONTENT_KEY] == out.content_key
    assert run.info.status == "FINISHED"
    losses = [v for _, v in sorted(tracking.metric_history(ctx.tracking_uri, out.mlflow_run_id, "loss"))]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    for key in ("learning_rate", "grad_norm", "tokens_per_s", "trainable_params", "trainable_share"):
        assert key in run.data.metrics, key
    assert 0 < run.data.metrics["trainable_share"] < 1
    artifacts = {a.path for a in client.list_artifacts(out.mlflow_run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in artifacts
    assert "plots/loss_curve.png" in {a.path for a in client.list_artifacts(out.mlflow_run_id, "plots")}
    assert (Path(out.adapter_dir) / "adapter_config.json").is_file()
    assert out.metrics["global_step"] == 12
    # tokens/s over the run: the Trainer's count of non-padding tokens (TRL's num_tokens agrees) over its runtime
    tokens = dict(tracking.metric_history(ctx.tracking_uri, out.mlflow_run_id, "num_tokens"))
    assert out.metrics["train_tokens"] == tokens[12] > 0
    assert out.metrics["train_tokens_per_s"] == pytest.approx(out.metrics["train_tokens"] / out.metrics["train_runtime_s"])
    assert run.data.metrics["final/train_tokens_per_s"] == pytest.approx(out.metrics["train_tokens_per_s"])

    # The same work again: Ray Train finds the finished run under the same name and storage; no retraining.
    again = run_sft(cfg, ctx, train_path, digest)
    assert again.content_key == out.content_key and again.metrics == out.metrics
    assert tracking.metric_history(ctx.tracking_uri, again.mlflow_run_id, "loss") == []
    # the key follows the shards the workers read, not only the source file
    (tmp_path / "sft" / "part-00000.parquet").write_bytes(b"changed")
    assert cache_key(cfg, ctx, train_path, digest) != out.content_key


@pytest.mark.slow
def test_zero_steps_gives_an_untrained_adapter(smoke_cfg, tiny_model, ray_local, tmp_path):
    cfg = _cfg(smoke_cfg)
    cfg.sft.max_steps = 0
    ctx = run_context(cfg, tiny_model)
    out = run_sft(cfg, ctx, *canonical_split(cfg, "sft", tmp_path))
    assert "global_step" not in out.metrics
    assert (Path(out.adapter_dir) / "adapter_model.safetensors").is_file()


def test_final_eval_loss_reuses_the_last_step_eval_and_matches_a_fresh_one(smoke_cfg, tiny_model, tmp_path):
    """The Trainer already evaluated the final weights at the last step: no second pass, the same number."""
    from transformers import TrainerCallback

    from alignpipe.tasks.sft import build_trainer, final_eval_loss, job_for

    cfg = _cfg(smoke_cfg)
    cfg.sft.eval_fraction, cfg.sft.eval_steps, cfg.sft.max_steps = 0.25, 4, 6   # evals at steps 4 and 6 (the end)
    train_path, _ = canonical_split(cfg, "sft", tmp_path)

    class CountEvals(TrainerCallback):
        def __init__(self):
            self.calls = 0

        def on_evaluate(self, args, state, control, **kwargs):
            self.calls += 1

    evals = CountEvals()
    trainer, _ = build_trainer(job_for(cfg, tiny_model, train_path), str(tmp_path / "out"), [evals],
                               log_progress=False)
    trainer.train()
    assert evals.calls == 2
    loss = final_eval_loss(trainer)
    assert evals.calls == 2                                        # reused, not recomputed
    assert loss == trainer.evaluate()["eval_loss"]                 # and it is what a fresh pass gives


def test_checkpointing_and_attention_settings_reach_the_trainer_without_a_deprecation_warning(smoke_cfg, tiny_model,
                                                                                             tmp_path):
    """`sft.gradient_checkpointing` is what the Trainer uses (TRL's own default is on) and is passed under
    transformers 5's name, so no worker prints the old name's FutureWarning; `sft.attention` picks the kernel."""
    import warnings

    from alignpipe.kernels import select
    from alignpipe.kernels.swiglu import is_swiglu_mlp, use_recomputing_swiglu
    from alignpipe.tasks.sft import build_trainer, job_for

    cfg = _cfg(smoke_cfg)
    train_path, _ = canonical_split(cfg, "sft", tmp_path)
    for wanted, attention in ((False, "auto"), (True, "sdpa")):
        cfg.sft.gradient_checkpointing, cfg.sft.attention = wanted, attention
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer, _ = build_trainer(job_for(cfg, tiny_model, train_path), str(tmp_path / f"out{wanted}"), [],
                                       log_progress=False)
        assert trainer.args.activation_checkpointing is wanted and trainer.args.gradient_checkpointing is wanted
        # compute.kernels auto: the kernels measured for this CPU are on (a second swap call finds no MLP left)
        enabled = select("auto", use_gpu=False)
        assert bool(getattr(trainer.model.get_base_model().forward, "_alignpipe_compact", False)) == (
            "compact_lm_head" in enabled)
        assert any(map(is_swiglu_mlp, trainer.model.modules()))
        assert (use_recomputing_swiglu(trainer.model) == 0) == ("recomputing_swiglu" in enabled)
        # auto: eager attention on CPU for the smoke rows (all far below 256 tokens); an explicit choice wins
        assert trainer.model.config._attn_implementation == ("eager" if attention == "auto" else attention)
        assert not [w for w in caught if "`gradient_checkpointing` is deprecated" in str(w.message)]


def test_eval_slice_is_capped_by_eval_max_rows(tiny_model):
    """eval_fraction of a large dataset would put thousands of rows through every eval: eval_max_rows caps it."""
    from alignpipe.data.formats import load_sft
    from alignpipe.models import load_tokenizer
    from alignpipe.tasks.sft import build_datasets
    from testlib import DEMO_DATA

    tok, rows = load_tokenizer(tiny_model), load_sft(str(DEMO_DATA / "sft_train.jsonl"), limit=40)
    train, held = build_datasets(tok, rows, None, 256, 0.25, seed=0, eval_max_rows=3)
    assert (len(train), len(held)) == (37, 3)
    train, held = build_datasets(tok, rows, None, 256, 0.25, seed=0, eval_max_rows=200)
    assert (len(train), len(held)) == (30, 10)  # under the cap: eval_fraction alone, as before
