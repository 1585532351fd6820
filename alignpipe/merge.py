"""Fold a PEFT adapter into its base model: one plain safetensors folder that loads without peft.

Reads the base model folder and the adapter folder written by `sft`; writes the merged weights, the
tokenizer (with its chat template) and a generation config that stops at the end of a turn. On Ray
(`merge_on_ray`) both come from storage and the merged folder is published there.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from alignpipe import models
from alignpipe.config.compute import ComputeConfig
from alignpipe.errors import AlignpipeError
from alignpipe.storage import Storage

MERGEABLE = ("LORA", "IA3")  # methods whose weights fold into the base linear layers


def merge_adapter(base_path: str, adapter_dir: str, out_dir: str, dtype: str = "float32") -> str:
    """Merge `adapter_dir` into the base model and save the result to `out_dir`.

    Args:
        base_path: Base model folder (or hub id) the adapter was trained on.
        adapter_dir: PEFT adapter folder, usually with the tokenizer saved beside it.
        out_dir: Where the merged model goes (replaced if it exists).
        dtype: Weights dtype of the merged model.

    Returns:
        out_dir.
    """
    from peft import PeftConfig

    try:
        adapter_cfg = PeftConfig.from_pretrained(adapter_dir)
    except ValueError as exc:
        raise AlignpipeError(f"{adapter_dir}: not a PEFT adapter folder ({exc})") from None
    method = str(getattr(adapter_cfg.peft_type, "value", adapter_cfg.peft_type))
    if method not in MERGEABLE:
        raise AlignpipeError(
            f"cannot merge a {method} adapter into the base model: {method.lower()} learns virtual tokens fed to the "
            f"model, not weight updates, so there is nothing to fold into the weights. Use a mergeable method "
            f"(sft.peft.method: lora or ia3), or set register.enabled=false and serve the adapter with peft."
        )

    merged, tokenizer = load_with_adapter(base_path, adapter_dir, dtype)

    # generate() must stop at the end of the assistant turn (<|im_end|> for SmolLM2), not at <|endoftext|>.
    merged.generation_config.eos_token_id = tokenizer.eos_token_id
    merged.generation_config.pad_token_id = tokenizer.eos_token_id

    out = Path(out_dir)
    partial = out.with_name(out.name + ".partial")  # a crash mid-save never leaves a folder that looks finished
    shutil.rmtree(partial, ignore_errors=True)
    merged.save_pretrained(partial)  # safetensors
    tokenizer.save_pretrained(partial)  # keeps the chat template
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return str(out)


def merge_on_ray(storage: Storage, base_path: str, adapter_dir: str, out_uri: str,
                 compute: ComputeConfig) -> str:
    """`merge_adapter` as a Ray task (loading and merging a model is heavy work: the flow process stays light), from
    and to storage URIs; a merged model already published at `out_uri` is reused. Call after `ray_runner.ensure_ray`."""
    import ray

    from alignpipe import ray_runner

    if storage.exists(out_uri):
        return out_uri
    merge = ray.remote(**ray_runner.task_options(compute, 1))(merge_in_storage)
    return ray_runner.get(merge.remote(storage, base_path, adapter_dir, out_uri))


def merge_in_storage(storage: Storage, base_path: str, adapter_dir: str, out_uri: str) -> str:
    """In the Ray task: fetch base and adapter to this node, merge, publish the merged folder at `out_uri`.

    The merge itself runs on CPU in fp32 even on a GPU node: it is an exact weight update, not a model run."""
    if not storage.remote:  # a local folder: merge straight into place (merge_adapter renames a finished folder in)
        return merge_adapter(base_path, adapter_dir, out_uri)
    with tempfile.TemporaryDirectory(prefix="merge-") as tmp:
        merged = merge_adapter(storage.fetch(base_path), storage.fetch(adapter_dir), str(Path(tmp) / "merged"))
        return storage.publish(merged, out_uri)


def load_with_adapter(base_path: str, adapter_dir: str, dtype: str = "float32"):
    """Base model + adapter, merged in memory when the method allows it; with the adapter's tokenizer if saved.

    Returns:
        (model, tokenizer). Prompt and prefix tuning come back as an unmerged PeftModel.
    """
    from peft import PeftModel

    has_tokenizer = (Path(adapter_dir) / "tokenizer_config.json").is_file()
    tokenizer = models.load_tokenizer(adapter_dir if has_tokenizer else base_path)
    model = PeftModel.from_pretrained(models.load_model(base_path, dtype=dtype), adapter_dir)
    if model.peft_config["default"].peft_type.value in MERGEABLE:
        model = _fresh_module_tree(model.merge_and_unload(), base_path, dtype)
    return model, tokenizer


def _fresh_module_tree(merged, base_path: str, dtype: str):
    """The merged weights in a freshly loaded module tree (the tensors are moved, not copied).

    On CPU the tree `merge_and_unload` hands back runs forward passes markedly slower than a freshly loaded model
    holding the very same tensors (same module types, dtypes, strides, config and hooks); evaluation decodes and
    scores through it, so it gets a fresh one.
    """
    fresh = models.load_model(base_path, dtype=dtype)
    fresh.load_state_dict(merged.state_dict(), assign=True)
    fresh.tie_weights()  # assign=True replaces tensors one by one: tie embedding and head again where tied
    fresh.generation_config = merged.generation_config
    return fresh
