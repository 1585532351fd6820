"""Read SFT data in any supported format and normalise it to one canonical chat form.

Canonical row: `{"line": <1-based source row>, "messages": [{"role": ..., "content": ...}, ...]}`.
Supported inputs: OpenAI `messages`, `prompt`/`completion` (strings or message lists), Alpaca
(`instruction`/`input`/`output`) and ShareGPT (`conversations` of `from`/`value`).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from alignpipe.errors import AlignpipeError

FORMATS = ("messages", "prompt_completion", "alpaca", "sharegpt")
REQUIRED = {"messages": ("messages",), "prompt_completion": ("prompt", "completion"),
            "alpaca": ("instruction", "output"), "sharegpt": ("conversations",)}
BOM = b"\xef\xbb\xbf"  # Windows tools (Excel, Notepad) start UTF-8 files with it; it is not data


class RowError(ValueError):
    """A row's structure is wrong; `normalise` adds the file and line to the message."""
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def read_rows(path: str, limit: int | None = None, max_line_bytes: int | None = None) -> list[dict[str, Any]]:
    """Read a local JSONL/JSON/CSV/Parquet file (or `hf://id[:split]`) into a list of dicts.

    Args:
        path: the file, or `hf://<dataset id>[:split]`.
        limit: read only the first N rows (streamed for .jsonl and .csv).
        max_line_bytes: refuse a JSONL line longer than this, without reading the rest of it (None = no cap).

    Raises:
        AlignpipeError: unreadable file, bad encoding, or an invalid row (with its line number).
    """
    if path.startswith("hf://"):
        return _read_hub(path[len("hf://") :], limit)
    p = check_file(path)
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return [dict(row, __line__=lineno) for lineno, row in iter_jsonl(p, limit, max_line_bytes)]
    if suffix == ".json":
        try:
            data = json.loads(_read_text(p))
        except json.JSONDecodeError as exc:
            raise AlignpipeError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}, column {exc.colno}); "
                                 "fix the file or convert it to .jsonl, one row per line") from None
        if not isinstance(data, list):
            raise AlignpipeError(f"{path}: a .json file must hold a list of rows, got a JSON {_kind(data)}; "
                                 "use .jsonl for one row per line")
        for i, item in enumerate(data[:limit], start=1):
            if not isinstance(item, dict):
                raise AlignpipeError(f"{path}: item {i} of the list must be a JSON object (one row), got {_kind(item)}")
        return [dict(row, __line__=i) for i, row in enumerate(data[:limit], start=1)]
    if suffix in (".csv", ".parquet"):
        import pandas as pd

        try:  # CSV cells stay text: an empty cell is "" (not the float NaN, which would train as the word "nan")
            df = (pd.read_csv(p, nrows=limit, dtype=str, keep_default_na=False, encoding="utf-8-sig")
                  if suffix == ".csv" else pd.read_parquet(p))
        except UnicodeDecodeError as exc:
            raise AlignpipeError(f"{path}: not UTF-8 text (byte {exc.start}); re-encode the file as UTF-8") from None
        except (ValueError, OSError) as exc:
            raise AlignpipeError(f"{path}: cannot read {suffix[1:]} file: {exc}") from None
        rows = df.head(limit).to_dict("records") if limit else df.to_dict("records")
        # CSV header = line 1, so row i is on line i + 1; parquet has no lines: its row number
        offset = 1 if suffix == ".csv" else 0
        return [{**{k: _maybe_json(_plain(v)) for k, v in row.items()}, "__line__": i + offset}
                for i, row in enumerate(rows, start=1)]
    raise AlignpipeError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .csv or .parquet")


def check_file(path: str) -> Path:
    """The path of an existing data file; a folder or a missing file is a clear error."""
    p = Path(path)
    if p.is_dir():
        raise AlignpipeError(f"{path}: is a folder, not a file; point at the .jsonl/.json/.csv/.parquet file in it")
    if not p.is_file():
        raise AlignpipeError(f"{path}: no such file")
    return p


def detect_format(row: dict[str, Any], source: str = "") -> str:
    """Name the format of one row from its keys (`source` names the file in the error)."""
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    raise AlignpipeError(
        f"{source + ': ' if source else ''}cannot tell the data format from the columns "
        f"{', '.join(row_columns(row)) or '(none)'}; expected one of: "
        "messages | prompt+completion | instruction+output (Alpaca) | conversations (ShareGPT), "
        "or set data.<source>.format"
    )


def normalise(rows: list[dict[str, Any]], fmt: str = "auto", source: str = "",
              detected: bool = False) -> list[dict[str, Any]]:
    """Convert rows to canonical `{"line", "messages"}` rows. Bad content is kept for validation to report.

    Args:
        rows: rows from `read_rows` (each with its `__line__`).
        fmt: one of FORMATS, or `auto` to detect it from the first row's columns.
        source: the file, named in error messages.
        detected: `fmt` was detected from the file's first row (a later batch of a streamed file), not configured.

    Raises:
        AlignpipeError: a row lacks its format's columns or holds a wrong type (file and line named).
    """
    converters = {"messages": _from_messages, "prompt_completion": _from_prompt_completion, "alpaca": _from_alpaca,
                  "sharegpt": _from_sharegpt}
    return [{"line": line, "messages": msgs}
            for line, msgs in convert_rows(rows, fmt, source, detect_format, converters, REQUIRED, detected)]


def convert_rows(rows: list[dict[str, Any]], fmt: str, source: str, detect: Callable[[dict, str], str],
                 converters: dict[str, Callable[[dict], Any]], required: dict[str, tuple[str, ...]],
                 detected: bool = False):
    """(line, converted row) for each row, through its format's converter (`auto`: detected from the first row;
    `detected`: `fmt` was detected earlier, from the first row of the file).

    Raises:
        AlignpipeError: a row lacks its format's columns or holds a wrong type (file and line named).
    """
    detected = detected or fmt == "auto"
    if fmt == "auto" and rows:
        fmt = detect(rows[0], source)
    for i, row in enumerate(rows, start=1):
        line = row.get("__line__", i)
        where = f"{source}:{line}" if source else f"line {line}"
        check_columns(row, required[fmt], fmt, detected, where)
        try:
            converted = converters[fmt](row)
        except RowError as exc:
            raise AlignpipeError(f"{where}: {exc}") from None
        yield line, converted


def check_columns(row: dict[str, Any], required: tuple[str, ...], fmt: str, detected: bool, where: str) -> None:
    """Every row of a file needs its format's columns (a row of another format says so, with its line)."""
    missing = [c for c in required if c not in row]
    if missing:
        how = "detected from the first row" if detected else "set by data.<split>.format"
        raise AlignpipeError(f"{where}: no {' or '.join(map(repr, missing))} column; the format is {fmt!r} ({how}), "
                             f"so every row needs {', '.join(required)}; columns here: "
                             f"{', '.join(row_columns(row)) or '(none)'}")


def load_sft(path: str, fmt: str = "auto", limit: int | None = None,
             max_line_bytes: int | None = None) -> list[dict[str, Any]]:
    """Read and normalise one SFT source (see `read_rows` for the line cap)."""
    return normalise(read_rows(path, limit, max_line_bytes), fmt, path)


def write_jsonl(rows: list[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def load_canonical(path: str | Path, rank: int = 0, world_size: int = 1,
                   limit: int | None = None) -> list[dict[str, Any]]:
    """Read canonical rows: a JSONL file written by `write_jsonl`, or a folder of Parquet shards written by
    `validate` (`alignpipe.data.shards`), of which `rank` of `world_size` reads only its own share (disjoint);
    only the first `limit` rows (of the share) when given."""
    if Path(path).is_dir():
        from alignpipe.data.shards import read_shards

        return read_shards(path, rank, world_size, limit)
    if world_size == 1:
        return [row for _, row in iter_jsonl(Path(path), limit, None)]
    rows = [row for _, row in iter_jsonl(Path(path), None, None)]  # a JSONL file: read whole, then the same share
    share = rows[len(rows) * rank // world_size : len(rows) * (rank + 1) // world_size]
    return share if limit is None else share[:limit]


def text_field(value: Any, where: str) -> str:
    """A text field: None becomes "" (validate reports it as blank); any other non-string is refused."""
    if value is not None and not isinstance(value, str):
        raise RowError(f"{where} must be a string, got {_kind(value)} {_short(value)}")
    return value or ""


def make_message(role: Any, content: Any, where: str = "message") -> dict[str, str]:
    return {"role": text_field(role, f"{where}.role"), "content": text_field(content, f"{where}.content")}


def as_messages(value: Any, default_role: str, where: str = "value") -> list[dict[str, str]]:
    """A string (one message of `default_role`) or a list of {role, content} objects."""
    if isinstance(value, list):
        out = []
        for i, m in enumerate(value):
            if not isinstance(m, dict):
                raise RowError(f"{where}[{i}] must be an object with role and content, got {_kind(m)} {_short(m)}")
            out.append(make_message(m.get("role"), m.get("content"), f"{where}[{i}]"))
        return out
    if value is not None and not isinstance(value, str):
        raise RowError(f"{where} must be a string or a list of messages, got {_kind(value)} {_short(value)}")
    return [{"role": default_role, "content": value or ""}]


def _from_messages(row):
    value = row.get("messages")
    if value is not None and not isinstance(value, list):
        raise RowError(f"messages must be a list of {{role, content}} objects, got {_kind(value)} {_short(value)}")
    return as_messages(value or [], "user", "messages")


def _from_prompt_completion(row):
    return as_messages(row.get("prompt"), "user", "prompt") + as_messages(row.get("completion"), "assistant",
                                                                           "completion")


def _from_alpaca(row):
    instruction, extra = text_field(row.get("instruction"), "instruction"), text_field(row.get("input"), "input")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    msgs = [make_message("system", row["system"], "system")] if row.get("system") else []
    return msgs + [make_message("user", user), make_message("assistant", row.get("output"), "output")]


def _from_sharegpt(row):
    turns = row.get("conversations") or []
    if not isinstance(turns, list):
        raise RowError(f"conversations must be a list of {{from, value}} objects, got {_kind(turns)} {_short(turns)}")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise RowError(f"conversations[{i}] must be an object with from and value, got {_kind(t)} {_short(t)}")
        role = t.get("from")
        role = SHAREGPT_ROLES.get(role.lower(), role) if isinstance(role, str) else role
        out.append(make_message(role, t.get("value"), f"conversations[{i}]"))
    return out


def row_columns(row: dict[str, Any]) -> list[str]:
    return sorted(str(k) for k in row if k != "__line__")


def _kind(value: Any) -> str:
    """JSON's name for a Python value's type, as the user wrote it."""
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return f"({text[:40]}...)" if len(text) > 40 else f"({text})"


def _plain(value: Any) -> Any:
    """Parquet list columns arrive as numpy arrays (of dicts, of arrays): make them plain lists and dicts."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _maybe_json(value: Any) -> Any:
    """A CSV cell holding a JSON list of message objects becomes that list; any other text stays text (a JSON
    object answer is the answer, not a structure to unpack)."""
    if isinstance(value, str) and value[:1] == "[":
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return value
        return parsed if parsed and all(isinstance(m, dict) for m in parsed) else value
    return value


def _read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8-sig")  # a leading BOM is not data
    except UnicodeDecodeError as exc:
        raise AlignpipeError(f"{p}: not UTF-8 text (byte {exc.start}); re-encode the file as UTF-8") from None


def iter_jsonl(p: Path, limit: int | None, max_line_bytes: int | None, start: int = 0, end: int | None = None,
               first_line: int = 1) -> Iterator[tuple[int, dict[str, Any]]]:
    """Stream a JSONL file line by line, so a huge file is never loaded whole (nor one huge line).

    `start`/`end` (byte offsets at line starts) and `first_line` (the line number at `start`) read one range of it.
    """
    count = 0
    with p.open("rb") as f:
        f.seek(start)
        for lineno in itertools.count(first_line):
            if limit is not None and count >= limit:
                return
            if end is not None and f.tell() >= end:
                return
            raw = f.readline(-1 if max_line_bytes is None else max_line_bytes + 1)
            if not raw:
                return
            if max_line_bytes is not None and len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                raise AlignpipeError(
                    f"{p}:{lineno}: line is longer than validate.max_line_kb ({max_line_bytes // 1024} KB); "
                    "a conversation within validate.max_tokens is a few KB: check that the file is JSONL (one row "
                    "per line), drop the row, or raise validate.max_line_kb")
            try:
                text = (raw.removeprefix(BOM) if lineno == 1 else raw).decode("utf-8").strip()
            except UnicodeDecodeError:
                raise AlignpipeError(f"{p}:{lineno}: not UTF-8 text; re-encode the file as UTF-8") from None
            if not text:
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise AlignpipeError(f"{p}:{lineno}: invalid JSON ({exc.msg}); fix or remove that line") from None
            if not isinstance(row, dict):
                raise AlignpipeError(f"{p}:{lineno}: each line must be a JSON object, got {_kind(row)}")
            count += 1
            yield lineno, row


def _read_hub(spec: str, limit: int | None) -> list[dict[str, Any]]:
    from datasets import load_dataset

    name, _, split = spec.partition(":")
    try:
        ds = load_dataset(name, split=split or "train")
    except Exception as exc:  # the hub is often unreachable: say so plainly
        raise AlignpipeError(f"hf://{spec}: cannot load from the hub ({exc}); download it and point at a local file") from None
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    return [dict(r, __line__=i) for i, r in enumerate(ds, start=1)]
