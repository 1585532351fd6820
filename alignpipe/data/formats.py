"""Read SFT data in any supported format and normalise it to one canonical chat form.

Canonical row: `{"line": <1-based source row>, "messages": [{"role": ..., "content": ...}, ...]}`.
Supported inputs: OpenAI `messages`, `prompt`/`completion` (strings or message lists), Alpaca
(`instruction`/`input`/`output`) and ShareGPT (`conversations` of `from`/`value`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alignpipe.errors import AlignpipeError

FORMATS = ("messages", "prompt_completion", "alpaca", "sharegpt")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def read_rows(path: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Read a local JSONL/JSON/CSV/Parquet file (or `hf://id[:split]`) into a list of dicts.

    Raises:
        AlignpipeError: unreadable file, bad encoding or an invalid JSONL line (with its line number).
    """
    if path.startswith("hf://"):
        return _read_hub(path[len("hf://") :], limit)
    p = Path(path)
    if not p.is_file():
        raise AlignpipeError(f"{path}: no such file")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return [dict(row, __line__=lineno) for lineno, row in _iter_jsonl(p, limit)]
    if suffix == ".json":
        data = json.loads(_read_text(p))
        if not isinstance(data, list):
            raise AlignpipeError(f"{path}: a .json file must hold a list of rows; use .jsonl for one row per line")
        return data[:limit]
    if suffix in (".csv", ".parquet"):
        import pandas as pd

        try:
            df = pd.read_csv(p, nrows=limit) if suffix == ".csv" else pd.read_parquet(p)
        except (ValueError, UnicodeDecodeError, OSError) as exc:
            raise AlignpipeError(f"{path}: cannot read {suffix[1:]} file: {exc}") from None
        rows = df.head(limit).to_dict("records") if limit else df.to_dict("records")
        return [{k: _maybe_json(v) for k, v in row.items()} for row in rows]
    raise AlignpipeError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .csv or .parquet")


def detect_format(row: dict[str, Any]) -> str:
    """Name the format of one row from its keys."""
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    raise AlignpipeError(
        f"cannot tell the data format from the columns {sorted(row)}; expected one of: "
        "messages | prompt+completion | instruction+output (Alpaca) | conversations (ShareGPT), "
        "or set data.<source>.format"
    )


def normalise(rows: list[dict[str, Any]], fmt: str = "auto") -> list[dict[str, Any]]:
    """Convert rows to canonical `{"line", "messages"}` rows. Bad content is kept for validation to report."""
    if not rows:
        return []
    if fmt == "auto":
        fmt = detect_format(rows[0])
    convert = {"messages": _from_messages, "prompt_completion": _from_prompt_completion,
               "alpaca": _from_alpaca, "sharegpt": _from_sharegpt}[fmt]
    out = []
    for i, row in enumerate(rows, start=1):
        line = row.get("__line__", i)
        msgs = convert(row)
        out.append({"line": line, "messages": msgs})
    return out


def load_sft(path: str, fmt: str = "auto", limit: int | None = None) -> list[dict[str, Any]]:
    """Read and normalise one SFT source."""
    return normalise(read_rows(path, limit), fmt)


def write_jsonl(rows: list[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def load_canonical(path: str | Path) -> list[dict[str, Any]]:
    """Read a canonical JSONL file written by `write_jsonl`."""
    return [row for _, row in _iter_jsonl(Path(path), None)]


def _msg(role: Any, content: Any) -> dict[str, str]:
    return {"role": "" if role is None else str(role), "content": "" if content is None else str(content)}


def _as_messages(value: Any, default_role: str) -> list[dict[str, str]]:
    if isinstance(value, list):
        return [_msg(m.get("role"), m.get("content")) if isinstance(m, dict) else _msg(None, m) for m in value]
    return [_msg(default_role, value)]


def _from_messages(row):
    return _as_messages(row.get("messages") or [], "user")


def _from_prompt_completion(row):
    return _as_messages(row.get("prompt"), "user") + _as_messages(row.get("completion"), "assistant")


def _from_alpaca(row):
    instruction, extra = row.get("instruction") or "", row.get("input") or ""
    user = f"{instruction}\n\n{extra}" if str(extra).strip() else instruction
    msgs = [_msg("system", row["system"])] if row.get("system") else []
    return msgs + [_msg("user", user), _msg("assistant", row.get("output"))]


def _from_sharegpt(row):
    turns = row.get("conversations") or []
    return [_msg(SHAREGPT_ROLES.get(str(t.get("from", "")).lower(), t.get("from")), t.get("value"))
            if isinstance(t, dict) else _msg(None, t) for t in turns]


def _maybe_json(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise AlignpipeError(f"{p}: not UTF-8 text (byte {exc.start}); re-encode the file as UTF-8") from None


def _iter_jsonl(p: Path, limit: int | None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Stream a JSONL file line by line, so a huge file is never loaded whole."""
    count = 0
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if limit is not None and count >= limit:
                return
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise AlignpipeError(f"{p}:{lineno}: not UTF-8 text; re-encode the file as UTF-8") from None
            if not text:
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise AlignpipeError(f"{p}:{lineno}: invalid JSON ({exc.msg}); fix or remove that line") from None
            if not isinstance(row, dict):
                raise AlignpipeError(f"{p}:{lineno}: each line must be a JSON object, got {type(row).__name__}")
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
