"""The `afina` command line."""

import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from afina.api import keys
from afina.api.asgi import is_loopback
from afina.api.server import Server, server_config
from afina.cli.chat import chat, generate
from afina.cli.files import files_app
from afina.cli.jobs import jobs_app
from afina.core.settings import (
    MAX_WORKER_QUEUES,
    PROJECT_NAME,
    Settings,
    get_settings,
    parse_worker_queues,
)
from afina.models import ApiKey
from afina.models.schema import upgrade_database
from afina.models.session import make_engine, make_session_factory
from afina.worker.process import WORKER_ID_VARIABLE

app = typer.Typer(
    help="afina: self-hosted, OpenAI-compatible QLoRA fine-tuning.",
    no_args_is_help=True,
    add_completion=False,
)
logger = logging.getLogger("afina.cli")

MAX_KEY_NAME = ApiKey.name.type.length
# The embedded worker's nice value: it trains at a lower priority than the API it shares the
# machine with (threads it starts later inherit it).
WORKER_NICENESS = 10
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


def _start_worker(worker_id: str) -> subprocess.Popen[bytes]:
    # Its own session: a Ctrl-C at the terminal reaches `afina serve`, which stops the
    # worker itself, after the API.
    env = {**os.environ, "AFINA_WORKER_PARENT_PID": str(os.getpid()), WORKER_ID_VARIABLE: worker_id}
    worker = subprocess.Popen(
        [sys.executable, "-m", "afina.worker"], env=env, start_new_session=True
    )
    # Training takes every core it is given; the API beside it must still answer at once.
    with contextlib.suppress(OSError):  # it may have ended already
        os.setpriority(os.PRIO_PROCESS, worker.pid, WORKER_NICENESS)
    logger.info("started the training worker (pid %d)", worker.pid)
    return worker


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


def _new_worker_id() -> str:
    return f"afina-serve-{secrets.token_hex(8)}"


def _how_it_ended(code: int) -> str:
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


class WorkerSupervisor:
    """The training worker that `afina serve` runs beside the API: started with it, started
    again when it dies (after a pause that doubles, up to 30 s, while it keeps dying within
    a minute or cannot be started at all), stopped with it. Each worker it starts has an id
    of its own, which the jobs it runs record; `on_death` gets the id of one that died, so
    that its job is taken back at once rather than once its heartbeat is late. The job's
    events say so ("Worker lost ...", then "Job started (attempt N)"), and serve's log says
    which worker died, and how."""

    FIRST_DELAY, MAX_DELAY, STEADY_SECONDS = 1.0, 30.0, 60.0

    def __init__(self, on_death: Callable[[str], None]) -> None:
        self._on_death = on_death
        self._stopping = threading.Event()
        self._worker_id = _new_worker_id()
        self._worker = _start_worker(self._worker_id)
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        # Only this thread replaces `_worker`; `stop` joins it before it stops the last one.
        delay = self.FIRST_DELAY
        started = time.monotonic()
        while not self._stopping.wait(0.5):
            code = self._worker.poll()  # reaps a dead worker: it stays no zombie
            if code is None:
                continue
            lived = time.monotonic() - started
            if lived > self.STEADY_SECONDS:
                delay = self.FIRST_DELAY
            logger.warning(
                "the training worker (pid %d) %s after %.0f s: starting another in %.0f s",
                self._worker.pid,
                _how_it_ended(code),
                lived,
                delay,
            )
            try:
                self._on_death(self._worker_id)
            except Exception:  # its job is still taken back, once its heartbeat is late
                logger.exception("could not take back the job of the worker that died")
            while not self._stopping.wait(delay):
                delay = min(delay * 2, self.MAX_DELAY)
                try:
                    self._worker_id = _new_worker_id()
                    self._worker = _start_worker(self._worker_id)
                    break
                except OSError as error:  # keep supervising: the next try may work
                    logger.error(
                        "could not start a training worker (%s): trying again in %.0f s",
                        error,
                        delay,
                    )
            started = time.monotonic()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()
        _stop_worker(self._worker)


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
    keys_required = _keys_required(settings)
    if not keys_required and not is_loopback(host):
        typer.echo(
            f"afina: refusing to serve on {host} with no API key: anyone who can reach it "
            "would have full access. Set AFINA_API_KEYS (project:key,...), create one with "
            "`afina keys create --project P`, or bind 127.0.0.1.",
            err=True,
        )
        raise typer.Exit(2)
    if migrate_first:
        upgrade_database(settings.database_url)
    typer.echo(f"afina: data in {settings.data_dir}, database {settings.database_url}")
    if keys_required:
        typer.echo("afina: callers need an API key (AFINA_API_KEYS, or `afina keys create`)")
    else:
        typer.echo(
            "afina: no API key set or stored: open to every process on this machine until "
            "one is (`afina keys create --project P`)"
        )
    from afina.api.app import create_app  # the API's modules, for this command only
    from afina.services.root import Services

    # One set of services for the process: the app closes them when it stops, and the
    # supervisor has a dead worker's job taken back by the app's own reconciler.
    services = Services(settings, database_threads=2 * settings.api_threads)
    api = create_app(settings, services)
    worker = None
    if with_worker:
        worker = WorkerSupervisor(lambda dead: services.reconciler.reconcile(dead_worker=dead))
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to the
    # handler it found. This one turns it into a clean exit that runs the `finally` below.
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, _exit_cleanly)
    try:
        config = server_config(api, settings, host=host, port=port)
        Server(config).run()
    finally:
        if worker is not None:
            worker.stop()


def _session_factory(settings: Settings) -> sessionmaker[Session]:
    return make_session_factory(make_engine(settings.database_url))


def _keys_required(settings: Settings) -> bool:
    """Whether callers will need a key: one is set, or one was ever stored. It reads a
    database that is already there and creates none, so a refused start leaves nothing."""
    if settings.api_keys:
        return True
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and not Path(url.database or "").is_file():
        return False
    try:
        return keys.any_stored_key(_session_factory(settings))
    except SQLAlchemyError:  # no schema yet
        return False


keys_app = typer.Typer(
    help="API keys kept in the database (only their hash is stored). A key opens one "
    "project: its callers see that project's files, jobs and models, and nothing else.",
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")
app.add_typer(jobs_app, name="jobs")
app.add_typer(files_app, name="files")
app.command()(chat)
app.command()(generate)


def _keys_database() -> sessionmaker[Session]:
    settings = get_settings()
    upgrade_database(settings.database_url)
    return _session_factory(settings)


@keys_app.command("create")
def create_key(
    project: Annotated[str, typer.Option("--project", "-p", help="The project the key opens.")],
    name: Annotated[
        str | None, typer.Option(help="A note to tell keys apart, e.g. who uses it.")
    ] = None,
) -> None:
    """Make a key for a project and print it, alone, on standard output.

    The key is shown only this once. Once any key exists, every caller needs one."""
    if not PROJECT_NAME.fullmatch(project):
        raise typer.BadParameter("use 1-64 letters, digits, '_' or '-'", param_hint="--project")
    if name is not None and not 0 < len(name) <= MAX_KEY_NAME:
        raise typer.BadParameter(f"use 1-{MAX_KEY_NAME} characters", param_hint="--name")
    created = keys.create_key(_keys_database(), project, name)
    typer.echo(
        f"Created {created.row.id} for project {project}. The key, shown only this once:",
        err=True,
    )
    typer.echo(created.key)


@keys_app.command("list")
def list_keys(
    project: Annotated[
        str | None, typer.Option("--project", "-p", help="Only this project's keys.")
    ] = None,
    revoked: Annotated[bool, typer.Option("--revoked", help="Show revoked keys too.")] = False,
) -> None:
    """List the stored keys (their ids and first characters, never the keys)."""
    rows = keys.list_keys(_keys_database(), project, revoked=revoked)
    table = Table("id", "project", "name", "key", "created", "revoked", box=None)
    for row in rows:
        table.add_row(
            row.id,
            row.project,
            row.name or "",
            f"{row.prefix}...",
            f"{row.created_at:%Y-%m-%d %H:%M}",
            f"{row.revoked_at:%Y-%m-%d %H:%M}" if row.revoked_at else "",
        )
    console = Console()
    if not console.is_terminal:  # piped: keep every row on one line
        console = Console(width=200)
    console.print(table if rows else "No stored keys.")
    bootstrap = sorted(set(get_settings().api_key_projects().values()))
    shown = [name for name in bootstrap if project is None or name == project]
    if shown:
        typer.echo(f"AFINA_API_KEYS also holds keys for project(s): {', '.join(shown)}")


@keys_app.command("revoke")
def revoke_key(
    key: Annotated[
        str | None,
        typer.Argument(help="The key's id, as `afina keys list` shows it, or the key itself."),
    ] = None,
    project: Annotated[
        str | None,
        typer.Option(
            "--project",
            "-p",
            help="Every stored key of this project (with KEY: only if it is this project's).",
        ),
    ] = None,
) -> None:
    """Revoke stored keys: each stops working at its next request. A service that has had a
    key stays closed to callers without one, even once every key is revoked."""
    if key is None and project is None:
        raise typer.BadParameter("name a key (its id, or the key) or --project", param_hint="KEY")
    rows = keys.revoke_keys(_keys_database(), key, project)
    if not rows:
        typer.echo("afina: no stored key matches (see `afina keys list`)", err=True)
        raise typer.Exit(1)
    for row in rows:
        typer.echo(f"Revoked {row.id} (project {row.project}).")


@app.command()
def worker(
    queues: Annotated[
        str | None,
        typer.Option(
            "--queues",
            "-Q",
            help="The queues to take tasks from, in order, comma-separated (overrides "
            "AFINA_WORKER_QUEUES): 'export' for merged exports, any other name a training "
            "queue, the first its worker class's own, e.g. train-80g,train.",
        ),
    ] = None,
) -> None:
    """Run one worker on this machine, e.g. on a GPU node (pin it to a GPU with
    CUDA_VISIBLE_DEVICES): training jobs and merged exports, or the queues of --queues
    (AFINA_WORKER_QUEUES)."""
    if queues is not None:
        try:
            names = parse_worker_queues(queues)
        except ValidationError:
            raise typer.BadParameter(
                f"give 1-{MAX_WORKER_QUEUES} names of 1-64 letters, digits, '.', '_' or '-', "
                "comma-separated",
                param_hint="--queues",
            ) from None
        # What every part of the worker reads (the registry's row, Celery's --queues).
        os.environ["AFINA_WORKER_QUEUES"] = ",".join(names)
        get_settings.cache_clear()
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
