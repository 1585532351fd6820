"""pipelines.yaml -> validated PipelineConfig, with env and --set overrides and readable errors.

Precedence (highest first): `--set section.key=value`, environment variables (MLFLOW_TRACKING_URI, RAY_ADDRESS,
ALIGNPIPE_STORAGE_PATH, ALIGNPIPE_REGISTRY_LOCK_URL: ENV_KEYS), the pipeline's own keys, the file's `defaults:`,
schema defaults.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from alignpipe.config.model import EMBEDDED_MODEL, TINY_MODEL
from alignpipe.config.pipeline import PipelineConfig, ray_is_remote
from alignpipe.config.quantize import GPU_ONLY
from alignpipe.errors import ConfigError

ENV_KEYS = {"MLFLOW_TRACKING_URI": ("tracking", "mlflow_uri"), "RAY_ADDRESS": ("compute", "ray_address"),
            "ALIGNPIPE_STORAGE_PATH": ("compute", "storage_path"),
            "ALIGNPIPE_REGISTRY_LOCK_URL": ("register", "lock_url")}
TOP_KEYS = {"defaults", "pipelines"}


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; a second `sft:` block silently replacing the first is a bug."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"{key_node.start_mark.line + 1}: key {key!r} appears twice in the same "
                                  f"mapping (first on line {seen[key]}); merge the two into one")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_file(path: str | Path) -> dict[str, Any]:
    """Parse the YAML file and check its two top-level keys."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; pass --config PATH/pipelines.yaml")
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; pass --config PATH or run from the project folder")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"{path}:{exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); re-encode the file as UTF-8") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("pipelines"), dict) or not raw["pipelines"]:
        raise ConfigError(f"{path}: needs a top-level `pipelines:` mapping of name -> pipeline settings")
    for key in raw:
        if key not in TOP_KEYS:
            raise ConfigError(f"{path}: unknown top-level key {key!r}{_suggest(key, TOP_KEYS)}")
    return raw


def pipeline_names(path: str | Path) -> list[str]:
    return list(read_file(path)["pipelines"])


def load_pipeline(
    path: str | Path,
    name: str,
    overrides: list[str] | Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> PipelineConfig:
    """Build and validate one pipeline. Relative paths resolve against the YAML file's folder."""
    path = Path(path).resolve()
    raw = read_file(path)
    if name not in raw["pipelines"]:
        known = list(raw["pipelines"])
        raise ConfigError(f"no pipeline {name!r} in {path.name}{_suggest(name, known)}; pipelines: {', '.join(known)}")
    body = raw["pipelines"][name] or {}
    if not isinstance(body, dict):
        raise ConfigError(f"pipelines.{name}: must be a mapping of settings, got {type(body).__name__}")
    merged = _deep_merge(raw.get("defaults") or {}, body)
    for var, keys in ENV_KEYS.items():
        if env and env.get(var):
            _set_path(merged, keys, env[var])
    for key, value in parse_overrides(overrides).items():
        _check_override_path(key)
        _set_path(merged, tuple(key.split(".")), value)
    merged["name"] = name
    try:
        cfg = PipelineConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, prefix=f"pipelines.{name}")) from None
    return _resolve_paths(cfg, path.parent)


_CHECKED: dict[str, PipelineConfig] = {}


def load_checked(
    path: str | Path,
    name: str,
    overrides: list[str] | Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> PipelineConfig:
    """`load_pipeline` plus `preflight`, raising one ConfigError with every problem.

    Checked once per process for the same file contents, pipeline, overrides and environment: `alignpipe run`
    checks before it starts anything, and the flow it then runs gets that result instead of checking again.
    """
    path = Path(path).resolve()
    try:
        content = path.read_bytes()
    except OSError:
        content = b""  # load_pipeline says what is wrong with the path
    key = json.dumps([str(path), hashlib.sha256(content).hexdigest(), name, parse_overrides(overrides),
                      {var: (env or {}).get(var) for var in ENV_KEYS}], sort_keys=True, default=str)
    if key not in _CHECKED:
        cfg = load_pipeline(path, name, overrides, env)
        problems = preflight(cfg)
        if problems:
            raise ConfigError("\n".join(problems))
        _CHECKED[key] = cfg
    return _CHECKED[key].model_copy(deep=True)


def load_all(path: str | Path, env: Mapping[str, str] | None = None) -> dict[str, PipelineConfig | ConfigError]:
    """Validate every pipeline in the file; errors are returned, not raised, so all are reported."""
    out: dict[str, PipelineConfig | ConfigError] = {}
    for name in pipeline_names(path):
        try:
            out[name] = load_pipeline(path, name, env=env)
        except ConfigError as exc:
            out[name] = exc
    return out


def preflight(cfg: PipelineConfig) -> list[str]:
    """Checks that need the filesystem: data files and local model folders exist."""
    problems = []
    sources = {"data.sft": cfg.data.sft, "data.eval": cfg.data.eval, "data.preference": cfg.data.preference,
               "data.preference_eval": cfg.data.preference_eval}
    for key, src in sources.items():
        if src is None or src.path.startswith("hf://") or Path(src.path).is_file():
            continue
        if Path(src.path).is_dir():
            problems.append(f"pipelines.{cfg.name}.{key}.path: {src.path!r} is a folder, not a file; point it at "
                            "the .jsonl/.json/.csv/.parquet file in it")
        else:
            problems.append(f"pipelines.{cfg.name}.{key}.path: {src.path!r} does not exist; fix the path or generate it")
    if Path(cfg.workdir).exists() and not Path(cfg.workdir).is_dir():
        problems.append(f"pipelines.{cfg.name}.workdir: {cfg.workdir!r} is a file; workdir must be a folder "
                        "(it holds the MLflow store, stage outputs and caches)")
    name = cfg.model.name
    if name not in (EMBEDDED_MODEL, TINY_MODEL) and _looks_local(name) and not Path(name).is_dir():
        problems.append(
            f"pipelines.{cfg.name}.model.name: {name!r} is not a folder; give an existing local model folder, "
            f"a hub id like 'HuggingFaceTB/SmolLM2-135M-Instruct', or {EMBEDDED_MODEL!r}"
        )
    problems += quantize_problems(cfg)
    return problems


def quantize_problems(cfg: PipelineConfig) -> list[str]:
    """GPU-only quantization on a local Ray without CUDA fails here, before any stage runs."""
    if cfg.quantize.method not in GPU_ONLY or ray_is_remote(cfg.compute.ray_address):
        return []  # a remote cluster's workers may have GPUs this machine lacks
    import torch

    if torch.cuda.is_available():
        return []
    return [(f"pipelines.{cfg.name}.quantize.method: {cfg.quantize.method!r} (bitsandbytes) needs a CUDA GPU and "
             "none is visible here; use quantize.method=int8_dynamic (or int4_weight_only) on CPU")]


def format_errors(exc: ValidationError, prefix: str) -> str:
    """One line per problem: key path, bad value, and what to do."""
    lines, seen = [], set()
    for err in exc.errors():
        loc = _clean_loc(err["loc"])
        where = ".".join([prefix, *map(str, loc)])
        if err["type"] == "extra_forbidden":
            parent = _model_at(loc[:-1])
            valid = _field_keys(parent) if parent else []
            line = f"{where}: unknown key {loc[-1]!r}{_suggest(str(loc[-1]), valid)}"
            if not _suggest(str(loc[-1]), valid) and valid:
                line += f"; valid keys: {', '.join(valid)}"
        elif err["type"] == "missing":
            line = f"{where}: required key is missing; add it"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            bad = err.get("input")
            shown = "" if isinstance(bad, dict) else f"got {bad!r}: "
            line = f"{where}: {shown}{msg}"
        if line not in seen:
            seen.add(line)
            lines.append(line)
    return "\n".join(lines)


def parse_overrides(overrides: list[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    if not overrides:
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    out = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set sft.learning_rate=1e-4")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({problem}); quote it, e.g. "
                              f"--set '{key.strip()}=\"{value}\"', or fix the brackets") from None
    return out


def _check_override_path(key: str) -> None:
    """`--set sft.learning_rate.x=1` walks through a value: say so, instead of a confusing type error later."""
    model: type[BaseModel] | None = PipelineConfig
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"--set {key}=...: empty key segment; write section.key=value, e.g. sft.learning_rate=1e-4")
    for i, part in enumerate(parts[:-1]):
        field = _field(model, part)
        if field is None:
            return  # an unknown key: the schema check names it and suggests the closest
        subs = _submodels(field.annotation)
        if not subs:
            raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is a value, not a section; "
                              f"use --set {'.'.join(parts[: i + 1])}=<value>")
        model = subs[0]


def _set_path(tree: dict, keys: tuple[str, ...], value: Any) -> None:
    node = tree
    for i, key in enumerate(keys[:-1]):
        nxt = node.get(key)
        if nxt is None:
            nxt = node[key] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {'.'.join(keys)}: {'.'.join(keys[: i + 1])} is a value, not a section")
        node = nxt
    node[keys[-1]] = value


def _deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists()


def _resolve_paths(cfg: PipelineConfig, root: Path) -> PipelineConfig:
    def fix(p: str) -> str:
        if p.startswith("hf://"):
            return p
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else (root / q).resolve())

    cfg.workdir = fix(cfg.workdir)
    for src in (cfg.data.sft, cfg.data.eval, cfg.data.preference, cfg.data.preference_eval):
        if src is not None:
            src.path = fix(src.path)
    if _looks_local(cfg.model.name) and cfg.model.name not in (EMBEDDED_MODEL, TINY_MODEL):
        cfg.model.name = fix(cfg.model.name)
    if cfg.compute.storage_path and "://" not in cfg.compute.storage_path:
        cfg.compute.storage_path = fix(cfg.compute.storage_path)
    return cfg


def _suggest(word: str, options) -> str:
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


def _submodels(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _submodels(arg)]
    return []


def _field(model: type[BaseModel], key: str):
    for name, field in model.model_fields.items():
        if key in (name, field.alias):
            return field
    return None


def _field_keys(model: type[BaseModel]) -> list[str]:
    return [f.alias or n for n, f in model.model_fields.items() if n != "name" or model is not PipelineConfig]


def _model_at(loc) -> type[BaseModel] | None:
    model: type[BaseModel] | None = PipelineConfig
    for part in loc:
        field = _field(model, str(part)) if model else None
        subs = _submodels(field.annotation) if field else []
        model = subs[0] if subs else None
    return model


def _clean_loc(loc) -> tuple:
    """Drop pydantic's union-member tags ('list[str]', 'literal[...]') so paths name real keys."""
    out, model = [], PipelineConfig
    for part in loc:
        field = _field(model, str(part)) if model else None
        if field is None and isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "none")):
            continue
        if model is None:
            out.append(part)
            continue
        out.append(part)
        subs = _submodels(field.annotation) if field else []
        model = subs[0] if subs else None
    return tuple(out)
