"""The one allow-list of library internals alignpipe still relies on, each with its reason and a check.

Everything else uses public APIs only (STYLE.md). tests/alignpipe/test_private_api.py scans the code for private
imports, names and attributes of other packages and fails on any not listed here, and runs a check per entry that
fails when the library changes underneath the code that relies on it.
"""

from __future__ import annotations

# Private name (as the scanner reports it) -> why there is no public way.
ALLOWED: dict[str, str] = {
    "prefect.deployments.runner.RunnerDeployment._parameter_openapi_schema":
        "flows/deploy.py: RunnerDeployment takes no parameter schema, and the drop-down's choices (the pipelines "
        "of the file) are known only at deploy time, so no type hint can carry them",
    "torch._log_softmax_backward_data":
        "kernels/lm_head.py: the log-softmax backward kernel itself, so the compact head's gradients equal the "
        "plain ops' bit for bit",
    "ray.train.v2._internal.execution.controller.placement_group_cleaner (logger name)":
        "ray_runner.py: quiets the logger of Ray Train's placement-group cleaner on the in-process Ray, whose state "
        "API queries fail every second without a dashboard; no setting turns the cleaner off",
    "torch._int_mm":
        "bench/int8_cpu.py --micro: times the integer matmul torchao's int8 path calls, alone, to split its cost "
        "from the quantize/rescale ops around it (a measurement only; no runtime path calls it)",
    "trl.trainer.utils.add_fused_lm_head":
        "kernels/lm_head.py: wraps the forward TRL's fused LM head installs on the model instance "
        "(`vars(model)['forward']`), an undocumented detail of trl.trainer.utils",
}
