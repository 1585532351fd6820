"""Every supported preference format normalises to the same canonical pairs."""

import json

import pytest

from alignpipe.data.preference import (detect_preference_format, load_preference, normalise_preference,
                                       to_unpaired)
from alignpipe.errors import AlignpipeError
from testlib import DEMO_DATA

PROMPT = [{"role": "user", "content": "Ana is 34."}]
CHOSEN = [{"role": "assistant", "content": "good"}]
REJECTED = [{"role": "assistant", "content": "bad"}]
CANONICAL = {"line": 1, "prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}

ROWS = {
    "prompt_chosen_rejected": {"prompt": "Ana is 34.", "chosen": "good", "rejected": "bad"},
    "messages": {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED},
    "hh_rlhf": {"chosen": "\n\nHuman: Ana is 34.\n\nAssistant: good", "rejected": "\n\nHuman: Ana is 34.\n\nAssistant: bad"},
    "ultrafeedback": {"prompt": "Ana is 34.", "chosen": PROMPT + CHOSEN, "rejected": PROMPT + REJECTED,
                      "score_chosen": 8.0, "score_rejected": 3.0},
}


@pytest.mark.parametrize("name", list(ROWS))
def test_each_format_normalises(name, tmp_path):
    fmt = "prompt_chosen_rejected" if name == "messages" else name
    assert detect_preference_format(ROWS[name]) == fmt
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(ROWS[name]) + "\n")
    assert load_preference(str(path)) == [CANONICAL]
    assert normalise_preference([ROWS[name]], fmt) == [CANONICAL]


def test_multi_turn_transcripts_keep_the_shared_prompt():
    hh = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: Ana is 34.\n\nAssistant: good",
          "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: Ana is 34.\n\nAssistant: bad"}
    row = normalise_preference([hh])[0]
    assert [m["role"] for m in row["prompt"]] == ["user", "assistant", "user"]
    assert row["prompt"][0]["content"] == "hi" and row["chosen"] == CHOSEN and row["rejected"] == REJECTED
    assert "rejected_prompt" not in row


def test_mismatched_prompts_are_kept_for_validation():
    hh = {"chosen": "\n\nHuman: Ana is 34.\n\nAssistant: good", "rejected": "\n\nHuman: Bo is 50.\n\nAssistant: bad"}
    row = normalise_preference([hh])[0]
    assert row["rejected_prompt"] == [{"role": "user", "content": "Bo is 50."}]


def test_unknown_columns_are_refused():
    with pytest.raises(AlignpipeError, match="preference format"):
        detect_preference_format({"question": "q", "answer": "a"})
    with pytest.raises(AlignpipeError, match="no prompt"):
        detect_preference_format({"chosen": "good", "rejected": "bad"})


def test_demo_pairs_and_unpaired_rows():
    rows = load_preference(str(DEMO_DATA / "pref_train.jsonl"), limit=4)
    assert [r["line"] for r in rows] == [1, 2, 3, 4]
    assert all(r["chosen"][0]["role"] == "assistant" and r["chosen"] != r["rejected"] for r in rows)
    kto = to_unpaired(rows[:1])
    assert [k["label"] for k in kto] == [True, False]
    assert kto[0]["completion"] == rows[0]["chosen"] and kto[1]["completion"] == rows[0]["rejected"]
