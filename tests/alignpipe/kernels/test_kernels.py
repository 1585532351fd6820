"""One switch for the hardware-specific kernels: which ones a host gets, and that `off` trains with plain modules."""

from __future__ import annotations

import math

import pytest
from datasets import Dataset
from peft import LoraConfig
from transformers.models.llama.modeling_llama import LlamaMLP
from trl import SFTConfig, SFTTrainer

from alignpipe.config.compute import ComputeConfig
from alignpipe.kernels import KERNELS, apply_training_kernels, cpu_flags, select
from alignpipe.models import load_model, load_tokenizer

# /proc/cpuinfo of a Sapphire Rapids core (trimmed) and of an AVX2-only one
BF16_HOST = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16
bugs\t\t: spectre_v1

processor\t: 1
flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16
"""
AVX2_HOST = """processor\t: 0
model name\t: Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz
flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma
"""


def test_cpu_flags_parse_the_flags_line():
    flags = cpu_flags(BF16_HOST)
    assert {"avx2", "avx512_bf16", "avx512_vnni"} <= flags and "GenuineIntel" not in flags
    assert cpu_flags(AVX2_HOST) == {"fpu", "vme", "sse", "sse2", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "fma"}
    assert cpu_flags("processor\t: 0\nFeatures\t: fp asimd\n") == frozenset()  # no x86 flags line
    assert isinstance(cpu_flags(), frozenset)  # this machine's: whatever it has, never an error


def test_select_enables_each_kernel_only_where_it_was_measured():
    bf16, avx2 = cpu_flags(BF16_HOST), cpu_flags(AVX2_HOST)
    assert select("auto", use_gpu=False, flags=bf16) == set(KERNELS) == {
        "compact_lm_head", "recomputing_swiglu", "int8_fbgemm"}
    assert select("auto", use_gpu=False, flags=avx2) == {"int8_fbgemm"}  # fbgemm's AVX2 kernels: no bf16 training
    assert select("auto", use_gpu=False, flags=frozenset({"sse4_2", "avx"})) == frozenset()
    assert select("auto", use_gpu=True, flags=bf16) == frozenset()  # GPUs keep the libraries' kernels
    assert select("off", use_gpu=False, flags=bf16) == frozenset()
    assert select("off", use_gpu=True, flags=bf16) == frozenset()
    with pytest.raises(ValueError, match="auto or off"):
        select("on", use_gpu=False, flags=bf16)


def test_the_table_names_each_kernels_flags():
    assert KERNELS == {"compact_lm_head": ("avx512_bf16",), "recomputing_swiglu": ("avx512_bf16",),
                       "int8_fbgemm": ("avx2",)}


def _trainer(tiny_model, tmp_path) -> SFTTrainer:
    """A LoRA SFTTrainer on the tiny model, on CPU, as the sft stage builds one."""
    tokenizer = load_tokenizer(tiny_model)
    rows = [{"messages": [{"role": "user", "content": f"Card for person {i}?"},
                          {"role": "assistant", "content": f'{{"name": "P{i}"}}'}]} for i in range(4)]
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, learning_rate=1e-3,
                     activation_checkpointing=False, use_cpu=True, max_length=64, save_strategy="no",
                     report_to="none", disable_tqdm=True, dataloader_num_workers=0)
    return SFTTrainer(model=load_model(tiny_model), args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=tokenizer, peft_config=LoraConfig(r=4, target_modules="all-linear"))


def _patched(trainer) -> dict[str, bool]:
    """Which of our kernels sit on the trainer's model: our LM head forward, an instance forward on any MLP."""
    base = trainer.model.get_base_model()
    mlps = [m for m in trainer.model.modules() if isinstance(m, LlamaMLP)]
    assert len(mlps) == base.config.num_hidden_layers
    return {"compact_lm_head": getattr(vars(base).get("forward"), "_alignpipe_compact", False),
            "recomputing_swiglu": any("forward" in vars(m) or type(m).forward is not LlamaMLP.forward
                                      for m in mlps)}


def test_kernels_off_trains_with_the_libraries_plain_modules(tiny_model, tmp_path):
    assert ComputeConfig().kernels == "auto"
    trainer = _trainer(tiny_model, tmp_path)
    trl_forward = vars(trainer.model.get_base_model())["forward"]  # TRL's fused head, set on the instance
    assert apply_training_kernels(trainer, select(ComputeConfig(kernels="off").kernels, use_gpu=False,
                                                  flags=cpu_flags(BF16_HOST))) == []
    assert _patched(trainer) == {"compact_lm_head": False, "recomputing_swiglu": False}
    assert vars(trainer.model.get_base_model())["forward"] is trl_forward  # TRL's, untouched
    loss = trainer.train().training_loss
    assert math.isfinite(loss) and loss > 0  # a real step
    assert _patched(trainer) == {"compact_lm_head": False, "recomputing_swiglu": False}


def test_kernels_auto_on_a_bf16_cpu_patches_both(tiny_model, tmp_path):
    trainer = _trainer(tiny_model, tmp_path)
    enabled = select("auto", use_gpu=False, flags=cpu_flags(BF16_HOST))
    assert apply_training_kernels(trainer, enabled) == ["compact_lm_head", "recomputing_swiglu"]
    assert _patched(trainer) == {"compact_lm_head": True, "recomputing_swiglu": True}
    # int8_fbgemm alone (an AVX2 CPU without bf16) is an inference kernel: training keeps plain modules
    plain = _trainer(tiny_model, tmp_path / "plain")
    assert apply_training_kernels(plain, select("auto", use_gpu=False, flags=frozenset({"avx2"}))) == []
    assert _patched(plain) == {"compact_lm_head": False, "recomputing_swiglu": False}
