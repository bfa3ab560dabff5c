"""The `afina` command line."""

import ipaddress
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
import uvicorn

from afina.core.settings import Settings, get_settings
from afina.models.schema import upgrade_database

app = typer.Typer(
    help="afina: self-hosted, OpenAI-compatible QLoRA fine-tuning.",
    no_args_is_help=True,
    add_completion=False,
)
logger = logging.getLogger("afina.cli")

# How long a stopping worker may take to halt its run at the next step and re-queue it.
WORKER_STOP_SECONDS = 30


def _configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
    )


@app.command()
def migrate() -> None:
    """Bring the database (AFINA_DATABASE_URL) to the newest schema."""
    settings = get_settings()
    upgrade_database(settings.database_url)
    typer.echo(f"database is up to date: {settings.database_url}")


def _start_worker() -> subprocess.Popen[bytes]:
    # Its own session: a Ctrl-C at the terminal reaches `afina serve`, which stops the
    # worker itself, after the API.
    env = {**os.environ, "AFINA_WORKER_PARENT_PID": str(os.getpid())}
    return subprocess.Popen([sys.executable, "-m", "afina.worker"], env=env, start_new_session=True)


def _stop_worker(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is not None:
        return
    worker.terminate()
    try:
        worker.wait(WORKER_STOP_SECONDS)
    except subprocess.TimeoutExpired:
        logger.warning("the worker did not stop in %d s: killing it", WORKER_STOP_SECONDS)
        worker.kill()
        worker.wait()


GRACEFUL_SHUTDOWN_SECONDS = 20


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def _exit_cleanly(_signal: int, _frame: object) -> None:
    raise SystemExit(0)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8000,
    migrate_first: Annotated[
        bool, typer.Option("--migrate/--no-migrate", help="Apply migrations before serving.")
    ] = True,
    with_worker: Annotated[
        bool,
        typer.Option("--worker/--no-worker", help="Run a training worker beside the API."),
    ] = True,
) -> None:
    """Run the API on HOST:PORT and a training worker beside it (embedded default: SQLite,
    the queue and the files under AFINA_DATA_DIR)."""
    settings = get_settings()
    _configure_logging(settings)
    if not settings.api_keys and not _is_loopback(host):
        typer.echo(
            f"afina: refusing to serve on {host} with no AFINA_API_KEYS: anyone who can reach "
            "it would have full access. Set AFINA_API_KEYS (project:key,...) or bind 127.0.0.1.",
            err=True,
        )
        raise typer.Exit(2)
    if migrate_first:
        upgrade_database(settings.database_url)
    typer.echo(f"afina: data in {settings.data_dir}, database {settings.database_url}")
    if not settings.api_keys:
        typer.echo("afina: no AFINA_API_KEYS set: open to every process on this machine")
    worker = _start_worker() if with_worker else None
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to the
    # handler it found. This one turns it into a clean exit that runs the `finally` below.
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, _exit_cleanly)
    try:
        uvicorn.run(
            "afina.api.app:create_app",
            factory=True,
            host=host,
            port=port,
            log_level=settings.log_level.lower(),
            # Open streams (a long generation) get this long to end before they are cut.
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        )
    finally:
        if worker is not None:
            _stop_worker(worker)


@app.command()
def worker() -> None:
    """Run one training worker (queue `train`) on this machine, e.g. on a GPU node; pin it to
    a GPU with CUDA_VISIBLE_DEVICES."""
    from afina.worker.celery_app import run_worker

    run_worker()


@app.command("demo-model")
def demo_model(
    directory: Annotated[Path, typer.Argument(help="Where to write the model.")],
) -> None:
    """Build a tiny random-weight Llama model and tokenizer (with a chat template) in
    DIRECTORY, to try the whole flow offline. It learns, but says nothing sensible."""
    from afina.worker.demo_model import build_demo_model

    path = build_demo_model(directory.expanduser().resolve())
    typer.echo(f"demo model written to {path}")
    typer.echo(f'use it as the job\'s model: "model": "{path}"')
