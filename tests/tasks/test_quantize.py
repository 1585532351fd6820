"""Quantize: int8 shrinks the linear layers, the saved folders load in a fresh process, GPU-only methods fail early."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from alignpipe import tracking
from alignpipe.config import preflight
from alignpipe.errors import AlignpipeError, ConfigError
from alignpipe.tasks.quantize import run_quantize
from testlib import run_context

# Runs in a fresh interpreter with transformers (+ torchao, registered by transformers) only: no alignpipe, no peft.
LOAD_AND_GENERATE = textwrap.dedent("""
    import json, sys
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = sys.argv[1]
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    text = tok.apply_chat_template([{"role": "user", "content": "Ana Lima, 34, Porto"}], tokenize=False,
                                   add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=5, do_sample=False)
    print(json.dumps({"new_tokens": out.shape[1] - enc["input_ids"].shape[1], "eos": model.generation_config.eos_token_id,
                      "tok_eos": tok.eos_token, "weight": type(model.model.layers[0].mlp.up_proj.weight).__name__,
                      "alignpipe": "alignpipe" in sys.modules, "peft": "peft" in sys.modules}))
""")


def load_in_fresh_process(folder: str) -> dict:
    done = subprocess.run([sys.executable, "-c", LOAD_AND_GENERATE, folder], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def adapter(tiny_model, tmp_path):
    """A LoRA adapter with non-zero B, so merging really changes the weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    return str(tmp_path / "adapter")


@pytest.mark.slow  # tens of seconds: handed out early (tests/conftest.py)
def test_int8_shrinks_linear_layers_and_loads_in_a_fresh_process(smoke_cfg, tiny_model, adapter, ray_local):
    smoke_cfg.quantize.method = "int8_dynamic"
    ctx = run_context(smoke_cfg, tiny_model)
    out = run_quantize(smoke_cfg, ctx, tiny_model, adapter, "test")

    assert out.linear_ratio <= 0.30, out
    assert out.linear_fp32_bytes > 0 and out.size_bytes < out.fp32_size_bytes
    q = load_in_fresh_process(out.model_dir)
    assert q["new_tokens"] >= 1 and q["weight"] == "Int8Tensor" and not q["alignpipe"] and not q["peft"]
    # The merged export is a plain model: transformers alone, the right end-of-turn token, the chat template.
    m = load_in_fresh_process(out.merged_dir)
    assert m["weight"] == "Parameter" and m["tok_eos"] == "<|im_end|>"
    from transformers import AutoTokenizer

    assert m["eos"] == AutoTokenizer.from_pretrained(out.merged_dir).eos_token_id

    # evaluate's CPU runtime: the same stored int8 weights in PyTorch's fused kernel stay as close to the fp32
    # model as torchao's own path does (they differ only in how activations are quantized)
    import torch
    from transformers import AutoModelForCausalLM

    from alignpipe.kernels.int8_cpu import PER_TOKEN_INT8_FLAGS, is_int8_dynamic, use_fbgemm_linears

    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (2, 12))
    with torch.inference_mode():
        full = AutoModelForCausalLM.from_pretrained(out.merged_dir)(ids).logits
        torchao = AutoModelForCausalLM.from_pretrained(out.model_dir)(ids).logits
        assert is_int8_dynamic(out.model_dir)
        mixed_model, fused_model = (AutoModelForCausalLM.from_pretrained(out.model_dir) for _ in range(2))
        # 2 layers x 7 linears, but down_proj and o_proj keep their per-token scales (as on a VNNI CPU)
        assert use_fbgemm_linears(mixed_model, flags=frozenset(PER_TOKEN_INT8_FLAGS)) == 10
        layer = mixed_model.model.layers[0]
        assert {type(m.weight).__name__ for m in (layer.mlp.down_proj, layer.self_attn.o_proj)} == {"Int8Tensor"}
        assert use_fbgemm_linears(fused_model, per_token_modules=()) == 14
        mixed, fused = mixed_model(ids).logits, fused_model(ids).logits
    err_torchao = (torchao - full).abs().mean()
    for err in ((mixed - full).abs().mean(), (fused - full).abs().mean()):
        assert 0 < err < 3 * err_torchao, (err, err_torchao)
        assert err < 0.1 * full.abs().mean(), (err, full.abs().mean())

    run = tracking.client_for(ctx.tracking_uri).get_run(out.mlflow_run_id)
    assert run.data.tags["mlflow.parentRunId"] == ctx.parent_run_id
    assert run.data.metrics["linear_ratio"] == pytest.approx(out.linear_ratio)
    assert "quantize/recipe.json" in {a.path for a in tracking.client_for(ctx.tracking_uri)
                                      .list_artifacts(out.mlflow_run_id, "quantize")}


def test_embedding_option_quantizes_the_tied_embedding_too(smoke_cfg, tiny_model, ray_local):
    smoke_cfg.quantize.method = "int8_dynamic"
    smoke_cfg.quantize.embedding = True
    out = run_quantize(smoke_cfg, run_context(smoke_cfg, tiny_model), tiny_model, None, "test-emb")
    # The tiny model is mostly embedding: stored twice in int8 it still takes well under half of one fp32 copy.
    assert out.embedding_bytes < 0.6 * out.fp32_size_bytes
    assert out.size_bytes < 0.6 * out.fp32_size_bytes
    assert load_in_fresh_process(out.model_dir)["new_tokens"] >= 1


def test_prompt_tuning_adapter_is_refused(smoke_cfg, tiny_model, tmp_path, ray_local):
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                   PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(tmp_path / "pt")
    smoke_cfg.quantize.method = "int8_dynamic"
    with pytest.raises(AlignpipeError, match="cannot merge a PROMPT_TUNING adapter"):
        run_quantize(smoke_cfg, run_context(smoke_cfg, tiny_model), tiny_model, str(tmp_path / "pt"), "test-pt")


def test_gpu_only_method_on_cpu_fails_before_any_work(smoke_cfg, tmp_path):
    from alignpipe.config import load_pipeline
    from testlib import PIPELINES

    with pytest.raises(ConfigError, match=r"quantize.method.*bnb_nf4.*needs a CUDA GPU"):
        load_pipeline(PIPELINES, "smoke", {"quantize.method": "bnb_nf4", "workdir": str(tmp_path / "w")})
    # use_gpu=true on a machine without CUDA: `alignpipe check` / `run` preflight says so before any stage starts.
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = load_pipeline(PIPELINES, "smoke", {"quantize.method": "bnb_int8", "compute.use_gpu": True,
                                             "workdir": str(tmp_path / "w")})
    problems = preflight(cfg)
    assert any("bnb_int8" in p and "CUDA" in p for p in problems), problems
    assert not (Path(tmp_path) / "w").exists()  # nothing ran, nothing was written
