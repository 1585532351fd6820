"""Loss masks cover exactly the assistant answers (and their end-of-turn), in every turn."""

from alignpipe import chat
from alignpipe.chat import split_prompt_answer, tokenize_for_sft, with_system
from alignpipe.models import load_tokenizer


def test_masks_cover_every_assistant_turn_and_nothing_else(tiny_model):
    tok = load_tokenizer(tiny_model)
    msgs = with_system([
        {"role": "user", "content": "first question"}, {"role": "assistant", "content": "ANSWER ONE"},
        {"role": "user", "content": "second question"}, {"role": "assistant", "content": "ANSWER TWO"},
    ], "Be brief.")
    enc = tokenize_for_sft(tok, msgs, max_length=512)
    learned = tok.decode([t for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if m])
    assert learned == f"ANSWER ONE{tok.eos_token}ANSWER TWO{tok.eos_token}"
    ignored = tok.decode([t for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if not m])
    assert "question" in ignored and "Be brief." in ignored and "ANSWER" not in ignored


def test_truncation_keeps_masks_aligned(tiny_model):
    tok = load_tokenizer(tiny_model)
    enc = tokenize_for_sft(tok, [{"role": "user", "content": "q " * 50}, {"role": "assistant", "content": "a"}], 16)
    assert len(enc["input_ids"]) == len(enc["assistant_masks"]) == 16
    assert not any(enc["assistant_masks"])


def test_system_prompt_only_when_missing():
    own = [{"role": "system", "content": "mine"}, {"role": "user", "content": "q"}]
    assert with_system(own, "default") == own
    assert with_system(own[1:], "default")[0] == {"role": "system", "content": "default"}
    assert with_system(own[1:], None) == own[1:]
    prompt, answer = split_prompt_answer([*own, {"role": "assistant", "content": "a"}])
    assert prompt == own and answer == "a"


def test_the_prompted_base_is_told_the_task_and_the_exact_schema_and_shown_examples():
    text = chat.task_instructions("Extract the contact card.", '{"name": "Ana", "age": 34, "city": "Porto"}')
    assert text == ('Extract the contact card. Reply with only the JSON object, on one line, with exactly these keys: '
                    '"name" (a string), "age" (an integer), "city" (a string).')
    assert chat.task_instructions("Summarise.", "not JSON") == "Summarise."
    shot = [{"role": "system", "content": "own"}, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]
    prompt = [{"role": "system", "content": "own"}, {"role": "user", "content": "q"}]
    assert chat.few_shot(prompt, text, [shot, shot]) == [
        {"role": "system", "content": text}, *shot[1:], *shot[1:], {"role": "user", "content": "q"}]
    assert chat.few_shot(prompt, text, []) == [{"role": "system", "content": text}, {"role": "user", "content": "q"}]
