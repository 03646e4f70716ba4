"""The one entry point: runner verbs, `coordinator ...`, `transcode`."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from tuberunner import __version__

app = typer.Typer(help="Tuberunner: PeerTube-compatible remote runner and coordinator.", no_args_is_help=True)
coordinator_app = typer.Typer(help="Run or drive a coordinator.", no_args_is_help=True)
app.add_typer(coordinator_app, name="coordinator")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    # Migration chatter is noise at every start.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.getLogger().level))


@app.callback()
def _root(
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning, error")] = "info",
) -> None:
    _setup_logging(log_level)


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


@coordinator_app.command("serve")
def coordinator_serve(
    data_dir: Annotated[Path, typer.Option("--data-dir", help="Folder for the database and files")] = Path(
        "./tuberunner-data"
    ),
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on")] = 9000,
    database_url: Annotated[
        str | None, typer.Option("--database-url", help="SQLAlchemy URL (default: SQLite in the data folder)")
    ] = None,
    public_url: Annotated[
        str | None, typer.Option("--public-url", help="URL runners use to reach this coordinator")
    ] = None,
    lease: Annotated[float, typer.Option("--lease", help="Seconds a job lives without an update")] = 120.0,
) -> None:
    """Serve the runner, admin and ingest APIs."""
    import uvicorn

    from tuberunner.coordinator.app import create_app
    from tuberunner.coordinator.config import CoordinatorConfig

    config = CoordinatorConfig(
        data_dir=data_dir,
        database_url=database_url,
        public_url=public_url,
        default_lease_s=lease,
        admin_token=os.environ.get("TUBERUNNER_ADMIN_TOKEN") or None,
        redis_url=os.environ.get("TUBERUNNER_REDIS_URL") or None,
    )
    uvicorn.run(
        create_app(config),
        host=host,
        port=port,
        log_level="warning",
        ws="websockets-sansio",
        timeout_graceful_shutdown=10,
    )


def main() -> None:
    app()
