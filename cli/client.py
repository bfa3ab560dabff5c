"""The client commands of `afina`: they call a running afina server over HTTP, at
AFINA_BASE_URL with AFINA_API_KEY (or --base-url, --api-key)."""

import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Annotated, NoReturn

import httpx
import typer

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
TIMEOUT_SECONDS = 60.0

jobs_app = typer.Typer(help="Fine-tuning jobs on an afina server.", no_args_is_help=True)

BaseUrl = Annotated[
    str,
    typer.Option("--base-url", envvar="AFINA_BASE_URL", help="The afina server."),
]
ApiKey = Annotated[
    str | None,
    typer.Option("--api-key", envvar="AFINA_API_KEY", help="A key of the project."),
]


def _client(base_url: str, api_key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=base_url, headers=headers, timeout=TIMEOUT_SECONDS)


def _refused(response: httpx.Response) -> NoReturn:
    """Say what the server answered (its error message) and exit 1."""
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:500]
    typer.echo(f"afina: {response.status_code}: {message}", err=True)
    raise typer.Exit(1)


@jobs_app.command("download")
def download(
    job_id: Annotated[str, typer.Argument(help="The job's id (ftjob-...).")],
    checkpoint: Annotated[
        int | None,
        typer.Option("--checkpoint", help="A checkpoint's step; default the final model."),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="The folder to unpack into (new or empty); default "
            "./JOB_ID or ./JOB_ID-ckpt-step-N.",
        ),
    ] = None,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
) -> None:
    """Download a job's LoRA adapter (peft), with its tokenizer and a README, and unpack it:
    `PeftModel.from_pretrained(base, FOLDER)` loads it."""
    folder = job_id if checkpoint is None else f"{job_id}-ckpt-step-{checkpoint}"
    target = (output or Path(folder)).expanduser().resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise typer.BadParameter(f"{target} exists and is not an empty folder", param_hint="-o")
    params = {} if checkpoint is None else {"checkpoint": checkpoint}
    target.parent.mkdir(parents=True, exist_ok=True)
    with (
        _client(base_url, api_key) as client,
        tempfile.TemporaryDirectory(dir=target.parent, prefix=".afina-download-") as scratch,
    ):
        archive = Path(scratch) / "adapter.tar.gz"
        with client.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/adapter", params=params) as got:
            if got.status_code != 200:
                got.read()
                _refused(got)
            with archive.open("wb") as out:
                for chunk in got.iter_bytes():
                    out.write(chunk)
        unpacked = Path(scratch) / "unpacked"
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(unpacked, filter="data")
        (top,) = list(unpacked.iterdir())
        if target.exists():
            target.rmdir()
        shutil.move(top, target)
    typer.echo(f"unpacked into {target}")
