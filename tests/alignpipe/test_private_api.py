"""Public library APIs only: a scan of the code for other packages' private names, and a check per allowed one."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

from alignpipe.private_api import ALLOWED

ROOT = Path(__file__).resolve().parents[2]
# Scanned as directories, not imported: the layout can move (tasks/, flows/, cli/ into the alignpipe package).
SCANNED = ("alignpipe", "tasks", "flows", "cli", "bench")
OWN = {"alignpipe", "tasks", "flows", "cli", "bench", "tests"}
NAMEDTUPLE_API = {"_replace", "_asdict", "_fields", "_make", "_field_defaults"}  # public despite the underscore
OWN_MARK = "_alignpipe"  # attributes of ours that we set on other packages' objects
ATTR_FUNCS = {"getattr", "setattr", "hasattr", "delattr"}


def _private(part: str) -> bool:
    return part.startswith("_") and not part.endswith("__") and part not in NAMEDTUPLE_API \
        and not part.startswith(OWN_MARK)


def _foreign(path: str) -> bool:
    top = path.split(".")[0]  # empty for a relative import: ours
    return bool(top) and top not in OWN and top not in sys.stdlib_module_names and top != "__future__"


def _first_private(path: str) -> str | None:
    """`path` up to its first private part (`ray.train.v2._internal`), or None when it has none."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if _private(part):
            return ".".join(parts[:i + 1])
    return None


def _overrides_private(base: str, method: str) -> bool:
    """Whether the foreign class `base` has `method` (defining it in a subclass then overrides a private one)."""
    module, _, name = base.rpartition(".")
    try:
        return hasattr(getattr(importlib.import_module(module), name), method)
    except (ImportError, AttributeError):  # not importable here: count it, so nothing slips through unseen
        return True


def scan(source: str, filename: str = "<string>") -> list[tuple[int, str]]:
    """(line, private name) for each use of another package's private import, name, attribute or method.

    Names bound by imports are resolved to their dotted origin; an attribute of anything else (a local variable, a
    call's result) is reported as `._name`, which an allow-list entry ending in that attribute covers.
    """
    tree = ast.parse(source, filename)
    bound: dict[str, str] = {}  # name -> dotted origin, for every import in the file (scopes merged)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                bound[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
                if _foreign(alias.name) and (hit := _first_private(alias.name)):
                    found.append((node.lineno, hit))
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                path = f"{'.' * node.level}{node.module or ''}.{alias.name}".replace("..", ".")
                bound[alias.asname or alias.name] = path
                if _foreign(path) and (hit := _first_private(path)):
                    found.append((node.lineno, hit))

    def resolve(expr: ast.expr) -> str | None:
        """The dotted origin of `expr` where it starts from an imported name, else None."""
        if isinstance(expr, ast.Name):
            return bound.get(expr.id)
        if isinstance(expr, ast.Attribute) and (base := resolve(expr.value)) is not None:
            return f"{base}.{expr.attr}"
        return None

    def owner(expr: ast.expr, name: str) -> str | None:
        """The reported name for attribute `name` of `expr`, or None where it is ours."""
        root = expr
        while isinstance(root, ast.Attribute):
            root = root.value
        if isinstance(root, ast.Name) and root.id in ("self", "cls"):
            return None
        base = resolve(expr)
        if base is None:
            if isinstance(root, ast.Name) and root.id in bound:  # an import of ours
                return None
            return f".{name}"
        return f"{base}.{name}" if _foreign(base) and _first_private(base) is None else None

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            if hit := owner(node.value, node.attr):
                found.append((node.lineno, hit))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ATTR_FUNCS
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
              and isinstance(node.args[1].value, str) and _private(node.args[1].value)):
            if hit := owner(node.args[0], node.args[1].value):
                found.append((node.lineno, hit))
        elif isinstance(node, ast.ClassDef):
            bases = [b for b in map(resolve, node.bases) if b and _foreign(b)]
            for base in bases:
                if hit := _first_private(base):
                    found.append((node.lineno, hit))
            methods = [f.name for f in node.body if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)]
            for base in (b for b in bases if _first_private(b) is None):
                found += [(node.lineno, f"{base}.{m}") for m in methods
                          if _private(m) and _overrides_private(base, m)]
    return sorted(set(found))


def allowed(name: str) -> bool:
    """On the allow-list: by its full name, or (`._attr`, an attribute of an unresolved object) by its last part."""
    if name.startswith("."):
        return any(entry.endswith(name) for entry in ALLOWED)
    return name in ALLOWED


def _sources():
    for top in SCANNED:
        yield from sorted((ROOT / top).rglob("*.py"))


def test_no_private_library_api_outside_the_allow_list():
    offences = [f"{path.relative_to(ROOT)}:{line}: {name}"
                for path in _sources() for line, name in scan(path.read_text(), str(path)) if not allowed(name)]
    assert not offences, ("private API of another package; use a public one, or add it with its reason to "
                          "alignpipe/private_api.py:\n" + "\n".join(offences))


def test_every_allowed_private_name_is_still_used():
    """An entry naming a private name goes once nothing uses it (entries like TRL's, relied upon without a private
    name in the code, stay by hand)."""
    used = {name for path in _sources() for _, name in scan(path.read_text(), str(path))}
    stale = [entry for entry in ALLOWED if _first_private(entry) and " " not in entry  # "x (what)": not a code name
             and entry not in used and f".{entry.rsplit('.', 1)[1]}" not in used]
    assert not stale, f"allow-list entries nothing uses any more; remove them: {stale}"


def test_scanner_reports_each_kind_of_private_use():
    source = """
import torch
import ray.train.v2._internal.callbacks as cbs
from ray.train.torch.config import _TorchBackend
from ray.train.torch import TorchTrainer
from prefect import flow as f
from alignpipe import _ours
from . import _relative

class Lean(TorchTrainer):
    def _create_default_callbacks(self):
        return self._helper()

class NoGroup(_TorchBackend):
    pass

class Plain(TorchTrainer):
    def _not_in_ray(self):
        pass

torch._make_per_channel_quantized_tensor(x)
torch.distributed._functional_collectives
deployment._parameter_openapi_schema.properties["pipeline"] = 1
setattr(model, "_hidden", 1)
getattr(model, "_alignpipe_compact", False)
point._replace(x=1)
_ours._x
"""
    assert scan(source) == [
        (3, "ray.train.v2._internal"),
        (4, "ray.train.torch.config._TorchBackend"),
        (10, "ray.train.torch.TorchTrainer._create_default_callbacks"),
        (14, "ray.train.torch.config._TorchBackend"),
        (21, "torch._make_per_channel_quantized_tensor"),
        (22, "torch.distributed._functional_collectives"),
        (23, "._parameter_openapi_schema"),
        (24, "._hidden"),
    ]
    assert not allowed("ray.train.v2._internal") and not allowed("._hidden")
    assert allowed("._parameter_openapi_schema") and not allowed("torch._make_per_channel_quantized_tensor")


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
def _ray_placement_group_cleaner_logger() -> None:
    import importlib.util

    from alignpipe import ray_runner

    spec = importlib.util.find_spec(ray_runner.PLACEMENT_GROUP_CLEANER_LOGGER)
    assert spec is not None, "Ray Train's placement-group cleaner moved: its warnings are no longer quieted"
    source = open(spec.origin).read()
    assert "logging.getLogger(__name__)" in source and "Failed to query Ray Train Controller actor state" in source


def _torch_int_mm() -> None:
    import torch

    a, b = torch.randint(-128, 127, (32, 64), dtype=torch.int8), torch.randint(-128, 127, (64, 32), dtype=torch.int8)
    assert torch.equal(torch._int_mm(a, b), a.int() @ b.int())  # int32 products, exact


CHECKS = {
    "ray.train.v2._internal.execution.controller.placement_group_cleaner (logger name)":
        _ray_placement_group_cleaner_logger,
    "prefect.deployments.runner.RunnerDeployment._parameter_openapi_schema": _prefect_parameter_schema,
    "torch._log_softmax_backward_data": _torch_log_softmax_backward,
    "trl.trainer.utils.add_fused_lm_head": _trl_fused_lm_head,
    "torch._int_mm": _torch_int_mm,
}


def test_every_entry_has_a_reason_and_a_check():
    assert set(CHECKS) == set(ALLOWED)
    assert all(reason.strip() for reason in ALLOWED.values())


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_allowed_private_api_is_still_there_as_relied_upon(name):
    CHECKS[name]()
