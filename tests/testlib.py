"""Constants and small helpers shared by tests (importable because pytest puts tests/ on sys.path)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PIPELINES = REPO / "pipelines.yaml"
DEMO_DATA = REPO / "data" / "demo"


def run_context(cfg, base_model: str, name: str = "test-parent"):
    """A RunContext backed by a real MLflow parent run in the config's (temporary) store."""
    from alignpipe import tracking
    from alignpipe.runs import RunContext

    uri = tracking.tracking_uri(cfg)
    exp = tracking.ensure_experiment(cfg)
    parent = tracking.start_run(uri, exp, name, {tracking.TAG_FLOW_RUN: "test", tracking.TAG_PIPELINE: cfg.name})
    return RunContext(run_id="test", pipeline=cfg.name, tracking_uri=uri, experiment_id=exp, parent_run_id=parent,
                      workdir=cfg.workdir, base_model=base_model)


def canonical_split(cfg, which: str, out_dir):
    """Normalise one configured source to a canonical JSONL file; returns (path, digest)."""
    from alignpipe.data.formats import load_sft, write_jsonl
    from alignpipe.runs import file_digest

    src = getattr(cfg.data, which)
    path = write_jsonl(load_sft(src.path, src.format, src.limit), out_dir / f"{which}.jsonl")
    return str(path), file_digest(path)
