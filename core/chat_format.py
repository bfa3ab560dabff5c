"""How a model's text is framed, shared by training and serving so that a prompt is served
as its examples were trained: the chat template a tokenizer without one gets (ChatML), BOS
before plain text, and what ends a turn."""

from dataclasses import dataclass
from typing import Any

_PROBE = "afina-end-of-turn-probe"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer: Any) -> None:
    """Give a tokenizer without a chat template the ChatML one (as plain text markers)."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE


def bos_prefix(tokenizer: Any, text: str) -> str:
    """The BOS token to put before `text`: none if the tokenizer has none or it is there."""
    bos = tokenizer.bos_token
    return "" if not bos or text.startswith(bos) else bos


def prompt_text(tokenizer: Any, prompt: str) -> str:
    """A plain prompt as training renders it before its completion: BOS first."""
    return bos_prefix(tokenizer, prompt) + prompt


@dataclass(frozen=True)
class Stops:
    """Where generation ends: token ids, and strings for markers that are not one token."""

    ids: frozenset[int] = frozenset()
    strings: tuple[str, ...] = ()


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


def generation_stops(eos: frozenset[int], turn: Stops, *, chat: bool) -> Stops:
    """Where a generation ends: at EOS, and after a chat prompt also at the template's end
    of turn (a plain prompt was trained with EOS after its completion)."""
    if not chat:
        return Stops(ids=eos)
    return Stops(ids=eos | turn.ids, strings=turn.strings)
