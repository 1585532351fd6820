"""Quantize stage: merge the last trained adapter into its base, quantize the merged model, save both.

Reads the base model folder and the adapter folder of the last training stage (sft, or align when it runs);
writes `<stage>/merged` (plain fp32 safetensors + tokenizer + chat template: loads with transformers alone) and
`<stage>/quantized` (a transformers folder with a `quantization_config`: `AutoModelForCausalLM.from_pretrained`
loads it in a fresh process, with torchao or bitsandbytes installed). Runs as one Ray task with resource requests.
"""

from __future__ import annotations

import json

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from alignpipe import ray_runner, tracking
from alignpipe.config import PipelineConfig
from alignpipe.config.quantize import GPU_ONLY
from alignpipe.errors import ConfigError
from alignpipe.runs import RunContext, content_key
from alignpipe.workers.quantize import quantize_model

RESULT = "quantize.json"  # written last: its presence means the stage's outputs are complete


class QuantizeOutput(BaseModel):
    model_dir: str               # quantized model folder (from_pretrained-loadable)
    merged_dir: str              # plain fp32 merged model: the full-precision export
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
    out_dir = ctx.stage_dir("quantize", key)
    with tracking.stage_run(ctx.tracking_uri, ctx.parent_run_id, "quantize", key) as run_id:
        tracking.log_params(ctx.tracking_uri, run_id, q.model_dump(mode="json"), prefix="quantize")
        done = out_dir / RESULT
        if done.is_file():
            print(f"quantize: reusing {out_dir} (same config, inputs and code)")
            res = json.loads(done.read_text())
        else:
            ray_runner.ensure_ray(cfg.compute)
            cpus = ray_runner.task_cpus(q.cpus)
            settings = {**q.model_dump(), "threads": max(1, int(cpus))}
            gpus = 1 if q.method in GPU_ONLY else 0
            remote = ray.remote(num_cpus=cpus, num_gpus=gpus, max_calls=1)(quantize_model)
            spec = {"base_path": base_path, "adapter_dir": adapter_dir}
            res = ray_runner.get(remote.remote(spec, str(out_dir), settings))
            done.write_text(json.dumps(res, indent=2))
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


@task(name="quantize", cache_policy=NO_CACHE)
def quantize(cfg: PipelineConfig, ctx: RunContext, base_path: str, adapter_dir: str | None,
             input_digest: str) -> QuantizeOutput:
    """Merge the last trained adapter and quantize the result."""
    return run_quantize(cfg, ctx, base_path, adapter_dir, input_digest)
