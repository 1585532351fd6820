"""bench/flops.py: N excludes the embedding lookup but counts the LM head's matmul; LoRA 4N + 6·adapter, full 6N."""

import importlib.util

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from testlib import REPO

spec = importlib.util.spec_from_file_location("bench_flops", REPO / "bench" / "flops.py")
flops = importlib.util.module_from_spec(spec)
spec.loader.exec_module(flops)

CONFIG = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)


def expected_n(c: dict) -> int:
    """Llama without biases, from the config: attention, MLP, two norms per layer, the final norm, the head."""
    d, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = c["num_key_value_heads"] * d // c["num_attention_heads"]
    per_layer = d * d + 2 * d * kv + d * d + 3 * d * i + 2 * d
    return c["num_hidden_layers"] * per_layer + d + v * d


@pytest.mark.parametrize("tied", [True, False])
def test_n_excludes_embedding_and_counts_the_head(tied):
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**CONFIG, tie_word_embeddings=tied))
    total = sum(p.numel() for p in model.parameters())
    assert flops.matmul_params(model) == expected_n(CONFIG)
    embedding = CONFIG["vocab_size"] * CONFIG["hidden_size"]
    assert total == expected_n(CONFIG) - (embedding if tied else 0) + embedding  # stored once when tied


def test_n_from_a_saved_folder(tmp_path):
    LlamaForCausalLM(LlamaConfig(**CONFIG, tie_word_embeddings=True)).save_pretrained(tmp_path)
    head = CONFIG["vocab_size"] * CONFIG["hidden_size"]
    assert flops.matmul_params_of(str(tmp_path)) == (expected_n(CONFIG), head)


def test_lora_is_4n_plus_6_per_adapter_parameter_and_full_is_6n():
    from peft import LoraConfig, get_peft_model

    r, c = 4, CONFIG
    d, i = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * d // c["num_attention_heads"]
    # A and B of every targeted linear: r * (in + out); all-linear leaves the LM head alone
    adapter = c["num_hidden_layers"] * r * ((d + d) + 2 * (d + kv) + (d + d) + 2 * (d + i) + (i + d))
    model = get_peft_model(LlamaForCausalLM(LlamaConfig(**c)), LoraConfig(r=r, target_modules="all-linear"))
    assert model.get_nb_trainable_parameters()[0] == adapter
    n = expected_n(c)
    assert flops.training_flops_per_token(n, "lora", adapter) == 4 * n + 6 * adapter
    assert flops.training_flops_per_token(n, "full") == 6 * n
    with pytest.raises(ValueError, match="full"):
        flops.training_flops_per_token(n, "qlora")
    # what the compact LM head runs: the head's matmul for the labelled share of tokens only
    head = c["vocab_size"] * d
    assert flops.executed_flops_per_token(n, head, "lora", adapter, 0.25) == 4 * (n - head) + 6 * adapter + head
    assert flops.executed_flops_per_token(n, head, "full", 0, 1.0) == 6 * n


def test_matmul_probe_restores_threads():
    before = torch.get_num_threads()
    assert flops.matmul_flops_per_s("float32", threads=1, size=64, repeats=1, iters=1) > 0
    assert torch.get_num_threads() == before
