"""The shared training module and the stage modules a Ray worker imports stay light: no Prefect among them."""

import subprocess
import sys


def test_the_training_and_stage_modules_import_no_prefect():
    probe = ("import sys; import alignpipe.training, alignpipe.tasks.sft, alignpipe.tasks.align, "
             "alignpipe.tasks.evaluate, alignpipe.tasks.quantize, alignpipe.tasks.validate, alignpipe.tasks.register; "
             "print(sorted(m for m in sys.modules if m == 'prefect' or m.startswith('prefect.')))")
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]", out
