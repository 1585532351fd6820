"""With `compute.use_gpu: true` every heavy stage asks Ray for a GPU, read back from Ray's state API.

The `offbox` fixture's worker node advertises one GPU (`ray start --num-gpus=1` needs none) and is the only node
with CPUs. Drivers submit every stage for real with `use_gpu: true` on that cluster: SFT's and align's training
worker groups, the merge task, quantize and evaluate. Each may then fail for want of CUDA on this CPU-only torch
(evaluation says so itself; a training worker group fails setting up NCCL); what matters here is what each task and
actor asked for and where Ray placed it. Run as a script, this file is such a driver. A failed Ray Train run leaves
its worker group holding the GPU until its driver exits, so each training stage comes last in its own driver.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("stack")]

HEAVY_TASKS = {"merge_in_storage", "quantize_model", "evaluate_model"}


def test_every_heavy_stage_requests_a_gpu_and_is_placed_on_the_gpu_node(offbox, tiny_model):
    outcomes = {}
    for stages in ("merge,quantize,evaluate,sft", "align"):
        out = offbox.root / f"gpu-placement-{stages.rsplit(',', 1)[-1]}.json"
        proc = subprocess.run([sys.executable, __file__, str(out), tiny_model, json.dumps(offbox.overrides),
                               str(offbox.workdir / "gpu"), offbox.dashboard_url, stages],
                              env=offbox.driver_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        seen = json.loads(out.read_text())  # the last driver's view of Ray's state covers both drivers' work
        outcomes.update(seen["outcomes"])
    [gpu_node] = [n["node_id"] for n in seen["nodes"] if n["resources_total"].get("GPU")]

    tasks = {t["func_or_class_name"].rsplit(".", 1)[-1]: t for t in seen["tasks"]}
    assert HEAVY_TASKS <= set(tasks), sorted(tasks)
    for name in HEAVY_TASKS:
        task = tasks[name]
        assert task["required_resources"].get("GPU") == 1 and task["required_resources"].get("offbox") == 1, task
        assert task["node_id"] == gpu_node, task  # granted: scheduled there

    workers = [a for a in seen["actors"] if a["class_name"] == "RayTrainWorker"]
    assert len(workers) >= 2, "SFT's and align's worker groups"
    for actor in workers:  # a worker group asks through its placement group's bundle: `GPU_group_<i>_<pg id>`
        assert _bundled(actor["required_resources"], "GPU") == 1 and _bundled(actor["required_resources"], "offbox") == 1
        assert actor["node_id"] == gpu_node

    # Where our own code meets the missing CUDA first, it says so plainly.
    assert "sees no CUDA device" in outcomes["evaluate"], outcomes
    assert "compute.use_gpu" in outcomes["evaluate"]


def _bundled(resources: dict[str, float], name: str) -> float | None:
    """What an actor in a placement group asked of resource `name` (Ray renames it per bundle)."""
    return next((v for k, v in resources.items() if k == name or k.startswith(f"{name}_group_")), None)


def _submit(out: Path, tiny_model: str, overrides: dict, workdir: Path, dashboard: str, names: list[str]) -> None:
    """A driver: the named stages with use_gpu on the cluster, each outcome recorded, then Ray's own account."""
    from peft import LoraConfig, get_peft_model
    from ray.util.state import list_actors, list_nodes, list_tasks
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignpipe.config import load_pipeline
    from alignpipe.merge import merge_on_ray
    from alignpipe.runs import publish_model
    from alignpipe.storage import Storage
    from alignpipe.tasks.align import run_align
    from alignpipe.tasks.evaluate import ModelSpec, run_evaluate
    from alignpipe.tasks.quantize import run_quantize
    from alignpipe.tasks.sft import run_sft

    # tests/ after alignpipe's modules are loaded: setuptools' editable finder would take tests/alignpipe/kernels
    # (a folder of tests) for a namespace portion of alignpipe.kernels
    sys.path.append(str(Path(__file__).resolve().parents[1]))
    from testlib import PIPELINES, canonical_split, run_context

    cfg = load_pipeline(PIPELINES, "smoke", {**overrides, "compute.use_gpu": True, "compute.max_failures": 0,
                                              "workdir": str(workdir), "model.name": tiny_model,
                                              "tracking.experiment": "gpu-placement"})
    storage = Storage.for_compute(cfg.compute, cfg.workdir)
    base = publish_model(storage, tiny_model)
    ctx = run_context(cfg, base)
    inputs = {}
    for split in ("sft", "eval", "preference"):
        path, digest = canonical_split(cfg, split, workdir) if split != "preference" else _pairs(cfg, workdir)
        inputs[split] = (storage.publish(path, storage.uri("inputs", Path(path).name)), digest)
    adapter = workdir / "adapter"  # a LoRA adapter as SFT would leave it, made here in a second
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=2, target_modules="all-linear")) \
        .save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(adapter)
    adapter_uri = storage.publish(adapter, storage.uri("inputs", "adapter"))

    stages = {
        "sft": lambda: run_sft(cfg, ctx, *inputs["sft"]),
        "align": lambda: run_align(cfg, ctx, adapter_uri, *inputs["preference"]),
        "quantize": lambda: run_quantize(cfg, ctx, base, adapter_uri, "gpu-placement"),
        "evaluate": lambda: run_evaluate(cfg, ctx, *inputs["eval"], [ModelSpec(label="base", base_path=base)]),
        "merge": lambda: merge_on_ray(storage, base, adapter_uri, storage.uri("inputs", "merged"), cfg.compute),
    }
    outcomes = {}
    for name in names:
        submit = stages[name]
        try:
            submit()
            outcomes[name] = "finished"
        except Exception as exc:  # noqa: BLE001 - recorded for the test: CUDA is missing here by design
            outcomes[name] = f"{type(exc).__name__}: {exc}"[:3000]
    fields = ("func_or_class_name", "required_resources", "node_id", "state")
    seen = {"outcomes": outcomes,
            "nodes": [{"node_id": n.node_id, "resources_total": n.resources_total}
                      for n in list_nodes(address=dashboard, detail=True)],
            "tasks": [{k: getattr(t, k) for k in fields}
                      for t in list_tasks(address=dashboard, detail=True, limit=10000) if t.type == "NORMAL_TASK"],
            "actors": [{"class_name": a.class_name, "required_resources": a.required_resources, "node_id": a.node_id}
                       for a in list_actors(address=dashboard, detail=True, limit=10000)]}
    out.write_text(json.dumps(seen, indent=2, default=str))


def _pairs(cfg, workdir: Path):
    from alignpipe.data.formats import write_jsonl
    from alignpipe.data.preference import load_preference
    from alignpipe.runs import file_digest

    src = cfg.data.preference
    path = write_jsonl(load_preference(src.path, src.format, src.limit), workdir / "preference.jsonl")
    return str(path), file_digest(path)


if __name__ == "__main__":
    _submit(Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), Path(sys.argv[4]), sys.argv[5],
            sys.argv[6].split(","))
