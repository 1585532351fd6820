"""Render conversations with the model's own chat template and mark the tokens that carry the loss.

SmolLM2's template has no `{% generation %}` markers, so TRL's `assistant_only_loss` refuses it. We mark
assistant tokens ourselves: each assistant turn's span is the text the template adds between the
conversation before it (with the generation prompt) and the conversation including it.
"""

from __future__ import annotations

from typing import Any


def with_system(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """Prepend the configured system prompt unless the conversation has its own."""
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The full rendered text and the character spans of every assistant turn (answer + end-of-turn)."""
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1])
        if not upto.startswith(before):
            raise ValueError("the chat template does not render conversations incrementally; cannot mask turns")
        spans.append((len(before), len(upto.rstrip("\n"))))
    return render(tokenizer, messages), spans


def tokenize_for_sft(tokenizer, messages: list[dict[str, str]], max_length: int) -> dict[str, Any]:
    """input_ids plus `assistant_masks` (1 = token is part of an assistant answer), truncated to max_length."""
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=True,
                    max_length=max_length)
    mask = [int(any(s <= start < e for s, e in spans)) for start, _ in enc["offset_mapping"]]
    return {"input_ids": enc["input_ids"], "assistant_masks": mask}


def split_prompt_answer(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
    """Everything before the last assistant turn (the prompt) and that turn's text (the reference answer)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]
