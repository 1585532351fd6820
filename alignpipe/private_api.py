"""The one allow-list of library internals alignpipe still relies on, each with its reason and a check.

Everything else uses public APIs only (STYLE.md). tests/alignpipe/test_private_api.py scans the code for private
imports, names and attributes of other packages and fails on any not listed here; it also runs each entry's check,
which fails when the library changes underneath the code that relies on it.
"""

from __future__ import annotations

from collections.abc import Callable

# Private name (as the scanner reports it) -> why there is no public way.
ALLOWED: dict[str, str] = {
    "prefect.deployments.runner.RunnerDeployment._parameter_openapi_schema":
        "flows/deploy.py: RunnerDeployment takes no parameter schema, and the drop-down's choices (the pipelines "
        "of the file) are known only at deploy time, so no type hint can carry them",
    "torch._log_softmax_backward_data":
        "kernels/lm_head.py: the log-softmax backward kernel itself, so the compact head's gradients equal the "
        "plain ops' bit for bit",
    "trl.trainer.utils.add_fused_lm_head":
        "kernels/lm_head.py: wraps the forward TRL's fused LM head installs on the model instance "
        "(`vars(model)['forward']`), an undocumented detail of trl.trainer.utils",
}


def _prefect_parameter_schema() -> None:
    import prefect

    @prefect.flow
    def probe(pipeline: str = "a") -> None:
        """A flow to build a deployment from."""

    deployment = probe.to_deployment(name="probe")
    deployment._parameter_openapi_schema.properties["pipeline"]["enum"] = ["a", "b"]
    # RunnerDeployment.apply() sends this dump as the deployment's parameter_openapi_schema
    sent = deployment._parameter_openapi_schema.model_dump(exclude_unset=True)
    assert sent["properties"]["pipeline"]["enum"] == ["a", "b"], sent


def _torch_log_softmax_backward() -> None:
    import torch

    z = torch.randn(3, 7, requires_grad=True)
    log_p = torch.log_softmax(z, dim=-1)
    g = torch.randn(3, 7)
    (expected,) = torch.autograd.grad(log_p, z, g)
    got = torch._log_softmax_backward_data(g, log_p.detach(), -1, log_p.dtype)
    assert torch.equal(got, expected)


def _trl_fused_lm_head() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import FusedCausalLMOutput, add_fused_lm_head

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    model = LlamaForCausalLM(config)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1"))
    assert callable(vars(model).get("forward")), "TRL no longer sets the fused forward on the instance"
    ids = torch.randint(0, 32, (1, 5))
    out = model(input_ids=ids, labels=ids, fused_lm_head=True)
    assert isinstance(out, FusedCausalLMOutput)
    for field in ("loss", "label_mask", "log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1"):
        assert field in FusedCausalLMOutput.__dataclass_fields__, field


# One check per entry: it fails when the private thing no longer exists as relied upon.
CHECKS: dict[str, Callable[[], None]] = {
    "prefect.deployments.runner.RunnerDeployment._parameter_openapi_schema": _prefect_parameter_schema,
    "torch._log_softmax_backward_data": _torch_log_softmax_backward,
    "trl.trainer.utils.add_fused_lm_head": _trl_fused_lm_head,
}
