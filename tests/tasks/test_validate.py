"""Tests for the validate stage: real GX suites, the tiny model's real tokenizer, a temporary MLflow store."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from alignpipe import tracking
from alignpipe.data.formats import load_canonical, load_sft
from alignpipe.errors import DataValidationError
from alignpipe.runs import RunContext, file_digest
from alignpipe.tasks import validate
from alignpipe.tasks.validate import run_validate, validate_data
from testlib import run_context

PEOPLE = [("Ana Lima", 34, "Porto"), ("Kenji Sato", 51, "Osaka"), ("Lea Novak", 27, "Zagreb"),
          ("Omar Haddad", 45, "Amman"), ("Ines Duarte", 62, "Lisbon"), ("Tom Berg", 19, "Oslo")]


def conv(user: str, answer: str, *extra: dict) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}, *extra]}


def card(i: int) -> dict:
    name, age, city = PEOPLE[i]
    return conv(f"{name} ({age}) lives in {city}.", json.dumps({"name": name, "age": age, "city": city}))


def write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def run(cfg, tmp_path: Path, train: list[dict], held: list[dict] | None = None):
    """validate_data over the given rows (train lines 1-2 and held-out lines 1-2 are clean by default)."""
    cfg.data.sft.path = write(tmp_path / "train.jsonl", train)
    cfg.data.eval.path = write(tmp_path / "held.jsonl", held if held is not None else [card(4), card(5)])
    cfg.data.sft.limit = cfg.data.eval.limit = None
    return validate_data(cfg, cfg.model.name, tmp_path / "out")


def failure(report, check: str) -> str:
    blocks = [b for b in report.failures if f": {check} failed" in b.splitlines()[0]]
    assert blocks, f"no {check!r} failure in:\n" + "\n".join(report.failures)
    return blocks[0]


def test_demo_data_passes(smoke_cfg):
    out = Path(smoke_cfg.workdir) / "validate"
    report = validate_data(smoke_cfg, smoke_cfg.model.name, out)

    assert report.success, "\n".join(report.failures)
    assert report.failures == []
    train = load_canonical(report.train_path)  # the normalised rows, as Parquet shards
    assert len(train) == 64 and len(load_canonical(report.eval_path)) == 16  # the smoke pipeline's row limits
    assert train[0]["line"] == 1 and train == load_sft(smoke_cfg.data.sft.path, limit=64)
    assert (Path(report.docs_dir) / "index.html").is_file()
    splits = {"sft", "eval", "preference", "preference_eval"}
    assert set(json.loads(Path(report.result_path).read_text())) == splits
    assert report.digests == {s: file_digest(getattr(smoke_cfg.data, s).path) for s in splits}
    stats = report.stats
    assert (stats["rows_train"], stats["rows_eval"]) == (64, 16)
    assert (stats["rows_preference"], stats["rows_preference_eval"]) == (32, 16)  # smoke limits
    pair = load_canonical(report.preference_path)[0]
    assert set(pair) == {"line", "prompt", "chosen", "rejected"}
    assert len(load_canonical(report.preference_eval_path)) == 16
    assert 0 < stats["max_tokens_seen"] <= smoke_cfg.validate_.max_tokens
    for rate in ("duplicate_rate", "duplicate_rate_eval", "leak_rate"):
        assert 0.0 <= stats[rate] <= 1.0


def test_empty_file_fails(smoke_cfg, tmp_path):
    report = run(smoke_cfg, tmp_path, [])
    assert report.success is False
    assert report.failures[0].startswith("data.sft: no rows")


LONG = " ".join(["The quick brown fox jumps over the lazy dog."] * 60)
BAD = {  # id: (split, bad row written at line 3 of that split, check named in the failure)
    "empty_content": ("sft", conv("Who is this?", "   "), "non-empty fields"),
    "missing_assistant": ("sft", {"messages": [{"role": "user", "content": "Ana Lima (34) lives in Porto?"}]},
                          "assistant turn"),
    "bad_role": ("sft", {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "{}"}]},
                 "allowed roles"),
    "bad_role_order": ("sft", {"messages": [{"role": "assistant", "content": "{}"}, {"role": "user", "content": "hi"}]},
                       "role order"),
    "too_long": ("sft", conv(LONG, "{}"), "token length"),
    "email": ("sft", conv("Write to ana.lima@example.com about Ana (34) in Porto.", "{}"), "no e-mail address"),
    "phone": ("sft", conv("Call Ana at +1 415 555 0132.", "{}"), "no phone number"),
    "api_key": ("sft", conv("My token is sk-proj-4fT9xQ2mLp8Rz7Vw1Ks3Nd6Hb.", "{}"), "no API key or secret"),
    "non_json_target": ("sft", conv("Ana Lima (34) lives in Porto.", "Ana Lima, 34, Porto"), "JSON answers"),
    "leak": ("eval", conv("  ana LIMA (34)\n lives in   porto. ", "{}"), "held-out leakage"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_row_fails_with_its_line(smoke_cfg, tmp_path, case):
    split, bad, check = BAD[case]
    train, held = [card(0), card(1)], [card(4), card(5)]
    (train if split == "sft" else held).append(bad)
    report = run(smoke_cfg, tmp_path, train, held)

    assert report.success is False
    block = failure(report, check)
    assert block.startswith(f"data.{split}: {check} failed (column ")
    assert "line 3:" in block and "line 1:" not in block and "line 2:" not in block


def test_phone_formats_and_sample_rows(smoke_cfg, tmp_path):
    phones = ["Call Ana at (415) 555-0132.", "Ana's number: 415-555-0132.", "Ring +44 20 7946 0958 after six."]
    smoke_cfg.validate_.sample_rows = 2
    report = run(smoke_cfg, tmp_path, [card(0)] + [conv(p, "{}") for p in phones])

    block = failure(report, "no phone number")
    assert "observed 3 of 4 rows" in block
    assert [ln.split(":")[0] for ln in block.splitlines()[1:]] == ["  line 2", "  line 3"]  # capped at sample_rows


def test_duplicates_above_threshold(smoke_cfg, tmp_path):
    variant = conv("  ANA LIMA (34) lives in\tPorto. ", card(0)["messages"][1]["content"])
    smoke_cfg.validate_.batch_rows = 2  # the copy (line 4) is in another batch than the original (line 1)
    report = run(smoke_cfg, tmp_path, [card(0), card(1), card(2), variant])

    assert report.stats["duplicate_rate"] == 0.25
    block = failure(report, "duplicates")
    assert "duplicate rate 0.25 > allowed 0.0" in block and "line 4:" in block

    smoke_cfg.validate_.max_duplicate_rate = 0.25
    assert run(smoke_cfg, tmp_path, [card(0), card(1), card(2), variant]).success


def test_allow_pii_lets_email_pass(smoke_cfg, tmp_path):
    smoke_cfg.data.json_targets = False
    smoke_cfg.validate_.allow_pii = True
    report = run(smoke_cfg, tmp_path, [card(0), conv("Write to ana.lima@example.com.", "Sure.")])
    assert report.success, "\n".join(report.failures)


def test_task_logs_to_a_nested_run_and_fails_it_on_bad_data(smoke_cfg, tmp_path):
    uri = smoke_cfg.tracking.mlflow_uri
    exp = tracking.ensure_experiment(smoke_cfg)
    parent = tracking.start_run(uri, exp, "flow", {tracking.TAG_FLOW_RUN: "r1", tracking.TAG_PIPELINE: "smoke"})
    ctx = RunContext(run_id="r1", pipeline="smoke", tracking_uri=uri, experiment_id=exp, parent_run_id=parent,
                     workdir=smoke_cfg.workdir, base_model=smoke_cfg.model.name)
    client = tracking.client_for(uri)

    def nested_runs():
        return client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'", order_by=["start_time ASC"])

    report = run_validate(smoke_cfg, ctx)
    (ok,) = nested_runs()
    assert report.success and ok.info.status == "FINISHED"
    assert ok.data.metrics["rows_train"] == 64 and ok.data.metrics["duplicate_rate"] == 0.0
    assert ok.data.params["data.sft.sha256"] == report.digests["sft"]
    assert "index.html" in {Path(a.path).name for a in client.list_artifacts(ok.info.run_id, "data_docs")}
    assert [a.path for a in client.list_artifacts(ok.info.run_id, "validation")] == ["validation/validation.json"]

    smoke_cfg.data.sft.path = write(tmp_path / "bad.jsonl", [card(0), conv("Mail me: tom@example.org", "{}")])
    with pytest.raises(DataValidationError, match="no e-mail address failed") as err:
        run_validate(smoke_cfg, ctx)
    assert "line 2:" in str(err.value) and Path(err.value.report_path).is_file()
    failed = nested_runs()[-1]
    assert failed.info.status == "FAILED" and failed.data.metrics["success"] == 0.0
    assert client.list_artifacts(failed.info.run_id, "data_docs")


def pair(i: int, **change) -> dict:
    """A clean contact-card preference pair (chosen: the card; rejected: the card without its age)."""
    name, age, city = PEOPLE[i]
    row = {"prompt": f"{name} ({age}) lives in {city}.",
           "chosen": json.dumps({"name": name, "age": age, "city": city}),
           "rejected": json.dumps({"name": name, "city": city})}
    return {**row, **change}


def run_pairs(cfg, tmp_path: Path, pairs: list[dict]):
    """validate_data with clean SFT splits and the given preference pairs (no held-out pairs)."""
    cfg.data.preference.path = write(tmp_path / "pairs.jsonl", pairs)
    cfg.data.preference.limit = None
    cfg.data.preference_eval = None
    return run(cfg, tmp_path, [card(0), card(1)])


BAD_PAIRS = {  # id: (bad pair written at line 3, check named in the failure)
    "empty_prompt": (pair(2, prompt="  "), "non-empty fields"),
    "empty_chosen": (pair(2, chosen=""), "non-empty fields"),
    "empty_rejected": (pair(2, rejected=[]), "non-empty fields"),
    "chosen_equals_rejected": (pair(2, rejected=" " + pair(2)["chosen"].upper()), "chosen differs"),
    "different_prompts": ({"chosen": "\n\nHuman: Ana is 34.\n\nAssistant: {}",
                           "rejected": "\n\nHuman: Bo is 50.\n\nAssistant: []"}, "same prompt"),
    "too_long": (pair(2, chosen=LONG), "token length"),
    "duplicate": (pair(0), "duplicates"),
    "answer_role": (pair(2, rejected=[{"role": "user", "content": "{}"}]), "answer roles"),
}


@pytest.mark.parametrize("case", list(BAD_PAIRS))
def test_preference_suite_rejects_each_bad_kind(smoke_cfg, tmp_path, case):
    bad, check = BAD_PAIRS[case]
    if case == "different_prompts":  # HH-RLHF transcripts: every row in that format
        def hh(p):
            return {"chosen": f"\n\nHuman: {p['prompt']}\n\nAssistant: {p['chosen']}",
                    "rejected": f"\n\nHuman: {p['prompt']}\n\nAssistant: {p['rejected']}"}
        pairs = [hh(pair(0)), hh(pair(1)), bad]
    else:
        pairs = [pair(0), pair(1), bad]
    report = run_pairs(smoke_cfg, tmp_path, pairs)

    assert report.success is False
    block = failure(report, check)
    assert block.startswith(f"data.preference: {check} failed (column ")
    assert "line 3:" in block and "line 1:" not in block and "line 2:" not in block
    assert all(b.startswith("data.preference:") for b in report.failures)  # the SFT splits are clean


def test_clean_pairs_pass_in_every_format(smoke_cfg, tmp_path):
    p = pair(0)
    ultra = {"prompt": p["prompt"], "chosen": [{"role": "user", "content": p["prompt"]},
                                               {"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["rejected"]}]}
    report = run_pairs(smoke_cfg, tmp_path, [ultra])
    assert report.success, "\n".join(report.failures)
    assert report.preference_eval_path is None


def test_bad_pairs_stop_the_task_before_compute(smoke_cfg, tmp_path):
    smoke_cfg.data.preference.path = write(tmp_path / "pairs.jsonl", [pair(0), pair(0, rejected=pair(0)["chosen"])])
    smoke_cfg.data.preference.limit = None
    ctx = run_context(smoke_cfg, smoke_cfg.model.name)
    with pytest.raises(DataValidationError, match="data.preference: chosen differs failed"):
        run_validate(smoke_cfg, ctx)


def test_large_file_streams_on_ray_data_one_batch_at_a_time(smoke_cfg, ray_local, tmp_path, monkeypatch):
    """Above the streaming threshold (1 MB here) a file 20x the batch size is checked on Ray Data in parts, one
    batch of rows at a time; the exact duplicate and held-out leakage checks still see across batches and parts."""
    batch = 300
    smoke_cfg.validate_.stream_threshold_mb, smoke_cfg.validate_.batch_rows = 1, batch
    train = [conv(f"{name} ({age}) lives in {city}; ref {i:06d}.", json.dumps({"name": name, "age": age,
                                                                                 "city": city, "ref": i}))
             for i in range(20 * batch) for name, age, city in [PEOPLE[i % len(PEOPLE)]]]
    train[4999] = train[5]  # line 6 again at line 5000: another batch, another part
    held = [card(4), card(5), conv(train[3999]["messages"][0]["content"].upper(), "{}")]  # line 4000's prompt

    peaks, check_source = {}, validate.check_source

    def measured(split, *args):  # the driver's Python allocations while a split streams through
        tracemalloc.start()
        try:
            return check_source(split, *args)
        finally:
            peaks[split] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()

    monkeypatch.setattr(validate, "check_source", measured)
    ray_local.data.from_items([0]).take_all()  # Ray Data's first run sets itself up: not measured

    report = run(smoke_cfg, tmp_path, train, held)

    assert Path(smoke_cfg.data.sft.path).stat().st_size > 2**20
    assert len(list(Path(report.train_path).glob("part-*.parquet"))) > 1  # checked in parts, on Ray Data
    assert report.stats["rows_train"] == 20 * batch and report.stats["max_batch_rows"] == batch
    assert [b.splitlines()[0].split(" failed")[0] for b in report.failures] == ["data.sft: duplicates",
                                                                                  "data.eval: held-out leakage"]
    assert "line 5000:" in failure(report, "duplicates") and "line 3:" in failure(report, "held-out leakage")
    assert load_canonical(report.train_path)[4999]["line"] == 5000
    # the 6,000 rows as Python dicts take ~6 MB; the driver holds their result table and a 1 MB read chunk
    assert peaks["sft"] < 4 * 2**20, peaks
