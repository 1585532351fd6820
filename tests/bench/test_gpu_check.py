"""bench/gpu_check.py on a machine without CUDA: it stops at once saying so, and it imports a checkout that is not
installed. Its `--device cpu` dry run (every non-bitsandbytes path through the same code, ~45 s here) is run by hand:
`python bench/gpu_check.py --device cpu`."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from testlib import REPO

SCRIPT = REPO / "bench" / "gpu_check.py"

# Runs with `python -S` and the virtualenv's site-packages on PYTHONPATH: the packages are there, but no .pth file
# runs, so the editable install's finder is absent and `alignpipe` is importable only through the script's shim.
SHIM = textwrap.dedent("""
    import importlib.util, json, sys

    assert importlib.util.find_spec("alignpipe") is None, "alignpipe is importable without the shim"
    spec = importlib.util.spec_from_file_location("gpu_check", sys.argv[1])
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    gpu_check.use_checkout()
    import alignpipe.tasks.quantize

    print(json.dumps([alignpipe.__file__, alignpipe.tasks.quantize.__file__]))
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible: the check would run for real")
def test_without_cuda_it_stops_at_once_with_one_clear_line(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], check=False, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("FAIL cuda: no CUDA device visible to torch"), lines[-1]
    assert "--device cpu" in lines[-1] and "not a GPU check" in lines[-1]
    assert "Traceback" not in proc.stdout + proc.stderr
    printed = {line.split()[0] for line in lines[1:-1]}  # the versions, one per line, before anything runs
    assert {"python", "torch", "GPU", "transformers", "peft", "trl", "bitsandbytes", "torchao"} <= printed
    assert list((tmp_path / "work").iterdir()) == []
    assert (tmp_path / "gpu_check.log").read_text().strip().splitlines()[-1] == lines[-1]


def test_it_imports_the_checkout_without_an_install(tmp_path):
    site = os.pathsep.join(p for p in sys.path if p.endswith("site-packages"))
    proc = subprocess.run([sys.executable, "-S", "-c", SHIM, str(SCRIPT)], check=False, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": site})
    assert proc.returncode == 0, proc.stderr[-2000:]
    package, stage = json.loads(proc.stdout.strip().splitlines()[-1])
    assert package == str(REPO / "alignpipe" / "__init__.py")
    assert stage == str(REPO / "tasks" / "quantize.py")  # pyproject maps tasks/ to alignpipe.tasks
