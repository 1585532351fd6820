"""Read preference pairs in any supported format and normalise them to one canonical form.

Canonical row: `{"line": <1-based source row>, "prompt": [messages], "chosen": [assistant messages],
"rejected": [assistant messages]}`, plus `"rejected_prompt": [messages]` only when the source gave the
rejected answer a different conversation than the chosen one (validation reports such rows).
Supported inputs:
- `prompt_chosen_rejected`: `prompt`/`chosen`/`rejected` as strings or message lists;
- `hh_rlhf`: Anthropic HH-RLHF transcripts, full `chosen`/`rejected` texts of `\\n\\nHuman:` /
  `\\n\\nAssistant:` turns; the last assistant turn is the answer, the turns before it the prompt;
- `ultrafeedback`: UltraFeedback-binarized rows whose `chosen`/`rejected` message lists include the prompt turns.
"""

from __future__ import annotations

import re
from typing import Any

from alignpipe.data.formats import as_messages, convert_rows, make_message, read_rows, row_columns, text_field
from alignpipe.errors import AlignpipeError

PREFERENCE_FORMATS = ("prompt_chosen_rejected", "hh_rlhf", "ultrafeedback")
REQUIRED = {"prompt_chosen_rejected": ("prompt", "chosen", "rejected"), "hh_rlhf": ("chosen", "rejected"),
            "ultrafeedback": ("chosen", "rejected")}
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def detect_preference_format(row: dict[str, Any], source: str = "") -> str:
    """Name the format of one preference row from its keys and value types (`source` names the file)."""
    where = f"{source}: " if source else ""
    if "chosen" not in row or "rejected" not in row:
        raise AlignpipeError(
            f"{where}cannot tell the preference format from the columns {', '.join(row_columns(row)) or '(none)'}; "
            "expected prompt+chosen+rejected, HH-RLHF chosen+rejected transcripts, or UltraFeedback chosen+rejected "
            "message lists, or set data.preference.format"
        )
    chosen = row["chosen"]
    if isinstance(chosen, str) and "prompt" not in row and HH_TURN.search(chosen):
        return "hh_rlhf"
    if isinstance(chosen, list) and any(isinstance(m, dict) and m.get("role") != "assistant" for m in chosen):
        return "ultrafeedback"
    if "prompt" in row:
        return "prompt_chosen_rejected"
    raise AlignpipeError(
        f"{where}preference rows have chosen/rejected but no prompt, and they are neither HH-RLHF transcripts "
        "(\\n\\nHuman: / \\n\\nAssistant: turns) nor message lists that include the prompt; add a `prompt` column"
    )


def normalise_preference(rows: list[dict[str, Any]], fmt: str = "auto", source: str = "",
                         detected: bool = False) -> list[dict[str, Any]]:
    """Convert rows to canonical pairs. Bad content (blank answers, mismatched prompts) is kept for validation.

    Raises:
        AlignpipeError: a row lacks its format's columns or holds a wrong type (file and line named).
    """
    converters = {"prompt_chosen_rejected": _from_prompt_chosen_rejected, "hh_rlhf": _from_hh,
                  "ultrafeedback": _from_ultrafeedback}
    out = []
    for line, (prompt, chosen, rejected_prompt, rejected) in convert_rows(rows, fmt, source, detect_preference_format,
                                                                          converters, REQUIRED, detected):
        canonical = {"line": line, "prompt": prompt, "chosen": chosen, "rejected": rejected}
        if rejected_prompt != prompt:
            canonical["rejected_prompt"] = rejected_prompt
        out.append(canonical)
    return out


def load_preference(path: str, fmt: str = "auto", limit: int | None = None,
                    max_line_bytes: int | None = None) -> list[dict[str, Any]]:
    """Read and normalise one preference source (see `formats.read_rows` for the line cap)."""
    return normalise_preference(read_rows(path, limit, max_line_bytes), fmt, path)


def as_conversations(row: dict[str, Any], system_prompt: str | None) -> dict[str, list[dict[str, str]]]:
    """A canonical pair as TRL's conversational preference example, with the configured system turn."""
    from alignpipe.chat import with_system

    return {"prompt": with_system(row["prompt"], system_prompt), "chosen": row["chosen"], "rejected": row["rejected"]}


def to_unpaired(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pairs -> KTO's unpaired rows: each chosen answer desirable (label True), each rejected one not."""
    return [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
            for r in rows for side in ("chosen", "rejected")]


def _split_last_answer(msgs: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Conversation -> (turns before the last assistant turn, [that turn]); no assistant turn: ([...], [])."""
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    if last is None:
        return msgs, []
    return msgs[:last], msgs[last:]


def _from_prompt_chosen_rejected(row):
    prompt = as_messages(row.get("prompt"), "user", "prompt")
    chosen = as_messages(row.get("chosen"), "assistant", "chosen")
    rejected = as_messages(row.get("rejected"), "assistant", "rejected")
    return prompt, chosen, prompt, rejected


def _from_ultrafeedback(row):
    return _both_sides(lambda side: as_messages(row.get(side), "assistant", side))


def _from_hh(row):
    return _both_sides(lambda side: _hh_turns(text_field(row.get(side), side)))


def _both_sides(conversation):
    """(chosen prompt, chosen answer, rejected prompt, rejected answer) from each side's whole conversation."""
    chosen_prompt, chosen = _split_last_answer(conversation("chosen"))
    rejected_prompt, rejected = _split_last_answer(conversation("rejected"))
    return chosen_prompt, chosen, rejected_prompt, rejected


def _hh_turns(text: str) -> list[dict[str, str]]:
    """`\\n\\nHuman: a\\n\\nAssistant: b` -> chat messages (text before the first marker is dropped)."""
    parts = HH_TURN.split(text)
    return [make_message(HH_ROLES[role], content.strip()) for role, content in zip(parts[1::2], parts[2::2])]
