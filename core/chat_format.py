"""How a model's text is framed, shared by training and serving so that a prompt is served
as its examples were trained: the chat template a tokenizer without one gets (ChatML), and
BOS before plain text."""

from typing import Any

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
