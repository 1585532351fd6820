"""Validate stage: checks the SFT, held-out and preference data with Great Expectations before anything trains.

Reads `data.sft`, `data.eval` and (when set) `data.preference` / `data.preference_eval`; writes canonical JSONL
of each, GX Data Docs and the validation results.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import jinja2
import pandas as pd
from pydantic import BaseModel

from alignpipe import tracking
from alignpipe.chat import render, with_system
from alignpipe.config import PipelineConfig
from alignpipe.data.formats import load_sft, write_jsonl
from alignpipe.data.preference import load_preference
from alignpipe.errors import AlignpipeError, DataValidationError
from alignpipe.models import load_tokenizer
from alignpipe.runs import RunContext, content_key, file_digest

# Documented exception to "no env vars in tasks": a fresh GX project has no analytics setting of its own, so
# GX falls back to this variable (read when GX is first imported, lazily below). Set before that import.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

SPLITS = ("sft", "eval")
PREFERENCE_SPLITS = ("preference", "preference_eval")
PREFERENCE_COLUMNS = ["line", "text", "blank_fields", "answer_roles_ok", "answers_differ", "same_prompt", "n_tokens",
                      "is_duplicate"]
COLUMNS = ["line", "text", "n_turns", "blank_fields", "n_assistant", "roles", "n_tokens", "is_duplicate",
           "answers_are_json", "leaks_into_train"]
ALLOWED_ROLES = r"^(?:(?:system|user|assistant)(?:,|$))+$"
ROLE_ORDER = r"^(?:system,)?user,assistant(?:,user,assistant)*$"
PII = {
    "e-mail address": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
    "phone number": (
        r"(?<![\w+])\+\d{1,3}[\s.-]?\(?\d{1,4}\)?(?:[\s.-]?\d{2,5}){2,4}"  # +1 415 555 0132, +44 20 7946 0958
        r"|\(\d{3}\)\s?\d{3}[\s.-]?\d{4}\b"                                # (415) 555-0132
        r"|\b\d{3}[\s.-]\d{3}[\s.-]\d{4}\b"                                # 415-555-0132, 415.555.0132
    ),
    "API key or secret": (
        r"\b(?:sk-|sk_live_|ghp_|gho_|github_pat_|hf_|xox[abprs]-)[A-Za-z0-9_-]{16,}"
        r"|\bAKIA[0-9A-Z]{16}\b"
        r"|\b[0-9a-fA-F]{32,}\b"                                             # hex digests and tokens
        r"|(?=[\w+/-]*\d)(?=[\w+/-]*[a-z])(?=[\w+/-]*[A-Z])\b[A-Za-z0-9+/_-]{32,}"  # base64: digit + both cases
    ),
}


class ValidationReport(BaseModel):
    success: bool
    train_path: str              # canonical JSONL of the SFT training data (written by this stage; in storage)
    eval_path: str               # canonical JSONL of the held-out data (in storage)
    digests: dict[str, str]      # {"sft": sha256 of the source file, "eval": ...}
    docs_dir: str                # GX Data Docs site folder (contains index.html)
    result_path: str             # the GX validation results of both splits, as JSON
    stats: dict[str, float]      # rows_train, rows_eval, max_tokens_seen, duplicate_rate, ...
    failures: list[str]          # one human-readable block per failed expectation (empty on success)
    preference_path: str | None = None       # canonical preference pairs (data.preference), when configured
    preference_eval_path: str | None = None  # canonical held-out pairs (data.preference_eval), when configured


def _source_digest(path: str) -> str:
    """sha256 of a local source file; else of the spec itself: the hub cannot be hashed here, and a missing file
    or a folder is reported by the load with its data.<split> key rather than as a traceback from hashing."""
    return file_digest(path) if Path(path).is_file() else hashlib.sha256(path.encode()).hexdigest()


def validate_data(cfg: PipelineConfig, tokenizer_path: str, out_dir: str | Path) -> ValidationReport:
    """Normalise both splits, run the GX suite over them and report what failed, row by row.

    Args:
        cfg: the pipeline; reads `data`, `validate` and `model.system_prompt`.
        tokenizer_path: folder (or hub id) of the model whose tokenizer measures conversation length.
        out_dir: where the canonical JSONL, the GX project (Data Docs) and the result JSON go.

    Returns:
        The report; `success` is False when any expectation failed (nothing is raised for bad data).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = {"sft": cfg.data.sft, "eval": cfg.data.eval}
    rows = {split: _load(load_sft, split, src, cfg) for split, src in sources.items()}
    train_path = write_jsonl(rows["sft"], out_dir / "train.jsonl")
    eval_path = write_jsonl(rows["eval"], out_dir / "eval.jsonl")

    tok = load_tokenizer(tokenizer_path, cfg.model.revision)
    train_prompts = {_norm(_prompt(r["messages"])) for r in rows["sft"]} - {""}  # no user turn: not a prompt
    frames = {split: _frame(rows[split], tok, cfg, train_prompts if split == "eval" else None) for split in SPLITS}
    pref_paths = {}
    for split, src in _preference_sources(cfg).items():
        pairs = _load(load_preference, split, src, cfg)
        pref_paths[split] = str(write_jsonl(pairs, out_dir / f"{split}.jsonl"))
        frames[split] = _preference_frame(pairs, tok, cfg)
        sources[split] = src

    results, docs_dir = _run_gx(frames, cfg, out_dir)
    result_path = out_dir / "validation.json"
    result_path.write_text(json.dumps({s: r.describe_dict() for s, r in results.items()}, indent=2, default=str))

    stats = _stats(frames)
    failures = []
    for split, result in results.items():
        texts = dict(zip(frames[split]["line"], frames[split]["text"]))
        for vr in result.run_results.values():
            failures += [_failure_block(split, er, texts, stats, cfg, sources[split].path)
                         for er in vr.results if not er.success]
    return ValidationReport(
        success=not failures, train_path=str(train_path), eval_path=str(eval_path),
        digests={split: _source_digest(src.path) for split, src in sources.items()},
        docs_dir=str(docs_dir), result_path=str(result_path), stats=stats, failures=failures,
        preference_path=pref_paths.get("preference"), preference_eval_path=pref_paths.get("preference_eval"),
    )


def _load(loader, split: str, src, cfg: PipelineConfig) -> list[dict]:
    """Read one source under the size caps; a file that cannot be read at all names its `data.<split>` key."""
    v = cfg.validate_
    try:
        return loader(src.path, src.format, src.limit, max_bytes=int(v.max_file_mb * 2**20),
                      max_line_bytes=v.max_line_kb * 1024)
    except AlignpipeError as exc:  # structure errors stop at the first bad row: there is no table to check yet
        raise DataValidationError(f"data.{split}: {exc}") from None


def _preference_sources(cfg: PipelineConfig) -> dict:
    return {split: src for split in PREFERENCE_SPLITS if (src := getattr(cfg.data, split)) is not None}


def _preference_frame(pairs: list[dict], tok, cfg: PipelineConfig) -> pd.DataFrame:
    """One row per pair, with the derived columns the preference suite checks."""
    seen: set[str] = set()
    records = []
    for pair in pairs:
        prompt, chosen, rejected = pair["prompt"], pair["chosen"], pair["rejected"]
        answers = chosen + rejected
        text = "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
        text += "\nchosen: " + " ".join(m["content"] for m in chosen)
        text += "\nrejected: " + " ".join(m["content"] for m in rejected)
        key = _norm(text)
        records.append({
            "line": pair["line"],
            "text": text,
            "blank_fields": sum(not m["content"].strip() for m in prompt + answers)
            + sum(not part for part in (prompt, chosen, rejected)),
            "answer_roles_ok": all(m["role"] == "assistant" for m in answers),
            "answers_differ": _norm(_answer(chosen)) != _norm(_answer(rejected)),
            "same_prompt": "rejected_prompt" not in pair,
            "n_tokens": max(_count_tokens(tok, prompt + side, cfg.model.system_prompt, text) if prompt + side else 0
                            for side in (chosen, rejected)),
            "is_duplicate": key in seen,
        })
        seen.add(key)
    return pd.DataFrame(records, columns=PREFERENCE_COLUMNS)


def _frame(rows: list[dict], tok, cfg: PipelineConfig, train_prompts: set[str] | None) -> pd.DataFrame:
    """One row per conversation, with the derived columns the expectations check."""
    seen: set[str] = set()
    records = []
    for row in rows:
        msgs = row["messages"]
        text = "\n".join(f"{m['role']}: {m['content']}" for m in msgs)
        key = _norm(text)
        answers = [m["content"] for m in msgs if m["role"] == "assistant"]
        records.append({
            "line": row["line"],
            "text": text,
            "n_turns": len(msgs),
            "blank_fields": sum(not m["role"].strip() or not m["content"].strip() for m in msgs),
            "n_assistant": len(answers),
            "roles": ",".join(m["role"] for m in msgs),
            "n_tokens": _count_tokens(tok, msgs, cfg.model.system_prompt, text),
            "is_duplicate": key in seen,
            "answers_are_json": all(_is_json_object(a) for a in answers),
            "leaks_into_train": train_prompts is not None and _norm(_prompt(msgs)) in train_prompts,
        })
        seen.add(key)
    return pd.DataFrame(records, columns=COLUMNS)


def _count_tokens(tok, msgs: list[dict], system_prompt: str | None, text: str) -> int:
    """Tokens of the conversation as the model will see it: chat template plus the configured system turn."""
    try:
        rendered = render(tok, with_system(msgs, system_prompt)) if msgs else ""
    except (ValueError, jinja2.TemplateError):  # some templates refuse malformed turns; the role checks say why
        rendered = text
    return len(tok(rendered, add_special_tokens=False)["input_ids"])


def _meta(check: str, expected: str) -> dict:
    """The check's name and its rule, kept with each expectation for reports and Data Docs."""
    return {"meta": {"check": check, "expected": expected}, "description": f"{check}: {expected}"}


def _suite(split: str, cfg: PipelineConfig, pairs: bool = False):
    """The expectations for one split of conversations, or of preference pairs (`pairs`)."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    v, meta = cfg.validate_, _meta
    if pairs:
        unit, length = "pair", "prompt + the longer answer"
        shape = [
            gxe.ExpectColumnValuesToBeBetween(
                column="blank_fields", min_value=0, max_value=0,
                **meta("non-empty fields", "prompt, chosen and rejected present, every message non-blank")),
            gxe.ExpectColumnValuesToBeInSet(column="answer_roles_ok", value_set=[True],
                                            **meta("answer roles", "chosen and rejected are assistant turns")),
            gxe.ExpectColumnValuesToBeInSet(column="answers_differ", value_set=[True],
                                            **meta("chosen differs", "chosen != rejected (whitespace/case-insensitive)")),
            gxe.ExpectColumnValuesToBeInSet(column="same_prompt", value_set=[True],
                                            **meta("same prompt", "chosen and rejected answer the same conversation")),
        ]
    else:
        unit, length = "row", "per conversation"
        shape = [
            gxe.ExpectColumnValuesToBeBetween(column="n_turns", min_value=1,
                                              **meta("messages present", "at least 1 message per row")),
            gxe.ExpectColumnValuesToBeBetween(column="blank_fields", min_value=0, max_value=0,
                                              **meta("non-empty fields", "every message has a role and non-blank content")),
            gxe.ExpectColumnValuesToBeBetween(column="n_assistant", min_value=1,
                                              **meta("assistant turn", "at least 1 assistant turn per row")),
            gxe.ExpectColumnValuesToMatchRegex(column="roles", regex=ALLOWED_ROLES,
                                               **meta("allowed roles", "roles only from system, user, assistant")),
            gxe.ExpectColumnValuesToMatchRegex(
                column="roles", regex=ROLE_ORDER,
                **meta("role order", "optional system first, then user/assistant alternating, user first, assistant last")),
        ]
    checks = [
        gxe.ExpectTableRowCountToBeBetween(min_value=1, **meta("not empty", f"at least 1 {unit}")),
        *shape,
        gxe.ExpectColumnValuesToBeBetween(
            column="n_tokens", max_value=v.max_tokens,
            **meta("token length", f"<= {v.max_tokens} tokens {length}, chat-template-rendered")),
        gxe.ExpectColumnValuesToBeInSet(
            column="is_duplicate", value_set=[False], mostly=1 - v.max_duplicate_rate,
            **meta("duplicates", f"duplicate {unit} rate <= {v.max_duplicate_rate} (whitespace- and case-insensitive)")),
        *[gxe.ExpectColumnValuesToNotMatchRegex(column="text", regex=regex, **meta(f"no {kind}", f"no {kind}"))
          for kind, regex in PII.items() if not v.allow_pii],
    ]
    if cfg.data.json_targets and not pairs:
        checks.append(gxe.ExpectColumnValuesToBeInSet(
            column="answers_are_json", value_set=[True],
            **meta("JSON answers", "every assistant answer parses as a JSON object")))
    if split == "eval":
        checks.append(gxe.ExpectColumnValuesToBeInSet(
            column="leaks_into_train", value_set=[False],
            **meta("held-out leakage", "no held-out prompt also in the training data (whitespace/case-insensitive)")))
    suite = gx.ExpectationSuite(name=split)
    for expectation in checks:
        suite.add_expectation(expectation)
    return suite


def _run_gx(frames: dict[str, pd.DataFrame], cfg: PipelineConfig, out_dir: Path):
    """Run one checkpoint per split in a file context under out_dir; returns the results and the docs folder."""
    import great_expectations as gx
    from great_expectations.checkpoint import Checkpoint
    from great_expectations.data_context.types.base import ProgressBarsConfig

    shutil.rmtree(out_dir / "gx", ignore_errors=True)  # same content key, same output: start from a clean project
    context = gx.get_context(mode="file", project_root_dir=out_dir)
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    context.enable_analytics(False)  # also saves the variables: the project stays quiet when reopened
    source = context.data_sources.add_pandas("alignpipe")
    result_format = {"result_format": "COMPLETE", "unexpected_index_column_names": ["line"]}
    results = {}
    for split, df in frames.items():
        batch = source.add_dataframe_asset(split).add_batch_definition_whole_dataframe("all rows")
        suite = context.suites.add(_suite(split, cfg, pairs=split in PREFERENCE_SPLITS))
        definition = context.validation_definitions.add(gx.ValidationDefinition(name=split, data=batch, suite=suite))
        checkpoint = context.checkpoints.add(Checkpoint(
            name=f"validate_{split}", validation_definitions=[definition], result_format=result_format,
        ))
        results[split] = checkpoint.run(batch_parameters={"dataframe": df})  # stores its validation result
    # Data Docs once, over every split's stored result. (An UpdateDataDocsAction per checkpoint rebuilds the whole
    # site after each split, recompiling GX's Jinja templates each time: 4 builds and 10 pages for 4 splits.)
    context.build_data_docs()
    index = context.get_docs_sites_urls()[0]["site_url"]
    return results, Path(url2pathname(urlparse(index).path)).parent


def _stats(frames: dict[str, pd.DataFrame]) -> dict[str, float]:
    train, held = frames["sft"], frames["eval"]
    tokens = pd.concat([train["n_tokens"], held["n_tokens"]])
    pref = {}
    for split in PREFERENCE_SPLITS:
        if split in frames:
            pref[f"rows_{split}"] = float(len(frames[split]))
            pref[f"duplicate_rate_{split}"] = _rate(frames[split]["is_duplicate"])
            pref[f"max_tokens_{split}"] = float(frames[split]["n_tokens"].max()) if len(frames[split]) else 0.0
    return {**pref,
        "rows_train": float(len(train)),
        "rows_eval": float(len(held)),
        "max_tokens_seen": float(tokens.max()) if len(tokens) else 0.0,
        "mean_tokens": round(float(tokens.mean()), 2) if len(tokens) else 0.0,
        "duplicate_rate": _rate(train["is_duplicate"]),
        "duplicate_rate_eval": _rate(held["is_duplicate"]),
        "leak_rate": _rate(held["leaks_into_train"]),
    }


def _failure_block(split: str, er, texts: dict[int, str], stats: dict[str, float], cfg: PipelineConfig,
                   source: str) -> str:
    """Title line (check, split, column, expected, observed), then up to `sample_rows` offending rows."""
    config, res = er.expectation_config, er.result
    check, expected = config.meta["check"], config.meta["expected"]
    column = config.kwargs.get("column")
    if column is None:  # the one table-level check: row count
        return f"data.{split}: no rows — expected {expected}, observed {res.get('observed_value')} in {source}"
    if "unexpected_count" not in res:  # a metric raised instead of answering
        return f"data.{split}: {check} could not run (column {column}): {str(er.exception_info)[:300]}"
    observed = f"{res['unexpected_count']} of {res['element_count']} rows"
    if check == "duplicates":
        rate = stats[{"sft": "duplicate_rate", "eval": "duplicate_rate_eval"}.get(split, f"duplicate_rate_{split}")]
        observed = f"duplicate rate {round(rate, 4)} > allowed {cfg.validate_.max_duplicate_rate} ({observed})"
    elif check == "token length":
        observed += f", longest {max(row['n_tokens'] for row in res['unexpected_index_list'])} tokens"
    lines = [f"data.{split}: {check} failed (column {column}) — expected {expected}; observed {observed}"]
    for row in res["unexpected_index_list"][: cfg.validate_.sample_rows]:
        line = int(row["line"])
        lines.append(f"  line {line}: {' '.join(texts[line].split())[:120] or '(no messages)'}")
    return "\n".join(lines)


def _answer(msgs: list[dict]) -> str:
    return "\n".join(m["content"] for m in msgs)


def _prompt(msgs: list[dict]) -> str:
    return "\n".join(m["content"] for m in msgs if m["role"] == "user")


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _rate(flags: pd.Series) -> float:
    return round(float(flags.mean()), 6) if len(flags) else 0.0


def cache_key(cfg: PipelineConfig, ctx: RunContext) -> str:
    """The data and validate sections, the tokenizer's model and the sha256 of every source file."""
    digests = {"sft": _source_digest(cfg.data.sft.path), "eval": _source_digest(cfg.data.eval.path)}
    digests.update({split: _source_digest(src.path) for split, src in _preference_sources(cfg).items()})
    section = {"data": cfg.data.model_dump(mode="json"), "validate": cfg.validate_.model_dump(mode="json"),
               "system_prompt": cfg.model.system_prompt}
    return content_key("validate", section, {**digests, "tokenizer": ctx.base_model})


def publish_data(report: ValidationReport, ctx: RunContext, key: str) -> ValidationReport:
    """The canonical files, in storage: what the training and evaluation workers read (the report names them)."""
    fields = ("train_path", "eval_path", "preference_path", "preference_eval_path")
    return report.model_copy(update={
        f: ctx.storage.publish(path, ctx.stage_uri("validate", key, Path(path).name))
        for f in fields if (path := getattr(report, f))})


def run_validate(cfg: PipelineConfig, ctx: RunContext) -> ValidationReport:
    """Validate the data in a nested MLflow run; raise DataValidationError (after logging) if it fails."""
    key = cache_key(cfg, ctx)
    uri = ctx.tracking_uri
    with tracking.stage_run(uri, ctx.parent_run_id, "validate", key) as run_id:
        report = validate_data(cfg, ctx.local(ctx.base_model), ctx.stage_dir("validate", key))
        client = tracking.client_for(uri)
        for split, digest in report.digests.items():
            client.set_tag(run_id, f"alignpipe.data.{split}.sha256", digest)
        tracking.log_params(uri, run_id, {"data": {s: {"path": src.path, "sha256": report.digests[s]}
                                                   for s, src in {"sft": cfg.data.sft, "eval": cfg.data.eval,
                                                         **_preference_sources(cfg)}.items()},
                                          "validate": cfg.validate_.model_dump()})
        tracking.log_metrics(uri, run_id, {**report.stats, "success": float(report.success),
                                           "failed_expectations": float(len(report.failures))})
        client.log_artifacts(run_id, report.docs_dir, "data_docs")
        client.log_artifact(run_id, report.result_path, "validation")
        if not report.success:
            raise DataValidationError("Data validation failed:\n" + "\n".join(report.failures),
                                      report_path=report.result_path)
    report = publish_data(report, ctx, key)
    s = report.stats
    print(f"validate: passed — {s['rows_train']:.0f} train / {s['rows_eval']:.0f} held-out rows, "
          f"max {s['max_tokens_seen']:.0f} tokens, duplicate rate {s['duplicate_rate']:.3f}; "
          f"Data Docs: {Path(report.docs_dir) / 'index.html'}")
    return report
