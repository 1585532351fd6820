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


JSON_TYPES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
              dict: "an object", type(None): "null"}


def task_instructions(system_prompt: str | None, reference: str | None) -> str:
    """The prompted base model's system turn: the task (the pipeline's system prompt) and, when the answers are JSON
    objects, the exact schema read off one reference answer (its keys, in order, with their JSON types)."""
    import json

    text = (system_prompt or "").strip()
    try:
        example = json.loads(reference) if reference else None
    except json.JSONDecodeError:
        example = None
    if isinstance(example, dict) and example:
        keys = ", ".join(f'"{k}" ({JSON_TYPES.get(type(v), "a value")})' for k, v in example.items())
        text += f" Reply with only the JSON object, on one line, with exactly these keys: {keys}."
    return text.strip()


def few_shot(messages: list[dict[str, str]], instructions: str,
             examples: list[list[dict[str, str]]]) -> list[dict[str, str]]:
    """`messages` (a prompt: everything before the answer) behind a system turn of `instructions` and the `examples`
    (whole conversations, their own system turns dropped) as earlier user/assistant turns: in-context learning."""
    shots = [m for conv in examples for m in conv if m["role"] != "system"]
    own = [m for m in messages if m["role"] != "system"]
    return [{"role": "system", "content": instructions}, *shots, *own]
