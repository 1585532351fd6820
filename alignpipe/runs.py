"""What every stage needs to know about the run it belongs to (passed between tasks as plain data)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

import alignpipe
from alignpipe.secrets import redact

NOT_CORE = ("tasks", "flows", "cli")  # subpackages of the installed wheel that are not the core


class RunContext(BaseModel):
    """Ids and locations shared by all stages of one flow run."""

    run_id: str                # the flow run id: Prefect flow run, MLflow parent run tag, Ray job metadata
    pipeline: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str         # the MLflow parent run
    workdir: str
    base_model: str            # resolved folder (or hub id) of the base model

    def stage_dir(self, stage: str, key: str) -> Path:
        """Content-addressed output folder of a stage: the same work lands in the same place."""
        path = Path(self.workdir) / "stages" / stage / key
        path.mkdir(parents=True, exist_ok=True)
        return path


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
