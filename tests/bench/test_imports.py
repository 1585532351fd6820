"""The bench scripts import alignpipe inside their functions (each part loads what it measures, when it runs), so
importing a script proves nothing about those imports: a name that moved breaks one part hours into a sitting.
Every `from alignpipe... import name` in bench/ must resolve, read from the scripts' source."""

import ast
import importlib
import importlib.util

import pytest
from testlib import REPO

SCRIPTS = sorted((REPO / "bench").glob("*.py"))


def _alignpipe_imports(path) -> list[tuple[int, str, str]]:
    tree = ast.parse(path.read_text())
    return [(node.lineno, node.module, alias.name) for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
            and node.module.split(".")[0] == "alignpipe" for alias in node.names]


def test_the_scripts_import_alignpipe_at_all():
    assert sum(len(_alignpipe_imports(p)) for p in SCRIPTS) > 20  # the check below has something to check


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_alignpipe_name_a_bench_script_imports_exists(script):
    missing = []
    for line, module, name in _alignpipe_imports(script):
        mod = importlib.import_module(module)
        submodule = hasattr(mod, "__path__") and importlib.util.find_spec(f"{module}.{name}") is not None
        if not hasattr(mod, name) and not submodule:
            missing.append(f"{script.name}:{line}: from {module} import {name}")
    assert not missing, "\n".join(missing)
