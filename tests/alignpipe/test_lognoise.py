"""The CPU-only import noise of torchao and torch is dropped; every other warning from those loggers stays."""

import logging
import subprocess
import sys

import alignpipe  # noqa: F401  (installs the filters)

NOISE = ("Failed to load", "Detected no triton", "is an Enum subclass")


def test_known_lines_are_dropped_and_others_kept():
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append((record.name, record.getMessage()))

    handler = Keep()
    names = ("torchao", "torchao.kernel.intmm", "torch.utils._pytree")
    for name in names:
        logging.getLogger(name).addHandler(handler)
    try:
        logging.getLogger("torchao").warning("Failed to load /x/_C_mxfp8.so: Could not load this library")
        logging.getLogger("torchao.kernel.intmm").warning("Warning: Detected no triton, on systems without Triton")
        logging.getLogger("torch.utils._pytree").warning("%s is an Enum subclass and is now natively supported", "E")
        logging.getLogger("torchao").warning("int8 weight of layer 3 overflowed")
        logging.getLogger("torch.utils._pytree").warning("a different pytree warning")
    finally:
        for name in names:
            logging.getLogger(name).removeHandler(handler)
    assert records == [("torchao", "int8 weight of layer 3 overflowed"),
                       ("torch.utils._pytree", "a different pytree warning")]


def test_importing_the_stack_after_alignpipe_prints_none_of_it():
    """What a Ray worker does: our package first, then PEFT and torchao. Without alignpipe the lines appear."""
    code = "import {first}peft, torchao; from torchao.quantization import Int8DynamicActivationInt8WeightConfig"
    plain, ours = (subprocess.run([sys.executable, "-c", code.format(first=first)], capture_output=True, text=True,
                                  timeout=300) for first in ("", "alignpipe, "))
    assert plain.returncode == ours.returncode == 0, (plain.stderr[-2000:], ours.stderr[-2000:])
    assert any(n in plain.stderr for n in NOISE), "torchao no longer prints this: alignpipe/lognoise.py can go"
    assert not [line for line in ours.stderr.splitlines() if any(n in line for n in NOISE)], ours.stderr[-2000:]


def test_peft_loading_a_model_does_not_warn_about_the_renamed_property(tiny_model):
    import warnings

    from peft import LoraConfig, get_peft_model

    from alignpipe import lognoise
    from alignpipe.models import load_model

    model = load_model(tiny_model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lognoise.install()  # what importing alignpipe did; pytest resets warning filters around each test
        get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
        warnings.warn("`is_gradient_checkpointing` is not the only FutureWarning", FutureWarning)
    assert [str(w.message) for w in caught] == ["`is_gradient_checkpointing` is not the only FutureWarning"]
