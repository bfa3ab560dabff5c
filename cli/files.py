"""`afina files`: upload, list, show and delete datasets on an afina server."""

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.filesize import decimal
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from afina.cli.http import (
    DEFAULT_BASE_URL,
    LONG,
    ApiKey,
    AsJson,
    BaseUrl,
    api,
    call,
    console,
    fields,
    print_json,
    server,
    table,
    when,
)

UPLOAD_CHUNK = 1024 * 1024

files_app = typer.Typer(help="Datasets on an afina server.", no_args_is_help=True)

FileId = Annotated[str, typer.Argument(help="The file's id (file-...).")]


def _multipart(path: Path, boundary: str) -> tuple[bytes, bytes]:
    """What goes before and after the file's bytes in the upload's multipart body."""
    name = path.name.translate({ord('"'): "%22", ord("\r"): "%0D", ord("\n"): "%0A"})
    head = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="file"; filename="{name}"\r\n'
        "Content-Type: application/jsonl\r\n\r\n"
    )
    return head.encode(), f"\r\n--{boundary}--\r\n".encode()


def upload(client: httpx.Client, path: Path) -> dict[str, Any]:
    """POST /v1/files, streamed from disk a chunk at a time (a large file is never whole in
    memory), with a progress bar on a terminal."""
    boundary = secrets.token_hex(16)
    head, tail = _multipart(path, boundary)
    size = path.stat().st_size
    screen = console(stderr=True)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=screen, transient=True, disable=not screen.is_terminal) as bar:
        task = bar.add_task(f"uploading {path.name}", total=size)

        def body() -> Iterator[bytes]:
            yield head
            with path.open("rb") as file:
                while chunk := file.read(UPLOAD_CHUNK):
                    yield chunk
                    bar.advance(task, len(chunk))
            yield tail

        headers = {
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Content-Length": str(len(head) + size + len(tail)),
        }
        return call(client, "POST", "/v1/files", content=body(), headers=headers, timeout=LONG)


def file_summary(file: dict[str, Any]) -> str:
    summary = f"{file['id']}: {file['filename']}, {decimal(file['bytes'])}"
    found = file.get("validation")
    if found:
        summary += (
            f"; {found['format']} format, {found['num_examples']} examples, about "
            f"{found['estimated_tokens']:,} tokens"
        )
    return summary


@files_app.command("upload")
def upload_file(
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="A JSONL dataset.")],
    as_json: AsJson = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
) -> None:
    """Upload a dataset (purpose fine-tune): the server validates it as it arrives and says
    its format, examples and estimated tokens, or which lines are bad."""
    with server(base_url, api_key) as client:
        file = upload(client, path)
    if as_json:
        print_json(file)
    else:
        typer.echo(f"uploaded {file_summary(file)}")


@files_app.command("list")
def list_files(
    as_json: AsJson = False, base_url: BaseUrl = DEFAULT_BASE_URL, api_key: ApiKey = None
) -> None:
    """The project's files: datasets and jobs' result files."""
    page = api(base_url, api_key, "GET", "/v1/files")
    if as_json:
        print_json(page)
        return
    rows = []
    for file in page["data"]:
        found = file["validation"] or {}
        rows.append(
            [
                file["id"],
                file["filename"],
                file["purpose"],
                decimal(file["bytes"]),
                found.get("format", ""),
                str(found.get("num_examples", "")),
                when(file["created_at"]),
            ]
        )
    columns = ("id", "filename", "purpose", "size", "format", "examples", "created")
    table(columns, rows, "No files.")


@files_app.command("show")
def show_file(
    file_id: FileId,
    as_json: AsJson = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
) -> None:
    """One file's details."""
    file = api(base_url, api_key, "GET", f"/v1/files/{file_id}")
    if as_json:
        print_json(file)
        return
    found = file["validation"] or {}
    rows = [
        ("id", file["id"]),
        ("filename", file["filename"]),
        ("purpose", file["purpose"]),
        ("bytes", file["bytes"]),
        ("created", when(file["created_at"])),
        ("format", found.get("format")),
        ("examples", found.get("num_examples")),
        ("estimated tokens", found.get("estimated_tokens")),
    ]
    console().print(fields(rows))


@files_app.command("delete")
def delete_file(
    file_id: FileId, base_url: BaseUrl = DEFAULT_BASE_URL, api_key: ApiKey = None
) -> None:
    """Delete a file (refused while a job that has not ended trains on it)."""
    api(base_url, api_key, "DELETE", f"/v1/files/{file_id}")
    typer.echo(f"deleted {file_id}")
