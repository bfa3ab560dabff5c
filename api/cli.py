"""The `afina` command line."""

import logging
from typing import Annotated

import typer
import uvicorn

from afina.core.settings import get_settings
from afina.models.schema import upgrade_database

app = typer.Typer(
    help="afina: self-hosted, OpenAI-compatible QLoRA fine-tuning.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def migrate() -> None:
    """Bring the database (AFINA_DATABASE_URL) to the newest schema."""
    settings = get_settings()
    upgrade_database(settings.database_url)
    typer.echo(f"database is up to date: {settings.database_url}")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8000,
    migrate_first: Annotated[
        bool, typer.Option("--migrate/--no-migrate", help="Apply migrations before serving.")
    ] = True,
) -> None:
    """Run the API on HOST:PORT (embedded default: SQLite and files under AFINA_DATA_DIR)."""
    settings = get_settings()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    if migrate_first:
        upgrade_database(settings.database_url)
    typer.echo(f"afina: data in {settings.data_dir}, database {settings.database_url}")
    if not settings.api_keys:
        typer.echo("afina: no AFINA_API_KEYS set: every caller of this address has full access")
    uvicorn.run(
        "afina.api.app:create_app",
        factory=True,
        host=host,
        port=port,
        log_level=settings.log_level.lower(),
    )
