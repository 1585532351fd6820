"""Post-training quantization settings (the `quantize` stage, after sft/align and before evaluate)."""

from typing import Literal

from pydantic import Field

from alignpipe.config.base import Section
from alignpipe.kernels import int8_cpu

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
    cpu_kernel: Literal["auto", "fbgemm", "torchao"] = Field(
        "auto", description="How an int8_dynamic model runs on CPU, in evaluate and in the registered model alike: "
        "fbgemm = the stored int8 weights in PyTorch's fused dynamic-quantized linear (per-tensor activation "
        "scales), except the layers in per_token_modules; torchao = what a plain from_pretrained gives (per-token "
        "scales everywhere, a dozen ops per linear: slower than fp32 on CPU); auto = fbgemm where compute.kernels "
        "enables int8_fbgemm on the machine that runs the model (a CPU with AVX2 or AVX-512), else torchao.")
    per_token_modules: list[str] = Field(
        list(int8_cpu.PER_TOKEN_MODULES), description="cpu_kernel fbgemm: linears (by attribute name) not fused: "
        "on torchao's per-token activation scales where the CPU has AVX512-VNNI, else in fp32 with their int8 "
        "weights dequantized (torchao's path is slower than fp32 there). Their inputs carry the outlier activations "
        "that one per-tensor scale rounds away: fusing them too ([] = fuse every linear) costs accuracy.")
    cpus: float = Field(2, gt=0, description="CPUs reserved by the quantization Ray task (= torch threads).")

    def cpu_runtime(self, kernels: str = "auto") -> dict:
        """How evaluate and the registered model run an int8_dynamic artifact on CPU (settings / model_config).

        Args:
            kernels: `compute.kernels`; with cpu_kernel auto, the host that runs the model resolves the kernel
                from both (`int8_cpu.resolve_cpu_kernel`).
        """
        return {"int8_cpu_kernel": self.cpu_kernel, "int8_per_token_modules": list(self.per_token_modules),
                "kernels": kernels}
