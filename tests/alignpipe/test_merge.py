"""merge_adapter: merged weights compute what base + adapter computed, and load without peft."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignpipe import models
from alignpipe.errors import AlignpipeError
from alignpipe.merge import merge_adapter


def _save_adapter(tiny_model: str, out: Path, peft_cfg) -> None:
    from peft import get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(models.load_model(tiny_model), peft_cfg)
    with torch.no_grad():  # fresh adapters are a no-op (LoRA B = 0, IA3 = 1); random values make merges observable
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
            elif "ia3_l" in name:
                param.normal_(1, 0.5)
    model.save_pretrained(out)
    models.load_tokenizer(tiny_model).save_pretrained(out)


@pytest.fixture(params=["lora", "ia3"])
def adapter(request, tiny_model, tmp_path) -> str:
    from peft import IA3Config, LoraConfig, TaskType

    if request.param == "lora":
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type=TaskType.CAUSAL_LM)
    else:
        cfg = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                        task_type=TaskType.CAUSAL_LM)
    out = tmp_path / request.param
    _save_adapter(tiny_model, out, cfg)
    return str(out)


def test_merged_logits_match_peft_model(tiny_model, adapter, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = merge_adapter(tiny_model, adapter, str(tmp_path / "merged"))

    tok = models.load_tokenizer(tiny_model)
    ids = tok("Ana Lima is 34 and lives in Porto.", return_tensors="pt").input_ids
    base = models.load_model(tiny_model)
    peft_model = PeftModel.from_pretrained(models.load_model(tiny_model), adapter).eval()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not hasattr(merged, "peft_config")
    with torch.no_grad():
        expected = peft_model(ids).logits
        got = merged(ids).logits
        unchanged = base(ids).logits
    assert not torch.allclose(expected, unchanged, atol=1e-3), "adapter had no effect; the test proves nothing"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    keys = set()
    for f in Path(out).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            keys.update(st.keys())
    assert keys and not [k for k in keys if "lora_" in k or "ia3_" in k]
    assert not (Path(out) / "adapter_config.json").exists()
    gen = json.loads((Path(out) / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>") == gen["pad_token_id"]
    assert "<|im_start|>assistant" in models.load_tokenizer(out).chat_template


def test_prompt_tuning_cannot_be_merged(tiny_model, tmp_path):
    from peft import PromptTuningConfig, TaskType

    adapter = tmp_path / "prompt"
    _save_adapter(tiny_model, adapter, PromptTuningConfig(num_virtual_tokens=4, task_type=TaskType.CAUSAL_LM))
    with pytest.raises(AlignpipeError, match="cannot merge a PROMPT_TUNING adapter.*lora or ia3"):
        merge_adapter(tiny_model, str(adapter), str(tmp_path / "merged"))
    assert not (tmp_path / "merged").exists()


def test_not_an_adapter_folder(tiny_model, tmp_path):
    with pytest.raises(AlignpipeError, match="not a PEFT adapter folder"):
        merge_adapter(tiny_model, str(tmp_path), str(tmp_path / "merged"))
