"""Tests for the deterministic contact-card demo-data generator."""

import json
import re
from pathlib import Path

import pytest

from alignpipe.data.demo import FAILURE_KINDS, contact_card, generate

REPO_DEMO = Path(__file__).resolve().parents[3] / "data" / "demo"
FILES = ("sft_train", "sft_heldout", "pref_train", "pref_heldout")
SMALL = dict(n_train=120, n_heldout=40, n_pref_train=60, n_pref_heldout=30)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _sentence(row: dict) -> str:
    return (row["messages"] if "messages" in row else row["prompt"])[0]["content"]


def _target(row: dict) -> str:
    return (row["messages"][1] if "messages" in row else row["chosen"][0])["content"]


def _failure_kind(rejected: str) -> str:
    """Classify a rejected answer by inspecting its text only."""
    if rejected.startswith("```"):
        return "code_fence"
    if not rejected.startswith("{"):
        return "prose_wrapped"
    card = json.loads(rejected)
    if len(card) != 3:
        return "missing_key"
    if isinstance(card["age"], str):
        return "age_as_string"
    if list(card) != ["name", "age", "city"]:
        return "wrong_key_order"
    return "wrong_value"


@pytest.fixture(scope="module")
def default_data(tmp_path_factory) -> dict[str, Path]:
    return generate(tmp_path_factory.mktemp("default"))


@pytest.fixture(scope="module")
def rows(default_data) -> dict[str, list[dict]]:
    return {name: _rows(path) for name, path in default_data.items()}


def test_contact_card_exact_string():
    assert contact_card("Ana Lima", 34, "Porto") == '{"name": "Ana Lima", "age": 34, "city": "Porto"}'


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path):
    a = generate(tmp_path / "a", seed=7, **SMALL)
    b = generate(tmp_path / "b", seed=7, **SMALL)
    c = generate(tmp_path / "c", seed=8, **SMALL)
    assert set(a) == set(FILES)
    for name in FILES:
        assert a[name].read_bytes() == b[name].read_bytes(), name
        assert a[name].read_bytes() != c[name].read_bytes(), name


def test_committed_demo_data_is_reproducible(default_data):
    for name in FILES:
        committed = REPO_DEMO / f"{name}.jsonl"
        assert committed.is_file(), f"missing {committed}; run `python -m alignpipe.data.demo --out data/demo`"
        assert committed.read_bytes() == default_data[name].read_bytes(), f"{committed} is stale"


def test_row_counts(rows):
    assert {k: len(v) for k, v in rows.items()} == {
        "sft_train": 1200, "sft_heldout": 400, "pref_train": 600, "pref_heldout": 200}


def test_targets_are_exact_cards_grounded_in_the_sentence(rows):
    for name in FILES:
        for row in rows[name]:
            if "messages" in row:
                assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
            sentence, target = _sentence(row), _target(row)
            card = json.loads(target)
            assert list(card) == ["name", "age", "city"]
            assert type(card["age"]) is int and 18 <= card["age"] <= 90
            assert target == contact_card(card["name"], card["age"], card["city"])
            assert card["name"] in sentence and card["city"] in sentence, sentence
            assert re.search(rf"(?<!\d){card['age']}(?!\d)", sentence), sentence
            assert "json" not in sentence.lower() and "{" not in sentence and "@" not in sentence
            assert not re.search(r"\d{5,}", sentence), sentence


def test_no_duplicate_sentences_within_a_split(rows):
    for split in ("train", "heldout"):
        sentences = [_norm(_sentence(r)) for n in FILES if n.endswith(split) for r in rows[n]]
        assert len(sentences) == len(set(sentences)), split


def test_heldout_disjoint_from_train(rows):
    def values(split: str, key: str) -> set:
        return {json.loads(_target(r))[key] for n in FILES if n.endswith(split) for r in rows[n]}

    for key in ("name", "city"):
        assert not values("train", key) & values("heldout", key), key
    first_names = lambda split: {name.split()[0] for name in values(split, "name")}  # noqa: E731
    assert not first_names("train") & first_names("heldout")
    train_sentences = {_norm(_sentence(r)) for n in ("sft_train", "pref_train") for r in rows[n]}
    for name in ("sft_heldout", "pref_heldout"):
        assert not {_norm(_sentence(r)) for r in rows[name]} & train_sentences, name
    # Pools are large enough to matter for a held-out evaluation.
    assert len(values("train", "city")) >= 40 and len(values("heldout", "city")) >= 40


def test_preference_rows(rows):
    for name in ("pref_train", "pref_heldout"):
        for row in rows[name]:
            assert set(row) == {"prompt", "chosen", "rejected"}
            assert [m["role"] for m in row["prompt"]] == ["user"]
            assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
            assert row["rejected"][0]["content"] != row["chosen"][0]["content"]
    kinds = [_failure_kind(r["rejected"][0]["content"]) for r in rows["pref_train"]]
    assert set(kinds) == set(FAILURE_KINDS)
    # Wrong values cover the age, the city and the name.
    wrong_fields = set()
    for row, kind in zip(rows["pref_train"], kinds):
        if kind == "wrong_value":
            good, bad = json.loads(row["chosen"][0]["content"]), json.loads(row["rejected"][0]["content"])
            wrong_fields |= {k for k in good if good[k] != bad[k]}
    assert wrong_fields == {"name", "age", "city"}
