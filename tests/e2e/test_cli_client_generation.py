"""`afina chat` and `afina generate` against a live server that generates with the demo model
(as a base model the allow-list names): what they print is what the API answers whole."""

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from afina.api.app import create_app
from afina.cli.main import app as cli
from afina.core.settings import Settings
from tests.support import serve_in_thread

GREEDY = {"temperature": 0, "max_tokens": 6}
OPTIONS = ["--temperature", "0", "--max-tokens", "6"]


@pytest.fixture(scope="module")
def url(stack: Settings, demo_model: Path) -> Iterator[str]:
    app = create_app(stack.model_copy(update={"allowed_models": [str(demo_model)]}))
    with serve_in_thread(app) as served:
        yield served


def whole_chat(url: str, model: str, messages: list[dict[str, str]]) -> str:
    body = {"model": model, "messages": messages, **GREEDY}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_generate_prints_the_streamed_text(url, demo_model):
    body = {"model": str(demo_model), "prompt": "Once upon a time", "temperature": 0}
    whole = httpx.post(f"{url}/generate", json={**body, "max_new_tokens": 6}, timeout=120)
    assert whole.status_code == 200, whole.text
    result = CliRunner().invoke(
        cli, ["generate", str(demo_model), "Once upon a time", *OPTIONS, "--base-url", url]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == whole.json()["text"] + "\n"
    assert whole.json()["text"]


def test_chat_keeps_the_conversation_and_ends_at_exit(url, demo_model):
    model = str(demo_model)
    first = whole_chat(url, model, [{"role": "user", "content": "Hello"}])
    second = whole_chat(
        url,
        model,
        [
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "And then?"},
        ],
    )
    result = CliRunner().invoke(
        cli,
        ["chat", model, *OPTIONS, "--base-url", url],
        input="Hello\n\nAnd then?\n/exit\nnever sent\n",
    )
    assert result.exit_code == 0, result.output
    # The blank line asks for nothing; `/exit` ends before the last line.
    assert result.stdout == f"> {first}\n> > {second}\n> "

    at_eof = CliRunner().invoke(cli, ["chat", model, *OPTIONS, "--base-url", url], input="Hello\n")
    assert at_eof.exit_code == 0, at_eof.output
    assert at_eof.stdout == f"> {first}\n> "


def test_chat_and_generate_say_what_the_api_refuses(url):
    runner = CliRunner()
    chat = runner.invoke(cli, ["chat", "no-such-model", "--base-url", url], input="Hi\n")
    assert chat.exit_code == 1
    assert chat.stderr.startswith("afina: 404: ")
    assert "no-such-model" in chat.stderr
    generate = runner.invoke(cli, ["generate", "no-such-model", "Hi", "--base-url", url])
    assert generate.exit_code == 1
    assert generate.stderr.startswith("afina: 404: ")
