"""Quantize stage: merge the last trained adapter into its base, quantize the merged model, save both.

Reads the base model folder and the adapter folder of the last training stage (sft, or align when it runs) from
storage; publishes `<stage>/merged` (plain fp32 safetensors + tokenizer + chat template: loads with transformers
alone) and `<stage>/quantized` (a transformers folder with a `quantization_config`: `from_pretrained` loads it in a
fresh process, with torchao or bitsandbytes installed) under the stage's folder in storage. The work
runs as one Ray task with resource requests (`quantize_model`, below the driver side).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from alignpipe import models, ray_runner, tracking
from alignpipe.config import PipelineConfig
from alignpipe.config.quantize import GPU_ONLY, QuantizeConfig
from alignpipe.errors import AlignpipeError, ConfigError
from alignpipe.merge import merge_adapter
from alignpipe.runs import RunContext, content_key
from alignpipe.storage import Storage, join

RESULT = "quantize.json"  # written last: its presence means the stage's outputs are complete


class QuantizeOutput(BaseModel):
    model_dir: str               # URI of the quantized model folder (from_pretrained-loadable)
    merged_dir: str              # URI of the plain fp32 merged model: the full-precision export
    method: str
    size_bytes: int              # weights on disk, quantized
    fp32_size_bytes: int         # weights on disk, merged fp32
    linear_bytes: int            # decoder linear layers, quantized (weights + scales)
    linear_fp32_bytes: int       # the same layers in fp32
    embedding_bytes: int         # token embedding (+ untied lm_head) as stored in the quantized folder
    mlflow_run_id: str
    content_key: str

    @property
    def linear_ratio(self) -> float:
        return self.linear_bytes / self.linear_fp32_bytes


# --- driver side -------------------------------------------------------------------------------------------------

def cache_key(cfg: PipelineConfig, ctx: RunContext, base_path: str, adapter_dir: str | None,
              input_digest: str) -> str:
    """The quantize section, the model folders and the training stage's content key."""
    return content_key("quantize", cfg.quantize, {"base": base_path, "adapter": adapter_dir or "",
                                                  "input": input_digest})


def run_quantize(cfg: PipelineConfig, ctx: RunContext, base_path: str, adapter_dir: str | None,
                 input_digest: str) -> QuantizeOutput:
    """Plain function behind the task: one Ray task (fresh process) does the work; sizes and recipe go to MLflow.

    Args:
        base_path: Folder of the model the adapter was trained on (for align: the merged SFT model).
        adapter_dir: The last trained adapter, or None to quantize `base_path` itself.
        input_digest: Identifies the inputs (e.g. the training stage's content key) for the cache key.
    """
    import ray

    q = cfg.quantize
    if q.method == "none":
        raise ConfigError("quantize.method=none: the flow skips the quantize stage; nothing to do")
    key = cache_key(cfg, ctx, base_path, adapter_dir, input_digest)
    out_uri, storage = ctx.stage_uri("quantize", key), ctx.storage
    with tracking.stage_run(ctx.tracking_uri, ctx.parent_run_id, "quantize", key) as run_id:
        tracking.log_params(ctx.tracking_uri, run_id, q.model_dump(mode="json"), prefix="quantize")
        done = join(out_uri, RESULT)
        if storage.exists(done):
            print(f"quantize: reusing {out_uri} (same config, inputs and code)")
            res = json.loads(storage.read_text(done))
        else:
            ray_runner.ensure_ray(cfg.compute)
            cpus = ray_runner.task_cpus(q.cpus, cfg.compute.resources)
            options = ray_runner.task_options(cfg.compute, cpus)
            if q.method in GPU_ONLY:
                options["num_gpus"] = 1
            remote = ray.remote(**options)(quantize_model)
            res = ray_runner.get(remote.remote(q, base_path, adapter_dir, out_uri, max(1, int(cpus)), storage))
            storage.write_text(done, json.dumps(res, indent=2))
        client = tracking.client_for(ctx.tracking_uri)
        client.log_text(run_id, json.dumps(res["recipe"], indent=2, default=str), "quantize/recipe.json")
        output = QuantizeOutput(**{k: v for k, v in res.items() if k != "recipe"}, mlflow_run_id=run_id,
                                content_key=key)
        tracking.log_metrics(ctx.tracking_uri, run_id, {
            "size_bytes": output.size_bytes, "fp32_size_bytes": output.fp32_size_bytes,
            "size_ratio": output.size_bytes / output.fp32_size_bytes, "linear_bytes": output.linear_bytes,
            "linear_fp32_bytes": output.linear_fp32_bytes, "linear_ratio": output.linear_ratio,
            "embedding_share": output.embedding_bytes / output.size_bytes,
        })
        print(f"quantize: {q.method} linear layers {output.linear_ratio:.1%} of fp32, whole model "
              f"{output.size_bytes / output.fp32_size_bytes:.1%} ({output.size_bytes / 1e6:.1f} MB)")
    return output


# --- in the Ray task ---------------------------------------------------------------------------------------------

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


def quantize_model(q: QuantizeConfig, base_path: str, adapter_dir: str | None, out_dir: str,
                   threads: int, storage: Storage | None = None) -> dict[str, Any]:
    """Merge, quantize, publish under `out_dir` (a URI in `storage`; default: local paths); returns the sizes and
    URIs. Runs inside a Ray task (a fresh worker process)."""
    storage = storage or Storage.of(None, ".")
    if not storage.remote:  # a local folder: write in place
        return _quantize(q, base_path, adapter_dir, Path(out_dir), threads)
    with tempfile.TemporaryDirectory(prefix="quantize-") as tmp:
        res = _quantize(q, storage.fetch(base_path), storage.fetch(adapter_dir) if adapter_dir else None, Path(tmp),
                        threads)
        res["model_dir"] = storage.publish(res["model_dir"], join(out_dir, "quantized"))
        res["merged_dir"] = (storage.publish(res["merged_dir"], join(out_dir, "merged")) if adapter_dir
                             else base_path)
    return res


def _quantize(q: QuantizeConfig, base_path: str, adapter_dir: str | None, out: Path, threads: int) -> dict[str, Any]:
    """Merge and quantize local folders into `out`; returns the sizes and the two local folders."""
    import torch
    from transformers import AutoModelForCausalLM

    ray_runner.set_worker_threads(threads)
    method = q.method
    if method in GPU_ONLY and not torch.cuda.is_available():
        raise ConfigError(f"quantize.method={method!r} (bitsandbytes) needs a CUDA GPU and this Ray worker has none; "
                          "use quantize.method=int8_dynamic on CPU")
    merged = out / "merged"
    if adapter_dir:  # refuses prompt/prefix tuning adapters: nothing to fold into the weights
        merge_adapter(base_path, adapter_dir, str(merged), dtype="float32")
    else:
        merged = Path(base_path)
    qcfg = quantization_config(method, q.embedding, q.group_size)
    kwargs: dict[str, Any] = {"dtype": torch.float32, "quantization_config": qcfg}
    if method in GPU_ONLY:
        kwargs.update(dtype=torch.bfloat16, device_map={"": torch.cuda.current_device()})
    try:
        model = AutoModelForCausalLM.from_pretrained(merged, **kwargs)
    except (ImportError, RuntimeError, NotImplementedError) as exc:
        raise AlignpipeError(f"quantize.method={method!r} is not supported on this machine ({exc}); "
                             "use quantize.method=int8_dynamic") from None
    if q.embedding:
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
