"""Validate stage: checks the SFT, held-out and preference data with Great Expectations before anything trains.

Reads `data.sft`, `data.eval` and (when set) `data.preference` / `data.preference_eval` in batches of rows, in this
process or, for a large file, on Ray Data (`check_batch` is the per-row work either way); writes each split
normalised as Parquet shards (what the training stages read), GX Data Docs and the validation results. GX checks
the per-row result table (flags, lengths, hashes), never the texts; duplicates and held-out leakage are exact
matches of 128-bit hashes over the whole file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import jinja2
import numpy as np
import pandas as pd
from pydantic import BaseModel

from alignpipe import ray_runner, tracking
from alignpipe.chat import render, with_system
from alignpipe.config import PipelineConfig
from alignpipe.data import shards
from alignpipe.data.formats import check_file, detect_format, iter_jsonl, normalise
from alignpipe.data.preference import detect_preference_format, normalise_preference
from alignpipe.errors import AlignpipeError, DataValidationError
from alignpipe.models import load_tokenizer
from alignpipe.runs import RunContext, content_key, file_digest

# Documented exception to "no env vars in tasks": a fresh GX project has no analytics setting of its own, so
# GX falls back to this variable (read when GX is first imported, lazily below). Set before that import.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

SPLITS = ("sft", "eval")
PREFERENCE_SPLITS = ("preference", "preference_eval")
ALLOWED_ROLES = r"^(?:(?:system|user|assistant)(?:,|$))+$"
ROLE_ORDER = r"^(?:system,)?user,assistant(?:,user,assistant)*$"
PII = {  # kind -> (column of the result table, pattern)
    "e-mail address": ("email", r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"),
    "phone number": ("phone", (
        r"(?<![\w+])\+\d{1,3}[\s.-]?\(?\d{1,4}\)?(?:[\s.-]?\d{2,5}){2,4}"  # +1 415 555 0132, +44 20 7946 0958
        r"|\(\d{3}\)\s?\d{3}[\s.-]?\d{4}\b"                                # (415) 555-0132
        r"|\b\d{3}[\s.-]\d{3}[\s.-]\d{4}\b"                                # 415-555-0132, 415.555.0132
    )),
    "API key or secret": ("secret", (
        r"\b(?:sk-|sk_live_|ghp_|gho_|github_pat_|hf_|xox[abprs]-)[A-Za-z0-9_-]{16,}"
        r"|\bAKIA[0-9A-Z]{16}\b"
        r"|\b[0-9a-fA-F]{32,}\b"                                             # hex digests and tokens
        r"|(?=[\w+/-]*\d)(?=[\w+/-]*[a-z])(?=[\w+/-]*[A-Z])\b[A-Za-z0-9+/_-]{32,}"  # base64: digit + both cases
    )),
}


class ValidationReport(BaseModel):
    success: bool
    train_path: str              # Parquet shards of the normalised SFT training data (written by this stage; in storage)
    eval_path: str               # Parquet shards of the held-out data (in storage)
    digests: dict[str, str]      # {"sft": sha256 of the source file, "eval": ...}
    docs_dir: str                # GX Data Docs site folder (contains index.html)
    result_path: str             # the GX validation results of both splits, as JSON
    stats: dict[str, float]      # rows_train, rows_eval, max_tokens_seen, duplicate_rate, rows_per_s, ...
    failures: list[str]          # one human-readable block per failed expectation (empty on success)
    preference_path: str | None = None       # shards of the preference pairs (data.preference), when configured
    preference_eval_path: str | None = None  # shards of the held-out pairs (data.preference_eval), when configured


def _source_digest(path: str) -> str:
    """sha256 of a local source file; else of the spec itself: the hub cannot be hashed here, and a missing file
    or a folder is reported by the load with its data.<split> key rather than as a traceback from hashing."""
    return file_digest(path) if Path(path).is_file() else hashlib.sha256(path.encode()).hexdigest()


def validate_data(cfg: PipelineConfig, tokenizer_path: str, out_dir: str | Path) -> ValidationReport:
    """Check every split in batches, run the GX suite over the per-row results and report what failed, row by row.

    Args:
        cfg: the pipeline; reads `data`, `validate`, `compute` and `model.system_prompt`.
        tokenizer_path: folder (or hub id) of the model whose tokenizer measures conversation length.
        out_dir: where the Parquet shards, the GX project (Data Docs) and the result JSON go.

    Returns:
        The report; `success` is False when any expectation failed (nothing is raised for bad data).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sources = {"sft": cfg.data.sft, "eval": cfg.data.eval, **_preference_sources(cfg)}
    frames, ray_used = {}, False
    for split, src in sources.items():
        frames[split] = check_source(split, src, cfg, tokenizer_path, out_dir, ray_used)
        ray_used = ray_used or _on_ray(src, cfg)
    train, held = frames["sft"], frames["eval"]  # held-out leakage: a held-out prompt hash among the training ones
    train_prompts = pd.MultiIndex.from_frame(train.loc[train["has_prompt"], ["p1", "p2"]])
    held["leaks_into_train"] = held["has_prompt"] & pd.MultiIndex.from_frame(held[["p1", "p2"]]).isin(train_prompts)
    rows = sum(len(f) for f in frames.values())

    results, docs_dir = _run_gx(frames, cfg, out_dir)
    result_path = out_dir / "validation.json"
    result_path.write_text(json.dumps({s: r.describe_dict() for s, r in results.items()}, indent=2, default=str))

    stats = {**_stats(frames), "rows_per_s": round(rows / (time.perf_counter() - t0), 1),
             "max_batch_rows": float(max(f.attrs["max_batch_rows"] for f in frames.values()))}
    failed = {split: [er for vr in result.run_results.values() for er in vr.results if not er.success]
              for split, result in results.items()}
    failures = []
    for split, ers in failed.items():
        lines = {int(row["line"]) for er in ers for row in er.result.get("unexpected_index_list", [])
                 [: cfg.validate_.sample_rows]}
        texts = _texts(sources[split], split in PREFERENCE_SPLITS, lines, cfg) if lines else {}
        failures += [_failure_block(split, er, texts, stats, cfg, sources[split].path) for er in ers]
    return ValidationReport(
        success=not failures, train_path=str(out_dir / "sft"), eval_path=str(out_dir / "eval"),
        digests={split: _source_digest(src.path) for split, src in sources.items()},
        docs_dir=str(docs_dir), result_path=str(result_path), stats=stats, failures=failures,
        preference_path=str(out_dir / "preference") if "preference" in sources else None,
        preference_eval_path=str(out_dir / "preference_eval") if "preference_eval" in sources else None,
    )


def _preference_sources(cfg: PipelineConfig) -> dict:
    return {split: src for split in PREFERENCE_SPLITS if (src := getattr(cfg.data, split)) is not None}


# --- streaming the rows: in this process, or on Ray Data for a large file -----------------------------------------

def check_source(split: str, src, cfg: PipelineConfig, tokenizer_path: str, out_dir: Path,
                 ray_used: bool = False) -> pd.DataFrame:
    """The per-row result table of one source (one row per row of the file, in file order, `is_duplicate` set),
    its normalised rows written as shards to `out_dir/<split>`. A file that cannot be read (bad JSON, wrong
    columns) stops at its first bad row and names its `data.<split>` key. `ray_used`: an earlier split went to Ray
    Data (this one follows it there, see `_on_ray`)."""
    v, pairs = cfg.validate_, split in PREFERENCE_SPLITS
    folder = out_dir / split
    shutil.rmtree(folder, ignore_errors=True)  # same content key, same output: no shard of an earlier run survives
    checker = {"pairs": pairs, "tokenizer_path": tokenizer_path, "revision": cfg.model.revision,
               "system_prompt": cfg.model.system_prompt, "folder": str(folder), "batch_rows": v.batch_rows,
               "max_line_bytes": v.max_line_kb * 1024}
    try:
        if not src.path.startswith("hf://"):
            check_file(src.path)
        fmt, detected = _format(src, pairs, checker["max_line_bytes"])
        if _on_ray(src, cfg, ray_used):
            parts, total = shards.plan_parts(src.path, _part_bytes(src.path, cfg))
            frames = _on_ray_data(parts, fmt, detected, checker, cfg, shards.Progress(f"validate: data.{split}", total))
        else:
            part, local = shards.Part(path=src.path, limit=src.limit), Checker(**checker)
            progress = shards.Progress(f"validate: data.{split}", src.limit)
            frames = []
            for frame in check_part(part, fmt, detected, local):
                progress.add(len(frame))
                frames.append(frame)
    except AlignpipeError as exc:  # structure errors stop at the first bad row: there is no table to check yet
        raise DataValidationError(f"data.{split}: {exc}") from None
    table = pd.concat(frames, ignore_index=True) if frames else Checker.empty(pairs)
    table = table.sort_values("line", ignore_index=True)
    table["is_duplicate"] = table.duplicated(["k1", "k2"])  # exact, over the whole file: later copies are flagged
    table.attrs["max_batch_rows"] = shards.largest_row_group(folder)  # a row group per batch the row function saw
    return table


def _format(src, pairs: bool, max_line_bytes: int) -> tuple[str, bool]:
    """The source's row format, detected once from its first row (`auto`), so every batch and part agrees."""
    if src.format != "auto" or not src.path.endswith(".jsonl"):
        return src.format, False  # other files are read whole, in one part: the first batch detects it
    first = next(iter_jsonl(Path(src.path), 1, max_line_bytes), None)
    if first is None:
        return "auto", False
    detect = detect_preference_format if pairs else detect_format
    return detect(first[1], src.path), True


def _on_ray(src, cfg: PipelineConfig, ray_used: bool = False) -> bool:
    """Large JSONL files are checked on Ray Data; so is every JSONL file when a cluster is configured, or when an
    earlier split of this validation went to Ray (its workers hold a tokenizer: this process need not load one)."""
    if not src.path.endswith(".jsonl") or src.limit is not None or src.path.startswith("hf://"):
        return False
    return (ray_used or bool(cfg.compute.ray_address)
            or os.path.getsize(src.path) > cfg.validate_.stream_threshold_mb * 2**20)


def _part_bytes(path: str, cfg: PipelineConfig) -> int:
    """About four parts per CPU (parts finish unevenly), between 1 and 64 MB of the file each."""
    return int(min(max(os.path.getsize(path) / (4 * ray_runner.local_cpus(cfg)), 2**20), 64 * 2**20))


def _on_ray_data(parts: list[shards.Part], fmt: str, detected: bool, checker: dict, cfg: PipelineConfig,
                 progress: shards.Progress) -> list[pd.DataFrame]:
    """Check the parts on Ray Data, one task per part and at most one per CPU of this node; the per-row result tables
    come back as they are made."""
    import ray
    import ray.data

    ray_runner.ensure_ray(cfg.compute, cpus=ray_runner.local_cpus(cfg))
    context = ray.data.DataContext.get_current()  # our own progress line instead of Ray Data's bars and plan dumps
    context.enable_progress_bars, context.print_on_execution_start = False, False
    # on this node (Ray's own node-id label): the tasks read the source file and write the shards where this process
    # publishes them from
    here = ray.get_runtime_context().get_node_id()
    cpus = next(n["Resources"].get("CPU", 1) for n in ray.nodes() if n["NodeID"] == here)
    workers = max(1, min(len(parts), int(cpus)))
    ds = ray.data.from_items([p.model_dump() for p in parts]).map_batches(
        check_parts, batch_size=1, batch_format="pandas", compute=ray.data.TaskPoolStrategy(size=workers), num_cpus=1,
        label_selector={"ray.io/node-id": here}, fn_kwargs={"fmt": fmt, "detected": detected, "checker": checker})
    frames = []
    try:
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            frames.append(block.to_pandas())  # numpy dtypes, as the in-process tables have
            progress.add(len(block))
    except Exception:  # a part stopped at a bad row: name the file's first one, as the in-process pass would
        _first_bad_row(parts[0].path, fmt, detected, checker)
        raise  # no bad row: Ray itself failed
    return frames


def _first_bad_row(path: str, fmt: str, detected: bool, checker: dict) -> None:
    """Read and normalise the whole file without checking it (fast), raising AlignpipeError at its first bad row."""
    norm = normalise_preference if checker["pairs"] else normalise
    for raw in shards.raw_batches(shards.Part(path=path), checker["batch_rows"], checker["max_line_bytes"]):
        norm(raw, fmt, path, detected)


def check_part(part: shards.Part, fmt: str, detected: bool, checker: Checker) -> Iterator[pd.DataFrame]:
    """Check one part of a source a batch at a time: yields each batch's result table and writes its normalised
    rows to the part's shard. Raises AlignpipeError at the first row that cannot be read."""
    writer = shards.ShardWriter(checker.folder, part.index, checker.schema)
    try:
        for raw in shards.raw_batches(part, checker.batch_rows, checker.max_line_bytes):
            if fmt == "auto":  # a file read whole: its first row names the format
                fmt, detected = (detect_preference_format if checker.pairs else detect_format)(raw[0], part.path), True
            rows = checker.normalise(raw, fmt, part.path, detected)
            del raw
            writer.write(rows)
            yield checker(rows)
    finally:
        writer.close()


class Checker:
    """The per-row work of validation on one batch of normalised rows: the columns the GX suite checks."""

    def __init__(self, pairs: bool, tokenizer_path: str, revision: str | None, system_prompt: str | None,
                 folder: str, batch_rows: int, max_line_bytes: int):
        import pyarrow as pa

        self.pairs, self.system_prompt, self.folder = pairs, system_prompt, folder
        self.batch_rows, self.max_line_bytes = batch_rows, max_line_bytes
        self.tok = _tokenizer(tokenizer_path, revision)
        self.pii = {column: re.compile(pattern) for column, pattern in PII.values()}
        self.any_pii = re.compile("|".join(f"(?:{pattern})" for _, pattern in PII.values()))  # one pass per row
        self.allowed, self.order = re.compile(ALLOWED_ROLES), re.compile(ROLE_ORDER)
        msgs = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
        fields = ["prompt", "chosen", "rejected", "rejected_prompt"] if pairs else ["messages"]
        self.schema = pa.schema([("line", pa.int64()), *[(f, msgs) for f in fields]])

    def normalise(self, raw: list[dict], fmt: str, source: str, detected: bool) -> list[dict]:
        return (normalise_preference if self.pairs else normalise)(raw, fmt, source, detected)

    def __call__(self, rows: list[dict]) -> pd.DataFrame:
        return self.pair_table(rows) if self.pairs else self.table(rows)

    def table(self, rows: list[dict]) -> pd.DataFrame:
        """One row per conversation, with the derived columns the expectations check."""
        cols: dict[str, list] = {c: [] for c in ("line", "n_turns", "blank_fields", "n_assistant", "roles_allowed",
                                                  "role_order", "answers_are_json")}
        texts, prompts, rendered = [], [], []
        for row in rows:
            msgs = row["messages"]
            text = "\n".join(f"{m['role']}: {m['content']}" for m in msgs)
            answers = [m["content"] for m in msgs if m["role"] == "assistant"]
            roles = ",".join(m["role"] for m in msgs)
            for column, value in (("line", row["line"]), ("n_turns", len(msgs)),
                                  ("blank_fields", sum(not m["role"].strip() or not m["content"].strip() for m in msgs)),
                                  ("n_assistant", len(answers)), ("roles_allowed", bool(self.allowed.search(roles))),
                                  ("role_order", bool(self.order.search(roles))),
                                  ("answers_are_json", all(_is_json_object(a) for a in answers))):
                cols[column].append(value)
            texts.append(text)
            prompts.append(_norm(_prompt(msgs)))
        rendered = self.render([row["messages"] for row in rows], texts)
        return self.finish(cols, texts, _token_counts(self.tok, rendered), prompts)

    def pair_table(self, pairs: list[dict]) -> pd.DataFrame:
        """One row per pair, with the derived columns the preference suite checks."""
        cols: dict[str, list] = {c: [] for c in ("line", "blank_fields", "answer_roles_ok", "answers_differ",
                                                  "same_prompt")}
        texts, rendered = [], []
        for pair in pairs:
            prompt, chosen, rejected = pair["prompt"], pair["chosen"], pair["rejected"]
            answers, text = chosen + rejected, _pair_text(pair)
            for column, value in (("line", pair["line"]),
                                  ("blank_fields", sum(not m["content"].strip() for m in prompt + answers)
                                   + sum(not part for part in (prompt, chosen, rejected))),
                                  ("answer_roles_ok", all(m["role"] == "assistant" for m in answers)),
                                  ("answers_differ", _norm(_answer(chosen)) != _norm(_answer(rejected))),
                                  ("same_prompt", "rejected_prompt" not in pair)):
                cols[column].append(value)
            texts.append(text)
        sides = [(pair["prompt"] + pair[side], text) for pair, text in zip(pairs, texts)
                 for side in ("chosen", "rejected")]
        rendered = self.render([msgs for msgs, _ in sides], [text for _, text in sides])
        lengths = np.asarray(_token_counts(self.tok, rendered), dtype="int32").reshape(-1, 2)
        return self.finish(cols, texts, lengths.max(axis=1, initial=0), None)  # prompt + the longer answer

    def render(self, convs: list[list[dict]], texts: list[str]) -> list[str]:
        """The conversations as the model will see them: chat template plus the configured system turn, in one call
        for the batch (the template is compiled once); an empty conversation renders as ""."""
        todo = [i for i, msgs in enumerate(convs) if msgs]
        out = [""] * len(convs)
        try:
            batch = render(self.tok, [with_system(convs[i], self.system_prompt) for i in todo]) if todo else []
        except (ValueError, jinja2.TemplateError):  # a template refused a malformed turn: find it row by row
            batch = [self.render_one(convs[i], texts[i]) for i in todo]
        for i, text in zip(todo, batch):
            out[i] = text
        return out

    def render_one(self, msgs: list[dict], text: str) -> str:
        try:
            return render(self.tok, with_system(msgs, self.system_prompt))
        except (ValueError, jinja2.TemplateError):  # some templates refuse malformed turns; the role checks say why
            return text

    def finish(self, cols: dict[str, list], texts: list[str], n_tokens, prompts: list[str] | None) -> pd.DataFrame:
        """Add the token counts, PII flags and hashes (duplicates, and leakage where `prompts` is given)."""
        table = pd.DataFrame(cols)
        table["line"] = table["line"].astype("int64")
        table["n_tokens"] = np.asarray(n_tokens, dtype="int32")
        flagged = [i for i, t in enumerate(texts) if self.any_pii.search(t)]  # most rows: one search, no match
        for column, pattern in self.pii.items():
            hits = np.zeros(len(texts), dtype=bool)
            hits[[i for i in flagged if pattern.search(texts[i])]] = True
            table[column] = hits
        table[["k1", "k2"]] = _hashes([_norm(t) for t in texts])
        if prompts is not None:
            table[["p1", "p2"]] = _hashes(prompts)
            table["has_prompt"] = [bool(p) for p in prompts]  # no user turn: not a prompt
        return table

    @staticmethod
    def empty(pairs: bool) -> pd.DataFrame:
        sft = ["n_turns", "n_assistant", "roles_allowed", "role_order", "answers_are_json", "p1", "p2", "has_prompt"]
        columns = ["line", "blank_fields", *(["answer_roles_ok", "answers_differ", "same_prompt"] if pairs else sft),
                   "n_tokens", *[c for c, _ in PII.values()], "k1", "k2"]
        return pd.DataFrame({c: pd.Series(dtype="int64") for c in columns})


def check_parts(batch: pd.DataFrame, fmt: str, detected: bool, checker: dict) -> Iterator[pd.DataFrame]:
    """On a Ray Data worker: check whole parts (`map_batches(batch_size=1)`), yielding one result table per batch.
    A worker process keeps its tokenizer from one part to the next (`_tokenizer`)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one CPU per task: no tokenizer thread pool
    local = Checker(**checker)
    for spec in batch.to_dict("records"):
        part = shards.Part(**{k: (None if pd.isna(v) else v) for k, v in spec.items()})
        yield from check_part(part, fmt, detected, local)


@functools.lru_cache(maxsize=2)
def _tokenizer(path: str, revision: str | None):
    """One tokenizer per process for all splits (loading one takes a second)."""
    return load_tokenizer(path, revision)


def _token_counts(tok, texts: list[str]) -> list[int]:
    """Tokens of each text, in one call for the batch (the fast tokenizer's batch encoder skips offsets)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        return [len(e) for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]] if texts else []


def _hashes(texts: list[str]) -> np.ndarray:
    """128-bit blake2b of each text as two int64 columns: exact matching without keeping the texts."""
    blob = b"".join(hashlib.blake2b(t.encode(), digest_size=16).digest() for t in texts)
    return np.frombuffer(blob, dtype="<i8").reshape(-1, 2) if texts else np.zeros((0, 2), dtype="int64")


def _texts(src, pairs: bool, lines: set[int], cfg: PipelineConfig) -> dict[int, str]:
    """The text of the rows at `lines`, read again from the source (only failing rows are quoted: the result table
    keeps no texts)."""
    fmt, detected = _format(src, pairs, cfg.validate_.max_line_kb * 1024)
    out: dict[int, str] = {}
    for raw in shards.raw_batches(shards.Part(path=src.path, limit=src.limit), cfg.validate_.batch_rows,
                                  cfg.validate_.max_line_kb * 1024):
        if fmt == "auto":
            fmt, detected = (detect_preference_format if pairs else detect_format)(raw[0], src.path), True
        wanted = [r for r in raw if r["__line__"] in lines]
        for row in (normalise_preference if pairs else normalise)(wanted, fmt, src.path, detected):
            out[row["line"]] = _pair_text(row) if pairs else "\n".join(f"{m['role']}: {m['content']}"
                                                                        for m in row["messages"])
        if len(out) == len(lines):
            break
    return out


def _pair_text(pair: dict) -> str:
    text = "\n".join(f"{m['role']}: {m['content']}" for m in pair["prompt"])
    text += "\nchosen: " + " ".join(m["content"] for m in pair["chosen"])
    return text + "\nrejected: " + " ".join(m["content"] for m in pair["rejected"])


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
            gxe.ExpectColumnValuesToBeInSet(column="roles_allowed", value_set=[True],
                                            **meta("allowed roles", "roles only from system, user, assistant")),
            gxe.ExpectColumnValuesToBeInSet(
                column="role_order", value_set=[True],
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
        *[gxe.ExpectColumnValuesToBeInSet(column=column, value_set=[False], **meta(f"no {kind}", f"no {kind}"))
          for kind, (column, _) in PII.items() if not v.allow_pii],
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
    """The shard folders, in storage: what the training and evaluation workers read (the report names them)."""
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
