"""What the client commands share: they call a running afina server over HTTP, at
AFINA_BASE_URL with AFINA_API_KEY (or --base-url, --api-key), and print its answers."""

import contextlib
import json
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
TIMEOUT_SECONDS = 60.0
# Uploads and generation may take long between two bytes (validation, loading a model).
LONG = httpx.Timeout(TIMEOUT_SECONDS, read=None)
JOBS = "/v1/fine_tuning/jobs"

BaseUrl = Annotated[
    str,
    typer.Option("--base-url", envvar="AFINA_BASE_URL", help="The afina server."),
]
ApiKey = Annotated[
    str | None,
    typer.Option("--api-key", envvar="AFINA_API_KEY", help="A key of the project."),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print the API's JSON, for scripts.")]
JobId = Annotated[str, typer.Argument(help="The job's id (ftjob-...).")]


def _client(base_url: str, api_key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=base_url, headers=headers, timeout=TIMEOUT_SECONDS)


@contextlib.contextmanager
def server(base_url: str, api_key: str | None) -> Iterator[httpx.Client]:
    """A client of the server: one that cannot be reached (or stops answering) ends the
    command with one line and exit 1, not a traceback."""
    try:
        with _client(base_url, api_key) as client:
            yield client
    except httpx.TransportError as error:
        reason = str(error) or type(error).__name__
        typer.echo(f"afina: cannot talk to the afina server at {base_url}: {reason}", err=True)
        raise typer.Exit(1) from None


def refused(response: httpx.Response) -> NoReturn:
    """Say what the server answered (its error message) and exit 1."""
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:500]
    typer.echo(f"afina: {response.status_code}: {message}", err=True)
    raise typer.Exit(1)


def call(client: httpx.Client, method: str, path: str, **request: Any) -> Any:
    """The API's JSON answer; an error answer ends the command (`refused`)."""
    response = client.request(method, path, **request)
    if response.is_error:
        refused(response)
    try:
        return response.json()
    except ValueError:
        typer.echo(f"afina: {response.url} answered no JSON: is it an afina server?", err=True)
        raise typer.Exit(1) from None


def api(base_url: str, api_key: str | None, method: str, path: str, **request: Any) -> Any:
    """One call, for the commands that make one."""
    with server(base_url, api_key) as client:
        return call(client, method, path, **request)


def console(stderr: bool = False) -> Console:
    # No markup: names and messages from the server are printed as they are. Piped, a wide
    # console keeps each table row on one line.
    console = Console(stderr=stderr, markup=False, emoji=False, highlight=False)
    if console.is_terminal:
        return console
    return Console(stderr=stderr, markup=False, emoji=False, highlight=False, width=200)


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


def when(unix: float | None, form: str = "%Y-%m-%d %H:%M:%S") -> str:
    return "" if unix is None else datetime.fromtimestamp(unix).strftime(form)


def steps(job: dict[str, Any]) -> str:
    progress = job["progress"]
    return f"{progress['steps_done']}/{progress['total_steps'] or '?'}"


def fields(rows: Sequence[tuple[str, Any]]) -> Table:
    """A name: value grid of the rows that have a value."""
    grid = Table.grid(padding=(0, 2))
    for name, value in rows:
        if value not in (None, "", []):
            grid.add_row(Text(name, style="bold"), str(value))
    return grid


def table(columns: Sequence[str], rows: list[list[str]], empty: str) -> None:
    printer = console()
    if not rows:
        printer.print(empty)
        return
    table = Table(*columns, box=None)
    for row in rows:
        table.add_row(*row)
    printer.print(table)
