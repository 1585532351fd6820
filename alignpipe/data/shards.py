"""Stream a data file in batches of rows, on this process or on Ray Data, and keep the result as Parquet shards.

`validate` reads a source in parts (byte ranges of a JSONL file that start at a line, or the whole file), checks
each batch of rows and writes the normalised rows of each part to one Parquet file, one row group per batch; only
one batch of rows is held at a time. The training stages read those shards back (`read_shards`), each Ray Train
worker only its own contiguous share of the rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from alignpipe.data.formats import check_file, iter_jsonl, read_rows

SCAN_CHUNK = 2**20  # bytes read at a time when finding part boundaries and counting lines


class Part(BaseModel):
    """One part of a source: a byte range of a JSONL file starting at a line (end None = to the end), or the
    whole of any other file. Crosses the Ray boundary."""

    path: str
    index: int = 0
    start: int = 0
    end: int | None = None
    first_line: int = 1
    limit: int | None = None


def plan_parts(path: str, part_bytes: int) -> tuple[list[Part], int]:
    """Cut a JSONL file into parts of about `part_bytes`, each starting at a line, and count its lines (for
    progress). Reads the file once, a chunk at a time."""
    parts, start, first, lines, base, last = [], 0, 1, 0, 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(SCAN_CHUNK):
            pos = 0
            while (cut := start + part_bytes - base) < len(chunk):  # close the part at the next newline
                nl = chunk.find(b"\n", max(cut, pos))
                if nl < 0:
                    break
                parts.append(Part(path=path, index=len(parts), start=start, end=base + nl + 1, first_line=first))
                start, first, pos = base + nl + 1, lines + chunk.count(b"\n", 0, nl + 1) + 1, nl + 1
            lines, base, last = lines + chunk.count(b"\n"), base + len(chunk), chunk[-1:]
    if start < base or not parts:
        parts.append(Part(path=path, index=len(parts), start=start, end=None, first_line=first))
    return parts, lines + (last != b"\n")


def raw_batches(part: Part, batch_rows: int, max_line_bytes: int | None) -> Iterator[list[dict[str, Any]]]:
    """The part's rows (each with its `__line__`) in lists of at most `batch_rows`: streamed from a JSONL file,
    read whole from any other kind of source (JSON, CSV, Parquet, the hub)."""
    if part.path.endswith(".jsonl") and not part.path.startswith("hf://"):
        rows = (dict(row, __line__=line) for line, row in iter_jsonl(
            check_file(part.path), part.limit, max_line_bytes, part.start, part.end, part.first_line))
    else:
        rows = iter(read_rows(part.path, part.limit, max_line_bytes))
    while batch := [row for _, row in zip(range(batch_rows), rows)]:
        yield batch


class ShardWriter:
    """Writes one part's normalised rows to `<folder>/part-<index>.parquet`, one row group per batch."""

    def __init__(self, folder: str | Path, index: int, schema):
        import pyarrow.parquet as pq

        Path(folder).mkdir(parents=True, exist_ok=True)
        self.schema, self.path = schema, Path(folder) / f"part-{index:05d}.parquet"
        self.writer = pq.ParquetWriter(str(self.path), schema)

    def write(self, rows: list[dict[str, Any]]) -> None:
        import pyarrow as pa

        if rows:
            self.writer.write_table(pa.Table.from_pylist(rows, schema=self.schema))

    def close(self) -> None:
        self.writer.close()


def read_shards(folder: str | Path, rank: int = 0, world_size: int = 1, limit: int | None = None) -> list[dict[str, Any]]:
    """The canonical rows of a shard folder in source order; with `world_size` > 1, only rank `rank`'s contiguous
    share of them (rows `total * rank // world_size` up to the next rank's first): disjoint across ranks, together
    all of them, counts within one of each other, whatever the row groups; its first `limit` rows when given. Reads
    only the row groups it needs."""
    import pyarrow.parquet as pq

    files = [pq.ParquetFile(path) for path in sorted(Path(folder).glob("part-*.parquet"))]
    groups = [(f, i, f.metadata.row_group(i).num_rows) for f in files for i in range(f.num_row_groups)]
    total = sum(n for _, _, n in groups)
    lo, hi = total * rank // world_size, total * (rank + 1) // world_size
    hi = hi if limit is None else min(hi, lo + limit)
    rows, offset = [], 0
    for f, i, n in groups:
        start, stop = max(lo, offset), min(hi, offset + n)
        if start < stop:
            rows += [{k: v for k, v in row.items() if v is not None}
                     for row in f.read_row_group(i).slice(start - offset, stop - start).to_pylist()]
        offset += n
    return rows


def largest_row_group(folder: str | Path) -> int:
    """Rows in the largest row group of a shard folder: the largest batch that was checked and written at once."""
    import pyarrow.parquet as pq

    return max((meta.row_group(i).num_rows for path in Path(folder).glob("part-*.parquet")
                for meta in [pq.read_metadata(path)] for i in range(meta.num_row_groups)), default=0)


class Progress:
    """Prints rows done, rows/s and the time left for a long pass, at most every `every` seconds, and reports them
    to the run's progress board (`alignpipe.progress`) as `stage`'s rows, where `alignpipe run` shows them."""

    def __init__(self, label: str, total: int | None, every: float = 5.0, out: Callable[[str], None] = print,
                 stage: str = "validate"):
        from alignpipe import progress

        self.label, self.total, self.every, self.out = label, total, every, out
        self.reporter = progress.Reporter(stage)  # a no-op without a board (tests, benchmarks, before Ray starts)
        self.t0 = self.last = time.perf_counter()
        self.done = 0

    def add(self, rows: int) -> None:
        self.done += rows
        now = time.perf_counter()
        total = max(self.total or 0, self.done)
        # shown like evaluation's rows: `validate: data.sft 120000/1000000 rows (12%), ETA 1m45s`
        self.reporter.report(final=self.done >= total, kind="eval", label=self.label.rsplit(" ", 1)[-1],
                             done=self.done, total=total, eta_s=self.eta_s(now))
        if now - self.last >= self.every:
            self.last = now
            self.out(self.line(now))

    def eta_s(self, now: float) -> float | None:
        rate = self.done / max(now - self.t0, 1e-9)
        return max(self.total - self.done, 0) / rate if self.total and rate > 0 else None

    def line(self, now: float | None = None) -> str:
        now = now or time.perf_counter()
        text = f"{self.label}: {self.done:,} rows, {self.done / max(now - self.t0, 1e-9):,.0f} rows/s"
        if (eta := self.eta_s(now)) is not None:
            text += f", {min(self.done / self.total, 1):.0%} of ~{self.total:,}, ETA {eta:.0f} s"
        return text
