"""Post-training quantization settings (the `quantize` stage, after sft/align and before evaluate)."""

from typing import Literal

from pydantic import Field

from alignpipe.config.base import Section

GPU_ONLY = ("bnb_int8", "bnb_nf4")  # bitsandbytes kernels need CUDA


class QuantizeConfig(Section):
    method: Literal["none", "int8_dynamic", "int4_weight_only", "bnb_int8", "bnb_nf4"] = Field(
        "none", description="none = skip the stage; int8_dynamic = int8 weights + dynamic int8 activations in the "
        "linear layers (torchao, CPU and GPU); int4_weight_only = int4 weights, bf16 compute (torchao, needs a "
        "CPU/GPU kernel for it); bnb_int8 / bnb_nf4 = bitsandbytes (GPU only).")
    embedding: bool = Field(
        False, description="Also quantize the token embedding (int8 weight-only). A tied embedding/lm_head pair is "
        "then stored twice (int8 each); off = the embedding stays in full precision and its share is reported.")
    group_size: int = Field(128, ge=16, description="int4_weight_only: weights per scale/zero-point group.")
    cpu_kernel: Literal["fbgemm", "torchao"] = Field(
        "torchao", description="How evaluate runs an int8_dynamic model on CPU: torchao = exactly what from_pretrained "
        "gives and what is served (per-token activation scales); fbgemm = the same stored int8 weights in PyTorch's "
        "fused dynamic-quantized linear (about 2x faster here, but per-tensor 7-bit activations cost the demo 0.25 "
        "exact match: a speed probe, not a quality measure).")
    cpus: float = Field(2, gt=0, description="CPUs reserved by the quantization Ray task (= torch threads).")
