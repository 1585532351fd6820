"""Model card (markdown) for a registered version: intended use, data, training recipe, metrics, limitations."""

from __future__ import annotations

from alignpipe.config import PipelineConfig
from alignpipe.registry import KEY_METRICS, better_base, higher_is_better


def model_card(cfg: PipelineConfig, name: str, candidate: str, metrics: dict[str, dict[str, float]],
               champion: tuple[str, dict[str, float]] | None, lineage: dict[str, str], artifact: str) -> str:
    """Render the card.

    Args:
        cfg: The pipeline that produced the model.
        name: Registered model name.
        candidate: Label of the registered artifact in `metrics` ("sft", "aligned", "quantized").
        metrics: Evaluation metrics, label -> metric -> value (fractions in [0, 1] for rates).
        champion: (version, metrics) of the champion at registration time, or None if there is none yet.
        lineage: Digests and run ids (data_digest.*, run_id.*, config_digest, git_commit, ...).
        artifact: One line saying what was logged (merged / quantized weights or adapter + base reference).
    """
    mine = metrics.get(candidate, {})
    base_label, base = better_base(metrics, cfg.register_.primary_metric)
    names = [m for m in KEY_METRICS if m in mine] + sorted(m for m in mine if m not in KEY_METRICS and "/" not in m)
    champ_head = f"champion v{champion[0]}" if champion else "champion (none yet)"
    rows = [f"| metric | {candidate} | {base_label or 'base'} | vs base | {champ_head} | vs champion |",
            "|---|---|---|---|---|---|"]
    for m in names:
        b = base.get(m)
        c = champion[1].get(m) if champion else None
        rows.append(f"| {m}{'' if higher_is_better(m) else ' (lower is better)'} | {mine[m]:.4g} | {_fmt(b)} | "
                    f"{_delta(mine[m], b)} | {_fmt(c)} | {_delta(mine[m], c)} |")
    data = [f"- {k.removeprefix('data_digest.')}: `{_source(cfg, k.removeprefix('data_digest.'))}` "
            f"(sha256 {v[:16]})" for k, v in sorted(lineage.items()) if k.startswith("data_digest.")]
    runs = [f"- {k.removeprefix('run_id.')}: `{v}`" for k, v in sorted(lineage.items()) if k.startswith("run_id.")]
    peft = cfg.sft.peft
    recipe = (f"SFT with {peft.method}" + (f" (r={peft.r}, alpha={peft.alpha})" if peft.method == "lora" else "") +
              f", learning rate {cfg.sft.learning_rate:g}, " +
              (f"{cfg.sft.max_steps} steps" if cfg.sft.max_steps >= 0 else f"{cfg.sft.epochs:g} epoch(s)") +
              f", batch {cfg.sft.batch_size} x {cfg.sft.grad_accum}, seed {cfg.sft.seed}")
    extra = [f"- {stage}: `{getattr(cfg, stage).model_dump(mode='json')}`" for stage in ("align", "quantize")
             if getattr(cfg, stage, None) is not None and getattr(getattr(cfg, stage), "enabled", True)]
    gates = ", ".join(f"`{g}`" for g in cfg.register_.gates) or "none"
    return "\n".join([
        f"# {name}: model card",
        "",
        "## Intended use",
        f"Pipeline `{cfg.name}`: {cfg.description or 'fine-tuned by alignpipe.'} Base model `{cfg.model.name}`; "
        f"every conversation gets the system prompt {cfg.model.system_prompt!r} unless it has its own. "
        "Prompts in, greedy answers out (`mlflow.pyfunc.load_model(...).predict([...])`, chat template applied "
        "inside). Not for open-ended chat or decisions about people.",
        "",
        "## Artifact",
        f"{artifact} Registered artifact: `{candidate}`.",
        "",
        "## Data",
        *(data or ["- (no data digests recorded)"]),
        "",
        "## Training recipe",
        f"- {recipe}",
        *extra,
        f"- config digest `{lineage.get('config_digest', 'unknown')}`, git `{lineage.get('git_commit', 'unknown')}`, "
        f"requirements.lock sha256 `{lineage.get('lock_digest', 'unknown')[:16]}`",
        "",
        "## Metrics (held-out split)",
        *rows,
        "",
        f"Promotion gates: `{cfg.register_.primary_metric}` must beat base; {gates}.",
        "",
        "## Lineage (MLflow run ids)",
        *(runs or ["- (none recorded)"]),
        "",
        "## Limitations",
        "- Scored only on the held-out split above; inputs unlike the training data (other languages, formats, "
        "domains) are untested.",
        "- Greedy decoding with a fixed token budget: long answers are cut off.",
        "- A small model fine-tuned on a narrow task: it can produce plausible but wrong fields; validate outputs.",
        "",
    ])


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def _delta(v: float, ref: float | None) -> str:
    return "-" if ref is None else f"{v - ref:+.4g}"


def _source(cfg: PipelineConfig, split: str) -> str:
    src = getattr(cfg.data, split, None)
    return getattr(src, "path", split) if src is not None else split
