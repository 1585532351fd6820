"""Tests for alignpipe.data.shards: JSONL parts that start at a line, and Parquet shards read back per rank."""

from __future__ import annotations

import json
import random
import time

import pyarrow as pa
import pytest

from alignpipe.data import shards
from alignpipe.data.formats import iter_jsonl, load_canonical

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
SCHEMA = pa.schema([("line", pa.int64()), ("messages", MESSAGES)])


@pytest.mark.parametrize("seed", range(20))
def test_parts_cover_every_row_once_with_its_line(tmp_path, seed, monkeypatch):
    rnd = random.Random(seed)
    lines = ["" if rnd.random() < 0.1 else json.dumps({"a": "x" * rnd.randint(0, 30)}) for _ in range(rnd.randint(0, 40))]
    path = tmp_path / "rows.jsonl"
    text = "\n".join(lines) + ("\n" if seed % 2 else "")
    path.write_text(text)
    monkeypatch.setattr(shards, "SCAN_CHUNK", rnd.randint(1, 50))  # part boundaries across read chunks

    parts, total = shards.plan_parts(str(path), rnd.randint(1, 100))

    rows = [(r.pop("__line__"), r) for part in parts for batch in shards.raw_batches(part, 3, None) for r in batch]
    assert rows == list(iter_jsonl(path, None, None))
    assert total == text.count("\n") + (text[-1:] not in ("", "\n"))  # lines, the last one without its newline
    assert all(len(b) <= 3 for part in parts for b in shards.raw_batches(part, 3, None))


def test_ranks_read_disjoint_shares_that_make_up_the_whole(tmp_path):
    """Training workers (ranks of 2 or 3, more than the row groups) each read their own share: none twice, none
    left out, in source order, counts within one of each other."""
    line = 0
    for index in range(3):  # three parts of uneven sizes, one row group per batch of up to 4 rows
        writer = shards.ShardWriter(tmp_path, index, SCHEMA)
        for size in (4, 4, index + 1):
            rows = [{"line": line + i + 1, "messages": [{"role": "user", "content": f"q{line + i + 1}"}]}
                    for i in range(size)]
            line += size
            writer.write(rows)
        writer.close()

    everything = load_canonical(tmp_path)
    assert [r["line"] for r in everything] == list(range(1, line + 1))  # in source order
    assert everything[0]["messages"] == [{"role": "user", "content": "q1"}]
    for world in (2, 3, 5, 30):
        shares = [[r["line"] for r in load_canonical(tmp_path, rank, world)] for rank in range(world)]
        assert sum(shares, []) == list(range(1, line + 1)), world   # disjoint, all of them, in order
        assert max(map(len, shares)) - min(map(len, shares)) <= 1, world
    assert shards.largest_row_group(tmp_path) == 4

    small = tmp_path / "one-group"  # the smoke pipeline's 64 rows are one row group: both ranks still get rows
    writer = shards.ShardWriter(small, 0, SCHEMA)
    writer.write([{"line": i, "messages": []} for i in range(5)])
    writer.close()
    assert [len(load_canonical(small, rank, 2)) for rank in (0, 1)] == [2, 3]


def test_progress_line_has_rate_and_eta():
    out: list[str] = []
    progress = shards.Progress("validate: data.sft", 1000, every=0.0, out=out.append)
    progress.add(250)
    assert out and out[0].startswith("validate: data.sft: 250 rows, ") and "25% of ~1,000, ETA" in out[0]


def test_progress_reaches_the_run_board(progress_board):
    """`alignpipe run` shows validation's rows from the board, like evaluation's."""
    from alignpipe import progress

    shards.Progress("validate: data.sft", 1000, out=lambda line: None).add(1000)
    deadline = time.monotonic() + 30
    while not (entry := progress.read_board().get("validate")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert entry and (entry["kind"], entry["label"], entry["done"], entry["total"]) == ("eval", "data.sft", 1000, 1000)


def test_a_jsonl_file_is_shared_out_the_same_way(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"line": i}) + "\n" for i in range(7)))
    shares = [[r["line"] for r in load_canonical(path, rank, 3)] for rank in range(3)]
    assert shares == [[0, 1], [2, 3], [4, 5, 6]]
    assert [r["line"] for r in load_canonical(path, 2, 3, limit=2)] == [4, 5]
    assert [r["line"] for r in load_canonical(path, limit=3)] == [0, 1, 2]
