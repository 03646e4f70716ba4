"""The one entry point: runner verbs, `coordinator ...`, `transcode`."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

from tuberunner import __version__
from tuberunner.ops.logs import LOG_FORMATS, LOG_LEVELS, configure_logging

if TYPE_CHECKING:
    import uvicorn

    from tuberunner.oneshot.session import TranscodeOptions as TranscodeOptionsType
    from tuberunner.ops.sd_notify import SystemdNotifier
from tuberunner.runner import cli as runner_cli

app = typer.Typer(help="Tuberunner: PeerTube-compatible remote runner and coordinator.", no_args_is_help=True)
coordinator_app = typer.Typer(help="Run or drive a coordinator.", no_args_is_help=True)
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(runner_cli.app)


# The one-shot commands draw progress on the terminal: their log shows warnings and errors unless asked.
_QUIET_COMMANDS = frozenset({"transcode", "demo", "live"})


@app.callback()
def _root(
    ctx: typer.Context,
    log_level: Annotated[
        str | None,
        typer.Option(
            "--log-level",
            envvar="TUBERUNNER_LOG_LEVEL",
            help=f"{', '.join(LOG_LEVELS)} (default info; warning for transcode and demo)",
        ),
    ] = None,
    log_format: Annotated[
        str,
        typer.Option(
            "--log-format",
            envvar="TUBERUNNER_LOG_FORMAT",
            help="text (human-readable) or json (one JSON object per line)",
        ),
    ] = "text",
) -> None:
    """Logging options go before the command: `tuberunner --log-format json server`."""
    if log_level is None:
        log_level = "warning" if ctx.invoked_subcommand in _QUIET_COMMANDS else "info"
    if log_level.lower() not in LOG_LEVELS:
        raise typer.BadParameter(f"one of {', '.join(LOG_LEVELS)}", param_hint="--log-level")
    if log_format not in LOG_FORMATS:
        raise typer.BadParameter(f"one of {', '.join(LOG_FORMATS)}", param_hint="--log-format")
    configure_logging(log_level, log_format)


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
    unclaimed_after: Annotated[
        float,
        typer.Option(
            "--unclaimed-after",
            min=1.0,
            help="Seconds a pending job may go untaken by every connected runner before it is reported "
            "(storyboards are then made by the coordinator)",
        ),
    ] = 180.0,
    redis_url: Annotated[
        str | None,
        typer.Option(
            "--redis-url",
            envvar="TUBERUNNER_REDIS_URL",
            help="Redis shared by several coordinator processes on one PostgreSQL database",
        ),
    ] = None,
    storage: Annotated[
        str | None,
        typer.Option(
            "--storage",
            envvar="TUBERUNNER_STORAGE",
            help="Where files live: a folder (default: files/ in the data folder) or s3://BUCKET/PREFIX "
            "(endpoint, region and credentials from the AWS variables and config files; "
            "?addressing=path for path-style servers)",
        ),
    ] = None,
    serve_outputs: Annotated[
        str,
        typer.Option(
            "--serve-outputs",
            help="With object storage: 'redirect' to presigned URLs, or 'stream' through the coordinator",
        ),
    ] = "redirect",
    rtmp_port: Annotated[
        int, typer.Option("--rtmp-port", min=0, max=65535, help="RTMP port for live publishers (0: live off)")
    ] = 1935,
    rtmp_public_host: Annotated[
        str | None,
        typer.Option(
            "--rtmp-public-host",
            help="Host in the RTMP URLs given to publishers and runners (default: the one they reached)",
        ),
    ] = None,
) -> None:
    """Serve the runner, admin and ingest APIs, RTMP for lives, and /healthz, /readyz, /metrics."""
    import uvicorn

    from tuberunner.coordinator.app import create_app
    from tuberunner.coordinator.config import CoordinatorConfig
    from tuberunner.ops.sd_notify import SystemdNotifier

    _check_coordinator_ffmpeg()
    if serve_outputs not in ("redirect", "stream"):
        raise typer.BadParameter("redirect or stream", param_hint="--serve-outputs")
    config = CoordinatorConfig(
        data_dir=data_dir,
        database_url=database_url,
        public_url=public_url,
        default_lease_s=lease,
        unclaimed_after_s=unclaimed_after,
        admin_token=os.environ.get("TUBERUNNER_ADMIN_TOKEN") or None,
        redis_url=redis_url,
        storage=storage,
        serve_outputs=serve_outputs,
        rtmp_port=rtmp_port,
        rtmp_host=host,
        rtmp_public_host=rtmp_public_host,
    )
    systemd = SystemdNotifier.from_env()
    server_config = uvicorn.Config(
        create_app(config, systemd=systemd),
        host=host,
        port=port,
        # Our logging set-up (level and format) applies to uvicorn's lines too.
        log_config=None,
        ws="websockets-sansio",
        timeout_graceful_shutdown=10,
        # A line per request costs more than the hot path itself; problems are logged by the app.
        access_log=False,
    )
    _notifying_server(server_config, systemd).run()


def _check_coordinator_ffmpeg() -> None:
    """The coordinator makes the preview of audio uploads with ffmpeg: an unusable one (missing, too old)
    stops it at start-up, exit code 2 like the runner's setup errors, rather than at the first upload."""
    import asyncio
    import logging

    from tuberunner.media.binaries import check_ffmpeg, find_ffmpeg
    from tuberunner.media.errors import FfmpegUnavailable

    log = logging.getLogger("tuberunner.coordinator")
    try:
        ffmpeg = find_ffmpeg()
        capabilities = asyncio.run(check_ffmpeg(ffmpeg))
    except FfmpegUnavailable as exc:
        log.error("cannot start: %s", exc)
        raise typer.Exit(2) from exc
    log.info("ffmpeg %s at %s", capabilities.version, ffmpeg)


def _notifying_server(config: uvicorn.Config, systemd: SystemdNotifier) -> uvicorn.Server:
    """uvicorn's server telling systemd READY=1 once it listens and STOPPING=1 when it stops."""
    import uvicorn

    class NotifyingServer(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if not self.should_exit:
                systemd.ready(f"serving on {config.host}:{config.port}")

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            systemd.stopping()
            await super().shutdown(sockets)

    return NotifyingServer(config)


registration_token_app = typer.Typer(help="Registration tokens of a coordinator.", no_args_is_help=True)
coordinator_app.add_typer(registration_token_app, name="registration-token")
live_app = typer.Typer(help="Live videos of a coordinator.", no_args_is_help=True)
coordinator_app.add_typer(live_app, name="live")
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
    video_id: Annotated[
        str | None, typer.Argument(help="Video id or uuid; without it, the jobs no connected runner takes")
    ] = None,
    url: _Url = DEFAULT_URL,
    admin_token: _Token = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show a video's state, jobs, attachments and outputs; or the pending jobs no connected runner takes."""
    from tuberunner.coordinator import ingest_client as ic

    try:
        token = ic.resolve_admin_token(admin_token)
        if video_id is None:
            unclaimed = ic.unclaimed_jobs(url, token)
            typer.echo(json.dumps(unclaimed, indent=2) if as_json else ic.format_unclaimed(unclaimed))
            return
        video = ic.video_status(url, token, video_id)
    except ic.ClientError as exc:
        _fail(exc)
    typer.echo(json.dumps(video, indent=2) if as_json else ic.format_status(video))


@live_app.command("create")
def live_create(
    name: Annotated[str, typer.Argument(help="Name of the live video")],
    url: _Url = DEFAULT_URL,
    admin_token: _Token = None,
    resolutions: Annotated[str | None, typer.Option("--resolutions", help="e.g. 480,240")] = None,
    save_replay: Annotated[
        bool, typer.Option("--save-replay", help="Make a video of each session when it ends")
    ] = False,
    permanent: Annotated[
        bool, typer.Option("--permanent", help="Wait for the next publication when a session ends")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="rtmpUrl, streamKey and uuid as JSON")] = False,
) -> None:
    """Create a live video: prints the RTMP URL and stream key to publish to, the video id last."""
    from tuberunner.coordinator import ingest_client as ic

    ladder = _parse_resolutions(resolutions)
    try:
        created = ic.create_live(
            url,
            ic.resolve_admin_token(admin_token),
            name,
            resolutions=ladder,
            save_replay=save_replay,
            permanent=permanent,
        )
    except ic.ClientError as exc:
        _fail(exc)
    live = created["live"]
    video_uuid = created["video"]["uuid"]
    if as_json:
        typer.echo(
            json.dumps({"rtmpUrl": live["rtmpUrl"], "streamKey": live["streamKey"], "uuid": video_uuid})
        )
        return
    typer.echo(f"RTMP URL:   {live['rtmpUrl']}")
    typer.echo(f"stream key: {live['streamKey']}")
    typer.echo(f"HLS:        {live['hlsUrl']}")
    typer.echo(video_uuid)


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
    cut: Annotated[
        str | None,
        typer.Option("--cut", metavar="START-END", help="Keep START to END seconds (either may be empty)"),
    ] = None,
    intro: Annotated[Path | None, typer.Option("--intro", metavar="FILE", help="Video put before")] = None,
    outro: Annotated[Path | None, typer.Option("--outro", metavar="FILE", help="Video put after")] = None,
    watermark: Annotated[
        Path | None, typer.Option("--watermark", metavar="FILE", help="Image put in the top right corner")
    ] = None,
    transcribe: Annotated[
        str | None,
        typer.Option(
            "--transcribe",
            metavar="[LANG]",
            help="Make a WebVTT caption; LANG (e.g. fr) or nothing to detect the language",
        ),
    ] = None,
    transcription_model: Annotated[
        str | None,
        typer.Option(
            "--transcription-model",
            metavar="NAME|DIR",
            help="Whisper model name (default small) or a local CTranslate2 model folder",
        ),
    ] = None,
) -> None:
    """Transcode one file into MP4s, an HLS ladder and more, with an embedded coordinator and runners.

    Studio edits (--cut, --intro, --outro, --watermark) are made first, in that order, by a studio job;
    the outputs are those of the edited video. Running the same command again resumes: completed jobs are
    not redone."""
    from tuberunner.oneshot.session import TranscodeOptions

    options = TranscodeOptions(
        input=input_file,
        output=output or input_file.with_name(input_file.stem + "-tuberunner"),
        resolutions=_parse_resolutions(resolutions),
        hls=hls,
        web_video=web_video,
        storyboard=storyboard,
        runners=runners,
        cut=_parse_cut(cut),
        intro=intro,
        outro=outro,
        watermark=watermark,
        transcribe=_parse_transcribe(transcribe),
        transcription_model=transcription_model,
    )
    raise typer.Exit(_run_transcode(options))


_LANGUAGE = re.compile(r"^[a-z]{2,3}$")


def _parse_transcribe(value: str | None) -> str | None:
    """`--transcribe` alone is "auto" (see `_optional_transcribe_value`), else a language code."""
    if value is None or value == "auto":
        return value
    if not _LANGUAGE.match(value.strip().lower()):
        raise typer.BadParameter("a language code such as en or fr, or nothing", param_hint="--transcribe")
    return value.strip().lower()


def _optional_transcribe_value(argv: list[str]) -> list[str]:
    """`--transcribe` takes an optional value (Click options cannot): when what follows is not a language
    code (another option, the input file, nothing), "auto" is put in."""
    fixed: list[str] = []
    for index, arg in enumerate(argv):
        fixed.append(arg)
        if arg == "--transcribe":
            following = argv[index + 1] if index + 1 < len(argv) else None
            if following is None or not _LANGUAGE.match(following):
                fixed.append("auto")
    return fixed


def _parse_cut(value: str | None) -> tuple[float | None, float | None] | None:
    """`START-END` in seconds (`1.5-10`, `-10`, `5-`) → (start, end)."""
    if value is None:
        return None
    start_text, separator, end_text = value.strip().partition("-")
    try:
        if not separator or not (start_text or end_text):
            raise ValueError(value)
        start = float(start_text) if start_text else None
        end = float(end_text) if end_text else None
    except ValueError:
        raise typer.BadParameter("START-END in seconds, e.g. 1.5-10, 5- or -10", param_hint="--cut") from None
    if start is not None and end is not None and end <= start:
        raise typer.BadParameter("END must come after START", param_hint="--cut")
    return start, end


@app.command()
def live(
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for the live HLS")],
    resolutions: Annotated[
        str | None, typer.Option("--resolutions", help="Ladder, e.g. 720,480 (default 720,480,360)")
    ] = None,
    rtmp_port: Annotated[
        int, typer.Option("--rtmp-port", min=1, max=65535, help="RTMP port to publish to")
    ] = 1935,
    name: Annotated[str, typer.Option("--name", help="Name of the live")] = "live",
) -> None:
    """Transcode one live with an embedded coordinator and runner: prints where to publish (RTMP URL and
    stream key, e.g. for OBS), writes the live HLS into OUT/ as it goes, and leaves a complete VOD HLS of the
    whole stream there when the publisher stops."""
    import asyncio
    import signal

    from tuberunner.oneshot.live import LiveOptions, run_live
    from tuberunner.oneshot.session import TranscodeError

    options = LiveOptions(
        output=output, resolutions=_parse_resolutions(resolutions), rtmp_port=rtmp_port, name=name
    )

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        try:
            result = await run_live(options, lambda line: typer.echo(line, err=True), stop)
        except TranscodeError as exc:
            typer.echo(f"error: {exc}", err=True)
            return exc.exit_code
        finally:
            loop.remove_signal_handler(signal.SIGINT)
            loop.remove_signal_handler(signal.SIGTERM)
        if result.error:
            typer.echo(f"the live ended with an error: {result.error}", err=True)
        counts = ", ".join(
            f"{playlist}: {len(names)} segments" for playlist, names in result.playlists.items()
        )
        typer.echo(f"live ended; VOD HLS in {output}/master.m3u8 ({counts or 'no segment'})", err=True)
        return 0 if result.playlists and not result.error else 1

    raise typer.Exit(asyncio.run(main()))


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
    import gc
    import threading

    from tuberunner.media.probe_client import start_probe_server

    # The probe server imports PyAV in a process of its own, while this one imports the rest.
    threading.Thread(target=start_probe_server, name="probe-server-start", daemon=True).start()
    # Start-up (imports, the embedded coordinator and runners) makes objects that live as long as the
    # process: collecting them is wasted work. `transcode` freezes them and collects again once started.
    gc.disable()
    try:
        return _transcode_in_loop(options)
    finally:
        gc.enable()


def _transcode_in_loop(options: TranscodeOptionsType) -> int:
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
    import sys

    app(args=_optional_transcribe_value(sys.argv[1:]))
