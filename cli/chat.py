"""`afina chat` and `afina generate`: a model's text, printed as it streams from an afina
server (server-sent events)."""

import json
import sys
from collections.abc import Iterator
from typing import Annotated, Any

import httpx
import typer

from afina.cli.http import DEFAULT_BASE_URL, LONG, ApiKey, BaseUrl, refused, server

MaxTokens = Annotated[int | None, typer.Option("--max-tokens", min=1, help="Tokens to generate.")]
Temperature = Annotated[
    float | None, typer.Option("--temperature", min=0, max=2, help="0: greedy.")
]


def _stream(client: httpx.Client, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The events of a streamed generation (server-sent `data:` lines, up to `[DONE]`)."""
    with client.stream("POST", path, json={**body, "stream": True}, timeout=LONG) as response:
        if response.is_error:
            response.read()
            refused(response)
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line.removeprefix("data:").strip()
            if data == "[DONE]":
                return
            event = json.loads(data)
            if "error" in event:
                typer.echo(f"\nafina: the generation failed: {event['error']['message']}", err=True)
                raise typer.Exit(1)
            yield event


def _sampling(max_tokens: int | None, temperature: float | None, name: str) -> dict[str, Any]:
    given = {name: max_tokens, "temperature": temperature}
    return {k: v for k, v in given.items() if v is not None}


def _say(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def chat(
    model: Annotated[str, typer.Argument(help="A fine-tuned model, checkpoint or base model.")],
    max_tokens: MaxTokens = None,
    temperature: Temperature = None,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
) -> None:
    """Chat with a model: each line you type is a turn of one conversation; the answer
    streams as it is generated. End with /exit or Ctrl-D."""
    messages: list[dict[str, str]] = []
    sampling = _sampling(max_tokens, temperature, "max_tokens")
    with server(base_url, api_key) as client:
        while True:
            try:
                line = input("> ")
            except EOFError:
                break
            if line.strip() == "/exit":
                break
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line})
            answer = ""
            body = {"model": model, "messages": messages, **sampling}
            for chunk in _stream(client, "/v1/chat/completions", body):
                for choice in chunk["choices"]:
                    piece = choice["delta"].get("content") or ""
                    answer += piece
                    _say(piece)
            _say("\n")
            messages.append({"role": "assistant", "content": answer})


def generate(
    model: Annotated[str, typer.Argument(help="A fine-tuned model, checkpoint or base model.")],
    prompt: Annotated[str, typer.Argument(help="The text to continue.")],
    max_tokens: MaxTokens = None,
    temperature: Temperature = None,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
) -> None:
    """Continue a prompt (POST /generate), printing the text as it streams."""
    body = {
        "model": model,
        "prompt": prompt,
        **_sampling(max_tokens, temperature, "max_new_tokens"),
    }
    with server(base_url, api_key) as client:
        for event in _stream(client, "/generate", body):
            _say(event["text"])
    _say("\n")
