"""A request's prompt -> token ids, rendered as training rendered its examples, and what
ends a turn in a tokenizer's chat template."""

from dataclasses import dataclass
from typing import Any

from afina.core.chat_format import prompt_text
from afina.serving.protocol import InferenceError, Prompt

_PROBE = "afina-end-of-turn-probe"


@dataclass(frozen=True)
class Stops:
    """Where generation ends: token ids, and strings for markers that are not one token."""

    ids: frozenset[int] = frozenset()
    strings: tuple[str, ...] = ()


def prompt_ids(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Chat messages through the chat template with the assistant's header opened; a plain
    prompt with BOS first, as a prompt-completion example was trained."""
    if prompt.messages is not None:
        messages = [{"role": role, "content": content} for role, content in prompt.messages]
        try:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except Exception as error:  # jinja raises on conversations a template refuses
            raise InferenceError(
                400,
                f"the model's chat template refused these messages: {error}",
                param=prompt.param,
                code="invalid_messages",
            ) from error
    else:
        text = prompt_text(tokenizer, prompt.text or "")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise InferenceError(400, "the prompt is empty", param=prompt.param, code="empty_prompt")
    return list(ids)


def end_of_turn(tokenizer: Any) -> Stops:
    """What the chat template writes after an assistant's message (`<|im_end|>`,
    `<|eot_id|>`, `</s>` ...), found by rendering one."""
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
    except Exception:  # a template that cannot render this: EOS alone ends the turn
        return Stops()
    at = text.rfind(_PROBE)
    marker = text[at + len(_PROBE) :].strip() if at >= 0 else ""
    if not marker:
        return Stops()
    ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
    return Stops(ids=frozenset(ids)) if len(ids) == 1 else Stops(strings=(marker,))


def eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """The model's end-of-sequence ids (its generation config may list several) and the
    tokenizer's."""
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    for value in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)
