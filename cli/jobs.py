"""`afina jobs`: create, list, show, control and download fine-tuning jobs on an afina server
(`afina jobs watch` is in watch.py)."""

import json
import shutil
import tarfile
import tempfile
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from afina.cli.files import file_summary, upload
from afina.cli.http import (
    DEFAULT_BASE_URL,
    JOBS,
    ApiKey,
    AsJson,
    BaseUrl,
    JobId,
    api,
    call,
    console,
    fields,
    print_json,
    refused,
    server,
    steps,
    table,
    when,
)
from afina.cli.watch import follow, watch_job

jobs_app = typer.Typer(help="Fine-tuning jobs on an afina server.", no_args_is_help=True)

Limit = Annotated[int, typer.Option("--limit", min=1, max=100, help="How many, newest first.")]


class Method(StrEnum):
    sft = "sft"
    dpo = "dpo"


METHOD_TYPES = {Method.sft: "supervised", Method.dpo: "dpo"}


def _dataset(given: str, option: str) -> Path | str:
    """A local file to upload, or a file id."""
    path = Path(given).expanduser()
    if path.is_file():
        return path
    if given.startswith("file-"):
        return given
    raise typer.BadParameter(f"{given} is neither a file here nor a file id", param_hint=option)


def _file_id(client: httpx.Client, dataset: Path | str) -> str:
    if isinstance(dataset, str):
        return dataset
    file = upload(client, dataset)
    typer.echo(f"uploaded {file_summary(file)}", err=True)
    return file["id"]


def _assign(body: dict[str, Any], setting: str) -> None:
    """Set `a.b.c=value` in `body`: the value as JSON when it parses as JSON, else the
    string."""
    path, equals, raw = setting.partition("=")
    if not equals or not all(path.split(".")):
        raise typer.BadParameter(f"{setting!r} is not KEY.PATH=VALUE", param_hint="--set")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    *parents, leaf = path.split(".")
    node = body
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise typer.BadParameter(f"{path}: {key} is not an object", param_hint="--set")
    node[leaf] = value


@jobs_app.command("create")
def create_job(
    model: Annotated[
        str, typer.Option("--model", help="A hub id, an absolute path, or a fine-tuned model.")
    ],
    training_file: Annotated[
        str, typer.Option("--training-file", help="A local JSONL file (uploaded) or a file id.")
    ],
    validation_file: Annotated[
        str | None,
        typer.Option("--validation-file", help="A local JSONL file (uploaded) or a file id."),
    ] = None,
    method: Annotated[
        Method | None, typer.Option("--method", help="sft (supervised) or dpo.")
    ] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, help="n_epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1)] = None,
    learning_rate: Annotated[
        float | None, typer.Option("--lr", help="training.learning_rate.")
    ] = None,
    suffix: Annotated[str | None, typer.Option("--suffix", help="In the model's name.")] = None,
    settings: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Any body field, e.g. training.max_seq_length=1024 or lora.r=8 (JSON "
            "values; repeat it).",
        ),
    ] = None,
    watch: Annotated[bool, typer.Option("--watch", help="Then watch it.")] = False,
    as_json: AsJson = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
) -> None:
    """Create a fine-tuning job (POST /v1/fine_tuning/jobs); local files are uploaded
    first."""
    training = _dataset(training_file, "--training-file")
    validation = None if validation_file is None else _dataset(validation_file, "--validation-file")
    body: dict[str, Any] = {"model": model}
    hyperparameters = {"n_epochs": epochs, "batch_size": batch_size}
    hyperparameters = {k: v for k, v in hyperparameters.items() if v is not None}
    if method is not None or hyperparameters:
        kind = METHOD_TYPES[method or Method.sft]
        body["method"] = {"type": kind, kind: {"hyperparameters": hyperparameters}}
    if learning_rate is not None:
        body["training"] = {"learning_rate": learning_rate}
    if suffix is not None:
        body["suffix"] = suffix
    for setting in settings or []:
        _assign(body, setting)
    with server(base_url, api_key) as client:
        body["training_file"] = _file_id(client, training)
        if validation is not None:
            body["validation_file"] = _file_id(client, validation)
        job = call(client, "POST", JOBS, json=body)
        if as_json:
            print_json(job)
        else:
            typer.echo(f"created {job['id']} ({job['status']}) on {job['model']}")
        if watch:
            follow(client, job["id"])
        elif not as_json:
            typer.echo(f"watch it: afina jobs watch {job['id']}")


@jobs_app.command("list")
def list_jobs(
    limit: Limit = 20,
    as_json: AsJson = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
) -> None:
    """The project's jobs, newest first."""
    page = api(base_url, api_key, "GET", JOBS, params={"limit": limit})
    if as_json:
        print_json(page)
        return
    rows = [
        [
            job["id"],
            job["status"],
            steps(job),
            job["model"],
            job["fine_tuned_model"] or "",
            when(job["created_at"]),
        ]
        for job in page["data"]
    ]
    table(("id", "status", "steps", "model", "fine-tuned model", "created"), rows, "No jobs.")


@jobs_app.command("show")
def show_job(
    job_id: JobId,
    as_json: AsJson = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
) -> None:
    """One job: its state, progress and resolved settings."""
    job = api(base_url, api_key, "GET", f"{JOBS}/{job_id}")
    if as_json:
        print_json(job)
        return
    config, error = job["config"], job["error"]
    status = job["status"] + (" (pause requested)" if job["pause_requested"] else "")
    hyperparameters = ", ".join(f"{k} {v}" for k, v in job["hyperparameters"].items())
    rows = [
        ("id", job["id"]),
        ("status", status),
        ("model", job["model"]),
        ("fine-tuned model", job["fine_tuned_model"]),
        ("continued from", job["continued_from"]),
        ("method", job["method"]["type"]),
        ("hyperparameters", hyperparameters),
        ("learning rate", config["training"]["learning_rate"]),
        ("training file", job["training_file"]),
        ("validation file", job["validation_file"]),
        ("steps", steps(job)),
        ("epoch", job["progress"]["epoch"]),
        ("estimated finish", when(job["estimated_finish"])),
        ("trained tokens", job["trained_tokens"]),
        ("created", when(job["created_at"])),
        ("finished", when(job["finished_at"])),
        ("error", error and error["message"]),
        ("result files", ", ".join(job["result_files"])),
    ]
    console().print(fields(rows))


@jobs_app.command("events")
def job_events(
    job_id: JobId,
    limit: Limit = 20,
    as_json: AsJson = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
) -> None:
    """A job's events, newest first."""
    page = api(base_url, api_key, "GET", f"{JOBS}/{job_id}/events", params={"limit": limit})
    if as_json:
        print_json(page)
        return
    rows = [[when(e["created_at"]), e["level"], e["message"]] for e in page["data"]]
    table(("time", "level", "message"), rows, "No events.")


@jobs_app.command("checkpoints")
def job_checkpoints(
    job_id: JobId,
    as_json: AsJson = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
) -> None:
    """A job's checkpoints: each is a model to call or to train further."""
    page = api(base_url, api_key, "GET", f"{JOBS}/{job_id}/checkpoints", params={"limit": 100})
    if as_json:
        print_json(page)
        return
    rows = [
        [
            str(c["step_number"]),
            c["fine_tuned_model_checkpoint"],
            " ".join(f"{k} {v:.4g}" for k, v in c["metrics"].items() if v is not None),
            when(c["created_at"]),
        ]
        for c in page["data"]
    ]
    table(("step", "model", "metrics", "created"), rows, "No checkpoints.")


def _act(job_id: str, action: str, base_url: str, api_key: str | None) -> None:
    job = api(base_url, api_key, "POST", f"{JOBS}/{job_id}/{action}")
    pending = " (pause requested: it pauses at its next step)" if job["pause_requested"] else ""
    typer.echo(f"{job['id']} is {job['status']}{pending}")


@jobs_app.command("cancel")
def cancel_job(job_id: JobId, base_url: BaseUrl = DEFAULT_BASE_URL, api_key: ApiKey = None) -> None:
    """Cancel a job that has not ended."""
    _act(job_id, "cancel", base_url, api_key)


@jobs_app.command("pause")
def pause_job(job_id: JobId, base_url: BaseUrl = DEFAULT_BASE_URL, api_key: ApiKey = None) -> None:
    """Pause a job: a queued one at once, a running one at its next step (a checkpoint)."""
    _act(job_id, "pause", base_url, api_key)


@jobs_app.command("resume")
def resume_job(job_id: JobId, base_url: BaseUrl = DEFAULT_BASE_URL, api_key: ApiKey = None) -> None:
    """Queue a paused job again: it goes on from its checkpoint."""
    _act(job_id, "resume", base_url, api_key)


# Registered here, so that `afina jobs --help` keeps listing it between resume and download.
jobs_app.command("watch")(watch_job)


@jobs_app.command("download")
def download(
    job_id: JobId,
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
        server(base_url, api_key) as client,
        tempfile.TemporaryDirectory(dir=target.parent, prefix=".afina-download-") as scratch,
    ):
        archive = Path(scratch) / "adapter.tar.gz"
        with client.stream("GET", f"{JOBS}/{job_id}/adapter", params=params) as got:
            if got.status_code != 200:
                got.read()
                refused(got)
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
