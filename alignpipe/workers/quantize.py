"""Quantizing a merged model, inside a Ray task: torchao int8/int4 (CPU and GPU) or bitsandbytes (GPU), saved as
a transformers folder with its `quantization_config`. The driver side is `tasks.quantize`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from alignpipe import ray_runner
from alignpipe.config.quantize import GPU_ONLY
from alignpipe.errors import AlignpipeError, ConfigError
from alignpipe.merge import merge_adapter


def quantization_config(method: str, embedding: bool, group_size: int):
    """The transformers `quantization_config` for a method; it is also the recipe logged to MLflow."""
    import torch
    from transformers import BitsAndBytesConfig, TorchAoConfig

    if method == "bnb_int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if method == "bnb_nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                                  bnb_4bit_use_double_quant=True)
    from torchao.quantization import (
        FqnToConfig,
        Int8DynamicActivationInt8WeightConfig,
        IntxWeightOnlyConfig,
        PerAxis,
        PerGroup,
    )

    if method == "int8_dynamic":
        linear = Int8DynamicActivationInt8WeightConfig()
    elif method == "int4_weight_only":
        # torchao's packed int4 kernels (Int4WeightOnlyConfig) are CUDA-only (mslk); on CPU the portable form is
        # int4 values with a scale per group, stored one per byte (IntxUnpackedToInt8Tensor): int4 accuracy, int8 size.
        linear = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))
    else:
        raise ConfigError(f"quantize.method={method!r}: unknown; use int8_dynamic, int4_weight_only, bnb_int8 or bnb_nf4")
    if not embedding:
        return TorchAoConfig(linear)  # lm_head (tied to the embedding) stays in full precision
    table = IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))
    return TorchAoConfig(FqnToConfig({"_default": linear, "model.embed_tokens": table, "lm_head": table}),
                         include_input_output_embeddings=True, modules_to_not_convert=[])


def quantize_model(spec: dict[str, Any], out_dir: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Merge, quantize, save; returns the sizes. Runs inside a Ray task (a fresh worker process)."""
    import torch
    from transformers import AutoModelForCausalLM

    from alignpipe import models

    ray_runner.set_worker_threads(settings["threads"])
    method = settings["method"]
    if method in GPU_ONLY and not torch.cuda.is_available():
        raise ConfigError(f"quantize.method={method!r} (bitsandbytes) needs a CUDA GPU and this Ray worker has none; "
                          "use quantize.method=int8_dynamic on CPU")
    out = Path(out_dir)
    merged = out / "merged"
    if spec["adapter_dir"]:  # refuses prompt/prefix tuning adapters: nothing to fold into the weights
        merge_adapter(spec["base_path"], spec["adapter_dir"], str(merged), dtype="float32")
    else:
        merged = Path(spec["base_path"])
    qcfg = quantization_config(method, settings["embedding"], settings["group_size"])
    kwargs: dict[str, Any] = {"dtype": torch.float32, "quantization_config": qcfg}
    if method in GPU_ONLY:
        kwargs.update(dtype=torch.bfloat16, device_map={"": torch.cuda.current_device()})
    try:
        model = AutoModelForCausalLM.from_pretrained(merged, **kwargs)
    except (ImportError, RuntimeError, NotImplementedError) as exc:
        raise AlignpipeError(f"quantize.method={method!r} is not supported on this machine ({exc}); "
                             "use quantize.method=int8_dynamic") from None
    if settings["embedding"]:
        # The tied pair is quantized as two tensors; a checkpoint that claims they are tied would fail to load.
        model.config.tie_word_embeddings = False
    tokenizer = models.load_tokenizer(str(merged))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    quantized = out / "quantized"
    shutil.rmtree(quantized, ignore_errors=True)
    model.save_pretrained(quantized)
    tokenizer.save_pretrained(quantized)

    # bitsandbytes' Linear8bitLt / Linear4bit subclass nn.Linear; torchao keeps nn.Linear with a quantized weight.
    linear_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    full, quant = tensor_bytes(merged), tensor_bytes(quantized)
    return {
        "model_dir": str(quantized), "merged_dir": str(merged), "method": method,
        "size_bytes": sum(quant.values()), "fp32_size_bytes": sum(full.values()),
        "linear_bytes": _under(quant, linear_names), "linear_fp32_bytes": _under(full, linear_names),
        "embedding_bytes": _under(quant, ["model.embed_tokens", "lm_head"]),
        "recipe": qcfg.to_dict(),
    }


def tensor_bytes(folder: str | Path) -> dict[str, int]:
    """Bytes of every tensor stored in a model folder's safetensors files, by key."""
    from safetensors import safe_open

    out = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                t = f.get_slice(key)
                n = 1
                for d in t.get_shape():
                    n *= d
                out[key] = n * _itemsize(t.get_dtype())
    return out


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}.get(dtype, 1)


def _under(sizes: dict[str, int], modules: list[str]) -> int:
    """Bytes of the tensors that belong to these modules (`q_proj.weight`, `q_proj._weight_qdata`, ...)."""
    prefixes = tuple(m + "." for m in modules)
    return sum(v for k, v in sizes.items() if k.startswith(prefixes))
