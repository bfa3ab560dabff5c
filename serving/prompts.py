"""A request's prompt -> token ids, rendered as training rendered its examples."""

from typing import Any

from afina.core.chat_format import prompt_text
from afina.serving.protocol import InferenceError, Prompt


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
