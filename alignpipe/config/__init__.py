"""Typed, validated configuration: one schema module per concern, assembled in `pipeline.py`."""

from alignpipe.config.loader import load_all, load_checked, load_pipeline, pipeline_names, preflight
from alignpipe.config.model import EMBEDDED_MODEL, TINY_MODEL
from alignpipe.config.pipeline import PipelineConfig

__all__ = ["EMBEDDED_MODEL", "TINY_MODEL", "PipelineConfig", "load_all", "load_checked", "load_pipeline", "pipeline_names", "preflight"]
