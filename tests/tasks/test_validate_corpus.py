"""The bad-data corpus: every malformed dataset stops the validate stage with one message naming the problem.

The small files live in tests/corpus/data/; binary and huge ones (non-UTF-8 bytes, parquet, a 2 GB sparse file)
are made here at run time. Each case runs the real validate task body (GX, the tiny model's tokenizer, a real
MLflow SQLite store) and checks that it raised, that the message names the problem, and that no stage after
validate ran and nothing was registered. One case runs the whole Prefect flow.
"""

from __future__ import annotations

import json
import time
import tracemalloc
from pathlib import Path
from unittest.mock import patch

import pandas as pd
import pytest

from alignpipe import tracking
from alignpipe.config import load_pipeline
from alignpipe.errors import DataValidationError
from alignpipe.tasks.validate import check_source, run_validate
from testlib import PIPELINES, REPO, run_context

CORPUS = REPO / "tests" / "corpus" / "data"
CLEAN = {"sft": CORPUS / "clean_train.jsonl", "eval": CORPUS / "clean_eval.jsonl",
         "preference": CORPUS / "clean_pairs.jsonl"}


def _bytes(content: bytes):
    return lambda path: path.write_bytes(content)


def _parquet(frame: pd.DataFrame):
    return lambda path: frame.to_parquet(path)


def _sparse(size: int):
    """A file of `size` zero bytes that takes no disk space and is never read into memory by the test."""
    def make(path: Path) -> None:
        with path.open("wb") as f:
            f.truncate(size)
    return make


GOOD_ROW = (CORPUS / "clean_train.jsonl").read_bytes().splitlines(keepends=True)[0]
TWO_GB = 2 * 1024**3

# id: (split, corpus file name or (suffix, maker), {config changes}, distinctive substring of the message)
CASES = {
    "empty_file": ("sft", "empty.jsonl", {}, "data.sft: no rows"),
    "only_blank_lines": ("sft", "blank_lines.jsonl", {}, "data.sft: no rows"),
    "wrong_columns": ("sft", "wrong_columns.jsonl", {}, "cannot tell the data format from the columns answer, question"),
    "invalid_jsonl_line": ("sft", "invalid_json_line.jsonl", {}, "invalid_json_line.jsonl:3: invalid JSON"),
    "line_is_an_array": ("sft", "array_line.jsonl", {}, "array_line.jsonl:2: each line must be a JSON object, got array"),
    "non_utf8_bytes": ("sft", (".jsonl", _bytes(GOOD_ROW + b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')),
                       {}, ":2: not UTF-8 text; re-encode the file as UTF-8"),
    "all_duplicates": ("sft", "all_duplicates.jsonl", {}, "duplicate rate 0.6667 > allowed 0.0"),
    "over_long_row": ("sft", "over_long_row.jsonl", {}, "token length failed"),
    "pii_email": ("sft", "pii_email.jsonl", {}, "no e-mail address failed"),
    "assistant_turn_missing": ("sft", "missing_assistant.jsonl", {}, "assistant turn failed"),
    "roles_out_of_order": ("sft", "roles_out_of_order.jsonl", {}, "role order failed"),
    "empty_content": ("sft", "empty_content.jsonl", {}, "non-empty fields failed"),
    "unknown_role": ("sft", "unknown_role.jsonl", {}, "allowed roles failed"),
    "target_not_json": ("sft", "non_json_target.jsonl", {}, "JSON answers failed"),
    "mixed_formats": ("sft", "mixed_formats.jsonl", {}, "mixed_formats.jsonl:2: no 'messages' column"),
    "content_is_a_number": ("sft", "content_number.jsonl", {}, ":2: messages[1].content must be a string, got number"),
    "messages_is_a_string": ("sft", "messages_string.jsonl", {}, ":2: messages must be a list of {role, content}"),
    "csv_missing_column": ("sft", "csv_missing_column.csv", {}, "cannot tell the data format from the columns prompt;"),
    "csv_empty_cell": ("sft", "csv_empty_cell.csv", {}, "non-empty fields failed"),  # was trained as "nan"
    "parquet_wrong_schema": ("sft", (".parquet", _parquet(pd.DataFrame({"id": [1, 2], "score": [0.5, 0.7]}))),
                             {}, "cannot tell the data format from the columns id, score"),
    "parquet_number_column": ("sft", (".parquet", _parquet(pd.DataFrame({"prompt": ["Ana?"], "completion": [34]}))),
                              {}, ":1: completion must be a string or a list of messages, got number"),
    "json_object_not_list": ("sft", "json_object.json", {}, "must hold a list of rows, got a JSON object"),
    "json_truncated": ("sft", "json_truncated.json", {}, "json_truncated.json:34: invalid JSON (Unterminated string"),
    "directory_not_file": ("sft", (".jsonl", lambda p: p.mkdir()), {}, "is a folder, not a file"),
    "missing_file": ("sft", (".jsonl", lambda p: None), {}, ": no such file"),
    "eval_overlaps_train": ("eval", "eval_leaks_train.jsonl", {}, "data.eval: held-out leakage failed"),
    "two_gb_file": ("sft", (".jsonl", _sparse(TWO_GB)), {}, ":1: line is longer than validate.max_line_kb (1024 KB)"),
    "two_gb_line_with_limit": ("sft", (".jsonl", _sparse(TWO_GB)), {"limit": 8},
                               ":1: line is longer than validate.max_line_kb (1024 KB)"),
    "pairs_chosen_equals_rejected": ("preference", "pairs_chosen_equals_rejected.jsonl", {}, "chosen differs failed"),
    "pairs_prompt_mismatch": ("preference", "pairs_prompt_mismatch.jsonl", {}, "same prompt failed"),
    "pairs_pii_phone": ("preference", "pairs_phone.jsonl", {}, "data.preference: no phone number failed"),
    "pairs_missing_rejected": ("preference", "pairs_missing_rejected.jsonl", {}, ":2: no 'rejected' column"),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model):
    """One MLflow SQLite store and parent run for the whole corpus (a fresh store costs seconds of migrations)."""
    root = tmp_path_factory.mktemp("corpus")
    cfg = load_pipeline(PIPELINES, "smoke", {"workdir": str(root / "work"), "model.name": tiny_model,
                                             "tracking.mlflow_uri": f"sqlite:///{root / 'mlflow.db'}"})
    return cfg, run_context(cfg, tiny_model, name="corpus")


def _config(store, split: str, path: Path, changes: dict):
    """The smoke pipeline on the clean corpus files, with `split` pointed at `path`.

    Preference pairs are checked only in the preference cases: each split is one more GX checkpoint and Data Docs
    build, seconds on a loaded machine.
    """
    cfg = store[0].model_copy(deep=True)
    for name, clean in CLEAN.items():
        getattr(cfg.data, name).path, getattr(cfg.data, name).limit = str(clean), None
    cfg.data.preference_eval = None
    if split != "preference":
        cfg.data.preference = None
    src = getattr(cfg.data, split)
    src.path = str(path)
    for key, value in changes.items():
        setattr(src, key, value)
    return cfg


def _stages_and_models(ctx) -> tuple[list[str], list]:
    client = tracking.client_for(ctx.tracking_uri)
    runs = client.search_runs([ctx.experiment_id], f"tags.mlflow.parentRunId = '{ctx.parent_run_id}'")
    return [r.data.tags.get(tracking.TAG_STAGE) for r in runs], client.search_registered_models()


def test_clean_corpus_passes(store):
    """The control: the clean files the cases start from pass, so each failure below is the bad file's doing."""
    report = run_validate(_config(store, "sft", CLEAN["sft"], {}), store[1])
    assert report.success, "\n".join(report.failures)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_stops_at_validate(store, tmp_path, case):
    split, source, changes, expected = CASES[case]
    if isinstance(source, str):
        path = CORPUS / source
    else:
        suffix, make = source
        path = tmp_path / f"{case}{suffix}"
        make(path)
    cfg, ctx = _config(store, split, path, changes), store[1]
    before = len(_stages_and_models(ctx)[0])

    tracemalloc.start()  # a huge file is streamed: its one capped line is refused, the file never read whole
    t0 = time.perf_counter()
    try:
        with pytest.raises(DataValidationError) as err:
            run_validate(cfg, ctx)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    message = str(err.value)
    assert expected in message, message
    assert "Traceback" not in message
    if split != "sft":  # the SFT split is clean here: the message blames the bad split only
        assert "data.sft" not in message
    if case.startswith("two_gb"):
        assert peak < 64 * 2**20 and time.perf_counter() - t0 < 30, (peak, time.perf_counter() - t0)
    stages, models = _stages_and_models(ctx)
    assert stages[before:] == ["validate"] and "sft" not in stages  # one failed validate run, nothing trained
    assert models == []


JSONL_CASES = [c for c, (_, source, changes, _) in CASES.items()
               if isinstance(source, str) and source.endswith(".jsonl") and not changes]


def _outcome(split: str, cfg, tiny_model: str, out: Path):
    """What `check_source` makes of one split: its error message, or its per-row result table."""
    try:
        return check_source(split, getattr(cfg.data, split), cfg, tiny_model, out)
    except DataValidationError as exc:
        return str(exc)


@pytest.mark.parametrize("case", JSONL_CASES)
def test_ray_data_path_matches_in_process(store, ray_local, tiny_model, tmp_path, case):
    """Every JSONL file of the corpus, checked on Ray Data (in parts of a few lines) and in this process: the same
    error message, or the same per-row result table, from which GX makes the same failures."""
    split, source, _, _ = CASES[case]
    cfg = _config(store, split, CORPUS / source, {})
    cfg.validate_.batch_rows = 2  # several batches per file, and several parts on Ray
    in_process = _outcome(split, cfg, tiny_model, tmp_path / "local")
    cfg.validate_.stream_threshold_mb = 0
    with patch("alignpipe.tasks.validate._part_bytes", lambda path, cfg: 1):  # a part per line
        on_ray = _outcome(split, cfg, tiny_model, tmp_path / "ray")
    if isinstance(in_process, str):
        assert on_ray == in_process
    else:
        assert len(list((tmp_path / "ray" / split).glob("part-*.parquet"))) > (len(in_process) > 1)  # in parts
        pd.testing.assert_frame_equal(on_ray, in_process)


@pytest.mark.parametrize("case", ["invalid_jsonl_line", "pii_email"])
def test_bad_data_stops_at_validate_on_ray_data(store, ray_local, case):
    """The whole task on the Ray Data path: the message names the same problem and line."""
    split, source, _, expected = CASES[case]
    cfg = _config(store, split, CORPUS / source, {})
    cfg.validate_.stream_threshold_mb = 0
    with pytest.raises(DataValidationError) as err:
        run_validate(cfg, store[1])
    assert expected in str(err.value) and ("line 3:" in str(err.value)) == (case == "pii_email")


def test_flow_stops_before_sft_and_registers_nothing(prefect_harness, tiny_model, tmp_path):
    """The real flow: bad data fails `validate`, the parent run fails, no sft run, no model version."""
    from alignpipe.flows.pipeline import alignpipe_pipeline

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = {"workdir": str(tmp_path / "work"), "model.name": tiny_model, "tracking.mlflow_uri": uri,
                 "data.sft.path": str(CORPUS / "pii_email.jsonl"), "data.sft.limit": None}
    with pytest.raises(DataValidationError, match="no e-mail address failed") as err:
        alignpipe_pipeline(pipeline="smoke", overrides=overrides, config_file=str(PIPELINES))
    assert "line 3:" in str(err.value)

    client = tracking.client_for(uri)
    [exp] = [e for e in client.search_experiments() if e.name == "alignpipe-smoke"]
    runs = client.search_runs([exp.experiment_id])
    stages = {r.data.tags.get(tracking.TAG_STAGE): r.info.status for r in runs if tracking.TAG_STAGE in r.data.tags}
    assert stages == {"validate": "FAILED"}
    assert [r.info.status for r in runs if tracking.TAG_STAGE not in r.data.tags] == ["FAILED"]  # the parent
    assert client.search_registered_models() == []
    assert not (tmp_path / "work" / "ray_results").exists()  # Ray Train never started


def test_corpus_has_at_least_twenty_cases():
    assert len(CASES) >= 20 and len({c[3] for c in CASES.values()}) >= 20  # distinct messages, not one reused
    assert json.loads((CORPUS / "clean_train.jsonl").read_text().splitlines()[0])["messages"]
