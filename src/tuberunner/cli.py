"""The one entry point: runner verbs, `coordinator ...`, `transcode`."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

from tuberunner import __version__

if TYPE_CHECKING:
    from tuberunner.oneshot.session import TranscodeOptions as TranscodeOptionsType
from tuberunner.runner import cli as runner_cli

app = typer.Typer(help="Tuberunner: PeerTube-compatible remote runner and coordinator.", no_args_is_help=True)
coordinator_app = typer.Typer(help="Run or drive a coordinator.", no_args_is_help=True)
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(runner_cli.app)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    # Migration chatter and one line per HTTP request are noise unless debugging.
    for noisy in ("alembic", "httpx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


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
    redis_url: Annotated[
        str | None,
        typer.Option(
            "--redis-url",
            envvar="TUBERUNNER_REDIS_URL",
            help="Redis shared by several coordinator processes on one PostgreSQL database",
        ),
    ] = None,
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
        redis_url=redis_url,
    )
    uvicorn.run(
        create_app(config),
        host=host,
        port=port,
        log_level="warning",
        ws="websockets-sansio",
        timeout_graceful_shutdown=10,
        # A line per request costs more than the hot path itself; problems are logged by the app.
        access_log=False,
    )


registration_token_app = typer.Typer(help="Registration tokens of a coordinator.", no_args_is_help=True)
coordinator_app.add_typer(registration_token_app, name="registration-token")
_Url = Annotated[str, typer.Option("--url", help="Coordinator URL")]
_Token = Annotated[
    str | None, typer.Option("--admin-token", envvar="TUBERUNNER_ADMIN_TOKEN", help="Admin token")
]
DEFAULT_URL = "http://127.0.0.1:9000"


def _fail(exc: Exception) -> NoReturn:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(1) from exc


@coordinator_app.command("submit")
def coordinator_submit(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    url: _Url = DEFAULT_URL,
    admin_token: _Token = None,
    name: Annotated[str | None, typer.Option("--name")] = None,
    resolutions: Annotated[str | None, typer.Option("--resolutions", help="e.g. 720,480")] = None,
    hls: Annotated[bool | None, typer.Option("--hls/--no-hls")] = None,
    web_video: Annotated[bool | None, typer.Option("--web-video/--no-web-video")] = None,
    split_audio: Annotated[bool | None, typer.Option("--split-audio/--no-split-audio")] = None,
    transcription: Annotated[
        str | None, typer.Option("--transcription", help="true, false or a language")
    ] = None,
    storyboard: Annotated[bool | None, typer.Option("--storyboard/--no-storyboard")] = None,
    preview: Annotated[Path | None, typer.Option("--preview", exists=True, dir_okay=False)] = None,
) -> None:
    """Upload a video or audio file; prints the new video's id (uuid)."""
    from tuberunner.coordinator import ingest_client as ic

    try:
        ladder = [int(r) for r in resolutions.split(",")] if resolutions else None
    except ValueError:
        raise typer.BadParameter("comma-separated integers", param_hint="--resolutions") from None
    try:
        video = ic.submit(
            url,
            ic.resolve_admin_token(admin_token),
            file,
            name=name,
            resolutions=ladder,
            hls=hls,
            web_video=web_video,
            split_audio=split_audio,
            transcription=transcription,
            storyboard=storyboard,
            preview=preview,
        )
    except ic.ClientError as exc:
        _fail(exc)
    typer.echo(video["uuid"])


@coordinator_app.command("status")
def coordinator_status(
    video_id: Annotated[str, typer.Argument(help="Video id or uuid")],
    url: _Url = DEFAULT_URL,
    admin_token: _Token = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show a video's state, jobs and outputs."""
    from tuberunner.coordinator import ingest_client as ic

    try:
        video = ic.video_status(url, ic.resolve_admin_token(admin_token), video_id)
    except ic.ClientError as exc:
        _fail(exc)
    typer.echo(json.dumps(video, indent=2) if as_json else ic.format_status(video))


@registration_token_app.command("create")
def registration_token_create(url: _Url = DEFAULT_URL, admin_token: _Token = None) -> None:
    """Generate a registration token and print it."""
    from tuberunner.coordinator import ingest_client as ic

    try:
        typer.echo(ic.create_registration_token(url, ic.resolve_admin_token(admin_token)))
    except ic.ClientError as exc:
        _fail(exc)


def _parse_resolutions(value: str | None) -> tuple[int, ...] | None:
    if not value:
        return None
    try:
        resolutions = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise typer.BadParameter(
            "comma-separated heights, e.g. 1080,720,480", param_hint="--resolutions"
        ) from None
    from tuberunner.media.profiles import VOD_RESOLUTIONS

    allowed = sorted(r for r in VOD_RESOLUTIONS if r > 0)
    if not resolutions or not set(resolutions) <= set(allowed):
        raise typer.BadParameter(f"heights among {','.join(map(str, allowed))}", param_hint="--resolutions")
    return resolutions


@app.command()
def transcode(
    input_file: Annotated[Path, typer.Argument(metavar="INPUT", help="Video or audio file")],
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Output folder (default: INPUT name)")
    ] = None,
    resolutions: Annotated[
        str | None, typer.Option("--resolutions", help="Ladder, e.g. 1080,720,480,360,240 (default: all)")
    ] = None,
    hls: Annotated[bool, typer.Option("--hls/--no-hls", help="Make the HLS ladder")] = True,
    web_video: Annotated[bool, typer.Option("--web-video/--no-web-video", help="Keep MP4 files")] = True,
    storyboard: Annotated[bool, typer.Option("--storyboard", help="Make a storyboard sprite sheet")] = False,
    runners: Annotated[int, typer.Option("--runners", min=1, max=16, help="Jobs run in parallel")] = 1,
) -> None:
    """Transcode one file into MP4s, an HLS ladder and more, with an embedded coordinator and runners.

    Running the same command again resumes: completed jobs are not redone."""
    from tuberunner.oneshot.session import TranscodeOptions

    options = TranscodeOptions(
        input=input_file,
        output=output or input_file.with_name(input_file.stem + "-tuberunner"),
        resolutions=_parse_resolutions(resolutions),
        hls=hls,
        web_video=web_video,
        storyboard=storyboard,
        runners=runners,
    )
    raise typer.Exit(_run_transcode(options))


@app.command()
def demo(
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Folder for the sample and the outputs")
    ] = Path("demo-output"),
) -> None:
    """Generate a short sample clip with ffmpeg and transcode it (what `make demo` runs)."""
    import asyncio

    from tuberunner.media.binaries import find_ffmpeg
    from tuberunner.media.samples import make_sample_clip
    from tuberunner.oneshot.session import TranscodeOptions

    output.mkdir(parents=True, exist_ok=True)
    sample = output / "sample.mp4"
    if not sample.exists():
        typer.echo(f"generating {sample} (8 s, 640x360, test pattern and tone)", err=True)
        asyncio.run(make_sample_clip(find_ffmpeg(), sample, duration_s=8.0, width=640, height=360, fps=25))
    options = TranscodeOptions(input=sample, output=output, storyboard=True)
    raise typer.Exit(_run_transcode(options))


def _run_transcode(options: TranscodeOptionsType) -> int:
    import asyncio
    import signal

    from tuberunner.oneshot.display import Display
    from tuberunner.oneshot.session import TranscodeError, transcode

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        current = asyncio.current_task()
        assert current is not None

        def on_interrupt() -> None:
            if stop.is_set():
                current.cancel()  # second Ctrl-C: stop now (ffmpeg children are still killed)
            stop.set()

        loop.add_signal_handler(signal.SIGINT, on_interrupt)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        try:
            with Display() as display:
                result = await transcode(options, display, stop)
        except TranscodeError as exc:
            typer.echo(f"error: {exc}", err=True)
            return exc.exit_code
        except asyncio.CancelledError:
            typer.echo("stopped", err=True)
            return 130
        finally:
            loop.remove_signal_handler(signal.SIGINT)
            loop.remove_signal_handler(signal.SIGTERM)
        done = "resumed and finished" if result.resumed else "finished"
        typer.echo(f"{done} in {result.elapsed_s:.1f} s; outputs in {options.output}/:", err=True)
        for path in [
            *result.export.files,
            *([result.export.summary_path] if result.export.summary_path else []),
        ]:
            typer.echo(f"  {path.relative_to(options.output)}")
        return 0

    return asyncio.run(main())


def main() -> None:
    app()
