"""What every stage needs to know about the run it belongs to (passed between tasks as plain data)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, model_validator

import alignpipe
from alignpipe.secrets import redact
from alignpipe.storage import Storage

NOT_CORE = ("tasks", "flows", "cli")  # subpackages of the installed wheel that are not the core


class RunContext(BaseModel):
    """Ids and locations shared by all stages of one flow run."""

    run_id: str                # the flow run id: Prefect flow run, MLflow parent run tag, Ray job metadata
    pipeline: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str         # the MLflow parent run
    workdir: str
    base_model: str            # the base model's URI in storage (a local folder by default), or a hub id
    storage: Storage | None = None  # where Ray workers read and write (compute.storage_path); default: the workdir

    @model_validator(mode="after")
    def _local_by_default(self):
        if self.storage is None:
            self.storage = Storage.of(None, self.workdir)
        return self

    def stage_dir(self, stage: str, key: str) -> Path:
        """Content-addressed output folder of a stage on the driver: the same work lands in the same place."""
        path = Path(self.workdir) / "stages" / stage / key
        path.mkdir(parents=True, exist_ok=True)
        return path

    def stage_uri(self, stage: str, key: str, *parts: str) -> str:
        """The same folder in storage, where workers read and write (it is `stage_dir` on default storage)."""
        return self.storage.uri("stages", stage, key, *parts)

    def local(self, uri: str) -> str:
        """A copy of `uri` the driver can read (the path itself on local storage), kept in the workdir."""
        return self.storage.fetch(uri, Path(self.workdir) / "storage_cache")


def file_digest(path: str | Path) -> str:
    """sha256 of a file, streamed (never loads a large file whole)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dir_digest(path: str | Path) -> str:
    """sha256 over the relative names and contents of every file in a folder."""
    h = hashlib.sha256()
    root = Path(path)
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(file_digest(p).encode())
    return h.hexdigest()


def data_digest(path: str | Path) -> str:
    """sha256 of a data file, or of a folder of shards (`dir_digest`)."""
    return dir_digest(path) if Path(path).is_dir() else file_digest(path)


def publish_model(storage: Storage, folder: str) -> str:
    """The base model where every worker can read it: a folder under the storage root as it is, else published once
    under `<root>/models/<name>-<digest>` (a hub id stays a hub id: each worker fetches it itself)."""
    if not Path(folder).is_dir() or (not storage.remote and Path(folder).resolve().is_relative_to(storage.root)):
        return folder
    uri = storage.uri("models", f"{Path(folder).name}-{dir_digest(folder)[:16]}")
    if not storage.exists(uri):
        storage.publish(folder, uri)
    return uri


def code_files(stage: str) -> list[Path]:
    """What a stage runs: the core package (the shared training module, models, data, kernels ...) and the stage's
    own module, found wherever Python imports them from (the repository or an installed wheel). The flows and the
    command line are not part of it."""
    import importlib.util

    core = Path(alignpipe.__file__).resolve().parent
    files = sorted(p for p in core.rglob("*.py") if p.relative_to(core).parts[0] not in NOT_CORE)
    return [*files, Path(importlib.util.find_spec(f"alignpipe.tasks.{stage}").origin).resolve()]


def code_version(stage: str) -> str:
    """Digest of `code_files(stage)`: editing any of them invalidates the stage's cache key."""
    h = hashlib.sha256(alignpipe.__version__.encode())
    for p in code_files(stage):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def content_key(stage: str, section: Any, inputs: dict[str, str]) -> str:
    """Stage key = its config section + the digests of its inputs + the code version (16 hex chars)."""
    if isinstance(section, BaseModel):
        section = section.model_dump(mode="json", by_alias=True)
    blob = json.dumps({"stage": stage, "section": section, "inputs": inputs, "code": code_version(stage)},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def config_digest(cfg: BaseModel) -> str:
    return hashlib.sha256(cfg.model_dump_json(by_alias=True).encode()).hexdigest()


def git_commit(folder: str | Path) -> str:
    """The checked-out commit of the project (with `-dirty` if it has local edits), or 'unknown'."""
    import subprocess

    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def save_summary(workdir: str | Path, summary: dict[str, Any]) -> Path:
    """Keep each flow run's summary (stages, wall times, metrics, registered version) as JSON in the workdir."""
    path = Path(workdir) / "runs" / f"{summary['flow_run_id']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(redact(json.dumps(summary, indent=2, default=str)))
    return path
