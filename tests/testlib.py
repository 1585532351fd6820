"""Constants and small helpers shared by tests (importable because pytest puts tests/ on sys.path)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PIPELINES = REPO / "pipelines.yaml"
DEMO_DATA = REPO / "data" / "demo"


def run_context(cfg, base_model: str, name: str = "test-parent"):
    """A RunContext backed by a real MLflow parent run in the config's (temporary) store."""
    from alignpipe import tracking
    from alignpipe.runs import RunContext
    from alignpipe.storage import Storage

    uri = tracking.tracking_uri(cfg)
    exp = tracking.ensure_experiment(cfg)
    parent = tracking.start_run(uri, exp, name, {tracking.TAG_FLOW_RUN: "test", tracking.TAG_PIPELINE: cfg.name})
    return RunContext(run_id="test", pipeline=cfg.name, tracking_uri=uri, experiment_id=exp, parent_run_id=parent,
                      workdir=cfg.workdir, base_model=base_model, storage=Storage.for_compute(cfg.compute, cfg.workdir))


def wait_for_progress(stage: str, until=lambda entry: True, timeout_s: float = 60.0) -> dict:
    """The run's progress board entry for `stage` once `until(entry)` holds (reports are fire-and-forget)."""
    import time

    from alignpipe import progress

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        entry = progress.read_board().get(stage)
        if entry and until(entry):
            return entry
        time.sleep(0.1)
    raise AssertionError(f"no {stage} progress on the board: {progress.read_board()}")


def canonical_split(cfg, which: str, out_dir):
    """Normalise one configured source to a canonical JSONL file; returns (path, digest)."""
    from alignpipe.data.formats import load_sft, write_jsonl
    from alignpipe.runs import file_digest

    src = getattr(cfg.data, which)
    path = write_jsonl(load_sft(src.path, src.format, src.limit), out_dir / f"{which}.jsonl")
    return str(path), file_digest(path)


def model_variant(src, dest, seed: int) -> str:
    """A copy of the model folder `src` with one weight tensor nudged: same architecture, distinct weights digest."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    [weights] = list(Path(dest).glob("*.safetensors"))
    tensors = load_file(weights)
    name = sorted(k for k in tensors if k.endswith("weight"))[0]
    torch.manual_seed(seed)
    tensors[name] = tensors[name] + 1e-3 * torch.randn_like(tensors[name])
    save_file(tensors, weights, metadata={"format": "pt"})
    return str(dest)


def registry_version(client, name: str, metrics: dict, base: dict, source, pipeline: str = "smoke",
                     legacy: bool = False) -> str:
    """A model version from a plain folder, without pyfunc logging (fast registry tests).

    As the register stage makes one: a logged model holding the folder, with the evaluation as its metrics
    (`registry.log_version_metrics`). `legacy`: as versions registered before that were, the folder as the source
    and the metrics in `metrics.<name>` / `base_metrics.<name>` tags.
    """
    import mlflow

    from alignpipe import registry

    registry.ensure_model(client, name)
    Path(source).mkdir(parents=True, exist_ok=True)
    (Path(source) / "weights.bin").write_bytes(b"\0" * 4096)
    tags = {"pipeline": pipeline}
    if legacy:
        tags.update({f"{registry.METRIC_TAG}{k}": str(v) for k, v in metrics.items()})
        tags.update({f"{registry.BASE_TAG}{k}": str(v) for k, v in base.items()})
        return str(client.create_model_version(name, Path(source).resolve().as_uri(), tags=tags).version)
    run_id = client.create_run("0").info.run_id
    model_id = client.create_logged_model("0", source_run_id=run_id).model_id
    client.log_model_artifacts(model_id, str(source))
    registry.log_version_metrics(client, run_id, model_id, metrics, base)
    client.set_terminated(run_id)
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(client.tracking_uri)  # the SQL registry resolves `models:/m-<id>` through the global URI
    try:
        mv = client.create_model_version(name, f"models:/{model_id}", run_id=run_id, tags=tags, model_id=model_id)
    finally:
        mlflow.set_tracking_uri(previous)
    return str(mv.version)


def stack_pipelines(tmp_path, tiny_model, schedules: dict[str, dict] | None = None):
    """A copy of pipelines.yaml whose `smoke` runs the tiny model on a 1-CPU-per-node cluster, in tmp_path."""
    import yaml

    raw = yaml.safe_load(PIPELINES.read_text())
    for body in (raw["defaults"]["data"], raw["pipelines"]["smoke"]["data"]):
        for src in body.values():
            if isinstance(src, dict):
                src["path"] = str(REPO / src["path"])
    raw["defaults"]["workdir"] = str(tmp_path / "work")
    smoke = raw["pipelines"]["smoke"]
    smoke["model"]["name"] = tiny_model
    smoke["compute"] = {**smoke.get("compute", {}), "cpus_per_worker": 1}  # the nodes have 1 CPU each: 2 would
    smoke["evaluate"]["cpus"] = 1                                          # never schedule, whatever smoke says
    for name, schedule in (schedules or {}).items():
        raw["pipelines"][name]["schedule"] = schedule
    path = tmp_path / "pipelines.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


class MlflowServer:
    """A real MLflow server, started the stack's own way, that a test can kill and start again on the same port
    and store (`mlflow server`, SQLite backend, proxied artifacts, 127.0.0.1)."""

    def __init__(self, root):
        from alignpipe.cli import stack

        self.root, self.port, self.svc = Path(root), stack.free_port(), None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from alignpipe.cli import stack

        self.svc = stack.start_mlflow(self.root, self.port)
        stack.wait_mlflow(self.svc)

    def kill(self) -> None:
        from alignpipe.cli import stack

        if self.svc is not None:
            stack.kill(self.svc)
            self.svc = None


def stack_workdir() -> Path:
    """A stack's workdir outside pytest's temp root: any pytest session that starts meanwhile (a developer's, another
    checkout's) sets that root back to mode 0700, which shuts PostgreSQL, running as the `postgres` user under root,
    out of its data folder mid-run (its checkpointer PANICs)."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix="alignpipe-stack-"))


# `alignpipe ARGS`, held at the start line until GO exists: with imports done beforehand, concurrent calls reach
# the registry together instead of spread over seconds of start-up, which would hide a race.
READY_SET_GO = """import sys, time
from pathlib import Path
import mlflow
from alignpipe.cli.main import app
go = Path(sys.argv[1])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.005)
sys.argv = ["alignpipe", *sys.argv[2:]]
app()
"""
