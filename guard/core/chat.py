"""Turning (system, user) turns into model prompts, for models with or without chat templates."""

from __future__ import annotations

from typing import Sequence


def format_prompt(tokenizer, user: str, system: str | None = None) -> str:
    """The chat-templated prompt text, ending where the assistant's reply begins.

    Templates that reject a system role (Gemma 2, for one) get the system text prepended to the
    user turn; tokenizers with no template at all get a plain ``System/User/Assistant`` layout.
    """
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return format_messages(tokenizer, messages)


def format_messages(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """The prompt text of a conversation through the tokenizer's chat template.

    A template that rejects a leading system message gets it merged into the next turn; a
    tokenizer with no template gets plain ``Role: content`` lines.

    Args:
        tokenizer: the tokenizer whose chat template formats the text.
        messages: ``{"role", "content"}`` dicts in order.
        add_generation_prompt: end with the assistant's turn opened, ready for the reply.
    """
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
        except Exception:
            if not messages or messages[0]["role"] != "system":
                raise
            merged = [{"role": messages[1]["role"], "content": messages[0]["content"] + "\n\n" + messages[1]["content"]},
                      *messages[2:]]
            return tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=add_generation_prompt)
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
    return text + ("Assistant:" if add_generation_prompt else "")
