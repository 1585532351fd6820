"""Every supported SFT format normalises to the same canonical chat rows."""

import json

import pandas as pd
import pytest

from alignpipe.data.formats import detect_format, load_sft, normalise
from alignpipe.errors import AlignpipeError

EXPECTED = [{"role": "user", "content": "Ana is 34."}, {"role": "assistant", "content": "ok"}]

ROWS = {
    "messages": {"messages": EXPECTED},
    "prompt_completion": {"prompt": "Ana is 34.", "completion": "ok"},
    "alpaca": {"instruction": "Ana is 34.", "input": "", "output": "ok"},
    "sharegpt": {"conversations": [{"from": "human", "value": "Ana is 34."}, {"from": "gpt", "value": "ok"}]},
}


@pytest.mark.parametrize("fmt", list(ROWS))
def test_each_format_normalises(fmt, tmp_path):
    assert detect_format(ROWS[fmt]) == fmt
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[fmt]) + "\n")
    assert load_sft(str(path)) == [{"line": 1, "messages": EXPECTED}]
    assert normalise([ROWS[fmt]], fmt)[0]["messages"] == EXPECTED


def test_system_turns_and_alpaca_input():
    msgs = normalise([{"messages": [{"role": "system", "content": "S"}, *EXPECTED]}])[0]["messages"]
    assert msgs[0] == {"role": "system", "content": "S"}
    alpaca = normalise([{"instruction": "Extract.", "input": "Ana is 34.", "output": "ok"}])[0]["messages"]
    assert alpaca[0]["content"] == "Extract.\n\nAna is 34."
    conversational = normalise([{"prompt": [{"role": "user", "content": "q"}],
                                 "completion": [{"role": "assistant", "content": "a"}]}])[0]["messages"]
    assert conversational == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    gpt = normalise([{"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q"}]}])
    assert [m["role"] for m in gpt[0]["messages"]] == ["system", "user"]


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".json"])
def test_tabular_files(tmp_path, suffix):
    path = tmp_path / f"d{suffix}"
    df = pd.DataFrame([{"prompt": "Ana is 34.", "completion": "ok"}] * 2)
    {".csv": lambda: df.to_csv(path, index=False), ".parquet": lambda: df.to_parquet(path),
     ".json": lambda: path.write_text(df.to_json(orient="records"))}[suffix]()
    rows = load_sft(str(path))
    assert [r["messages"] for r in rows] == [EXPECTED, EXPECTED]


def test_line_numbers_skip_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS["messages"]) + "\n\n" + json.dumps(ROWS["messages"]) + "\n")
    assert [r["line"] for r in load_sft(str(path))] == [1, 3]


def test_invalid_jsonl_line_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS["messages"]) + "\n{broken\n")
    with pytest.raises(AlignpipeError, match=r"d.jsonl:2: invalid JSON"):
        load_sft(str(path))


def test_non_utf8_is_refused(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "caf\xe9", "completion": "x"}\n')
    with pytest.raises(AlignpipeError, match="not UTF-8"):
        load_sft(str(path))


def test_unknown_columns_say_what_is_expected():
    with pytest.raises(AlignpipeError, match="cannot tell the data format"):
        normalise([{"question": "q", "answer": "a"}])


def test_tolerated_inputs_read_as_expected(tmp_path):
    """Not bad input: a UTF-8 BOM (Windows tools write one), CRLF line ends, parquet message lists, and a CSV
    answer that is a JSON object (text to learn, not a structure to unpack)."""
    row = json.dumps(ROWS["messages"]).encode()
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + row + b"\r\n" + row + b"\r\n")
    assert [r["messages"] for r in load_sft(str(bom))] == [EXPECTED, EXPECTED]
    parquet = tmp_path / "d.parquet"
    pd.DataFrame({"messages": [EXPECTED]}).to_parquet(parquet)  # read back as numpy arrays of dicts
    assert load_sft(str(parquet))[0]["messages"] == EXPECTED
    csv = tmp_path / "d.csv"
    pd.DataFrame([{"prompt": "Ana is 34.", "completion": '{"age": 34}'}]).to_csv(csv, index=False)
    assert load_sft(str(csv))[0]["messages"][1] == {"role": "assistant", "content": '{"age": 34}'}
