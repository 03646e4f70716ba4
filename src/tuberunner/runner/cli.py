"""The runner's verbs, as in the official runner, plus `status` and `import-config`.

None of them needs a running daemon, except that `status` and `list-jobs` read what it writes:

    server            run the daemon (see daemon.py for exit codes)
    register          register on an instance and add it to the config file (idempotent)
    unregister        unregister from an instance and remove it from the config file (idempotent)
    list-registered   instances in the config file
    list-jobs         jobs the daemon is running (from its status file)
    status            daemon, instances, jobs and recent errors (from its status file)
    import-config     take instances and settings from an official runner's config.toml

A running daemon picks up `register` / `unregister` by watching the config file. Exit codes: 0 done (also
"already registered" and "not registered, nothing to do"); 1 the instance refused or could not be reached,
or (status, list-jobs) no daemon runs; 2 bad arguments or configuration.

Mounted by the root CLI at the top level: `app.add_typer(tuberunner.runner.cli.app)`.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from tuberunner import __version__
from tuberunner.runner.client import client_for
from tuberunner.runner.config import (
    ConfigError,
    ConfigFile,
    InstanceConfig,
    RunnerConfig,
    normalize_url,
)
from tuberunner.runner.errors import RunnerError, RunnerUnknown
from tuberunner.runner.paths import InvalidRunnerId, RunnerPaths, official_config_file, runner_paths
from tuberunner.runner.retry import RetryPolicy
from tuberunner.runner.state import DaemonState, read_state, running_daemon_pid

__all__ = [
    "EXIT_FAILED",
    "EXIT_USAGE",
    "app",
    "import_config",
    "list_jobs",
    "list_registered",
    "register",
    "server",
    "status",
    "unregister",
]

EXIT_FAILED = 1
EXIT_USAGE = 2

app = typer.Typer(help="PeerTube-compatible remote runner.", no_args_is_help=True)

RunnerIdOption = Annotated[
    str,
    typer.Option("--id", envvar="TUBERUNNER_ID", help="Runner id: separate config, cache and daemon per id."),
]
ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        envvar="TUBERUNNER_CONFIG",
        help="Config file (default: $XDG_CONFIG_HOME/tuberunner/<id>/config.toml).",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _console() -> Console:
    # Piped or captured output gets whole lines (job ids, URLs) instead of a table folded at 80 columns.
    return Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)


def _fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(code)


def _paths(runner_id: str, config: Path | None) -> RunnerPaths:
    try:
        return runner_paths(runner_id, config_file=config)
    except InvalidRunnerId as exc:
        _fail(str(exc), EXIT_USAGE)


def _load(config_file: ConfigFile) -> RunnerConfig:
    try:
        return config_file.load()
    except ConfigError as exc:
        _fail(str(exc), EXIT_USAGE)


def _url(url: str) -> str:
    try:
        return normalize_url(url)
    except ValueError as exc:
        _fail(f"--url {exc}", EXIT_USAGE)


# ------------------------------------------------------------------------------------------ daemon


@app.command()
def server(
    runner_id: RunnerIdOption = "default",
    config: ConfigOption = None,
    enable_job: Annotated[
        list[str] | None,
        typer.Option("--enable-job", help="Take only this job type (repeat for several; default: all)."),
    ] = None,
) -> None:
    """Run the runner daemon until SIGTERM/SIGINT (a second SIGINT stops at once)."""
    from tuberunner.runner.daemon import DaemonOptions, run_daemon

    paths = _paths(runner_id, config)
    options = DaemonOptions(paths.runner_id, config, tuple(enable_job or ()))
    raise typer.Exit(asyncio.run(run_daemon(options)))


# ------------------------------------------------------------------------------------------ registration


@app.command()
def register(
    url: Annotated[str, typer.Option("--url", help="Instance URL, e.g. https://peertube.example.org")],
    registration_token: Annotated[
        str, typer.Option("--registration-token", help="Registration token (ptrrt-…) from the instance admin")
    ],
    runner_name: Annotated[str, typer.Option("--runner-name", help="Name of this runner on the instance")],
    runner_description: Annotated[
        str | None, typer.Option("--runner-description", help="Description shown to the instance admin")
    ] = None,
    runner_id: RunnerIdOption = "default",
    config: ConfigOption = None,
) -> None:
    """Register this runner on an instance and add it to the config file (no daemon needed)."""
    url = _url(url)
    if not 1 <= len(runner_name) <= 100:
        _fail("--runner-name must have 1 to 100 characters", EXIT_USAGE)
    config_file = ConfigFile(_paths(runner_id, config).config_file)
    settings = _load(config_file)
    known = settings.instance(url, runner_name)
    if known is not None and not known.needs_registration:
        typer.echo(f"Runner {runner_name!r} is already registered on {url}: nothing to do.")
        return

    async def call() -> str:
        async with client_for(url, "", settings) as client:
            registration = await client.register(
                registration_token, runner_name, runner_description, version=__version__
            )
            return registration.runner_token

    try:
        token = asyncio.run(call())
    except RunnerError as exc:
        _fail(f"registration refused or failed: {exc.message}")
    instance = InstanceConfig(url, token, runner_name, runner_description)
    try:
        config_file.save_instance(instance)
    except (ConfigError, OSError) as exc:
        # Do not leave a registration nobody holds the token of (its name would be taken for good).
        asyncio.run(_unregister_quietly(url, token, settings))
        _fail(f"registered, but the config file could not be written, so it was undone: {exc}")
    again = "registered again" if known is not None else "registered"
    typer.echo(
        f"Runner {runner_name!r} {again} on {url} (config: {config_file.path}). A running daemon picks it "
        f"up within {settings.config_check_interval_s:g} s."
    )


async def _unregister_quietly(url: str, token: str, settings: RunnerConfig) -> None:
    try:
        async with client_for(url, token, settings) as client:
            await client.unregister()
    except RunnerError:
        pass


@app.command()
def unregister(
    url: Annotated[str, typer.Option("--url", help="Instance URL")],
    runner_name: Annotated[str, typer.Option("--runner-name", help="Name of this runner on the instance")],
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Remove the instance from the config file even if it cannot be reached."
        ),
    ] = False,
    runner_id: RunnerIdOption = "default",
    config: ConfigOption = None,
) -> None:
    """Unregister this runner from an instance and remove it from the config file (no daemon needed)."""
    url = _url(url)
    config_file = ConfigFile(_paths(runner_id, config).config_file)
    settings = _load(config_file)
    instance = settings.instance(url, runner_name)
    if instance is None:
        typer.echo(f"Runner {runner_name!r} is not registered on {url} in {config_file.path}: nothing to do.")
        return

    async def call() -> None:
        async with client_for(url, instance.runner_token, settings) as client:
            await RetryPolicy(attempts=3, base_delay_s=0.25, deadline_s=settings.call_timeout_s).run(
                client.unregister, what=f"unregister from {url}"
            )

    try:
        asyncio.run(call())
        note = ""
    except RunnerUnknown:
        note = " (the instance had already forgotten it)"
    except RunnerError as exc:
        if not force:
            _fail(f"{exc.message}. Nothing was changed; --force removes it from the config file anyway")
        note = f" (only locally: {exc.message})"
    try:
        config_file.remove_instance(url, runner_name)
    except (ConfigError, OSError) as exc:
        _fail(f"unregistered, but the config file could not be changed: {exc}")
    typer.echo(f"Runner {runner_name!r} unregistered from {url}{note}.")


@app.command("list-registered")
def list_registered(
    runner_id: RunnerIdOption = "default", config: ConfigOption = None, as_json: JsonOption = False
) -> None:
    """Instances this runner is registered on (from the config file)."""
    config_file = ConfigFile(_paths(runner_id, config).config_file)
    instances = _load(config_file).instances
    if as_json:
        shown = [
            {
                "url": i.url,
                "runnerName": i.runner_name,
                "runnerDescription": i.runner_description,
                "needsRegistration": i.needs_registration,
            }
            for i in instances
        ]
        typer.echo(json.dumps(shown, indent=1))
        return
    if not instances:
        typer.echo(f"No instance registered in {config_file.path}.")
        return
    table = Table("URL", "Runner name", "Description", "State")
    for i in instances:
        state = "[red]needs registration[/red]" if i.needs_registration else "registered"
        table.add_row(i.url, i.runner_name, i.runner_description or "", state)
    _console().print(table)


@app.command("import-config")
def import_config(
    source: Annotated[
        Path | None,
        typer.Argument(help="Official config.toml (default: peertube-runner-nodejs/<id>/config.toml)"),
    ] = None,
    runner_id: RunnerIdOption = "default",
    config: ConfigOption = None,
) -> None:
    """Take registered instances and settings from the official runner's config file.

    Instances already present are kept; a setting is only taken when this config does not set it. Stop the
    official runner before starting this one with the same registrations."""
    paths = _paths(runner_id, config)
    source = source or official_config_file(paths.runner_id)
    if not source.exists():
        _fail(f"{source} does not exist", EXIT_USAGE)
    config_file = ConfigFile(paths.config_file)
    try:
        result = config_file.import_official(source)
    except (ConfigError, OSError) as exc:
        _fail(str(exc), EXIT_USAGE)
    for instance in result.added:
        typer.echo(f"added {instance.url} as {instance.runner_name!r}")
    for instance in result.already_present:
        typer.echo(f"kept {instance.url} as {instance.runner_name!r} (already present)")
    for setting in result.settings:
        typer.echo(f"set {setting}")
    typer.echo(f"Imported {source} into {config_file.path}.")


# ------------------------------------------------------------------------------------------ status


def _daemon_state(paths: RunnerPaths) -> tuple[int | None, DaemonState | None]:
    return running_daemon_pid(paths.pid_file), read_state(paths.state_file)


def _ago(at: float | None) -> str:
    if at is None:
        return "never"
    return f"{_duration(time.time() - at)} ago"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min {seconds % 60:02.0f} s"
    return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:02.0f} min"


def _not_running(paths: RunnerPaths, state: DaemonState | None, as_json: bool) -> NoReturn:
    detail = (
        f"its last status was written {_ago(state.updated_at)} by pid {state.pid}"
        if state
        else "it left no status file"
    )
    if as_json:
        typer.echo(json.dumps({"running": False, "runner_id": paths.runner_id}))
    else:
        typer.echo(f"The runner daemon {paths.runner_id!r} is not running ({detail}).")
    raise typer.Exit(EXIT_FAILED)


def _jobs_table(state: DaemonState) -> Table:
    table = Table("Job", "Type", "Instance", "Phase", "Progress", "Speed", "ETA", "Started")
    for job in state.jobs:
        progress = "?" if job.progress is None else f"{job.progress:.0f} %"
        speed = "" if job.speed is None else f"{job.speed:.2f}x"
        eta = "" if job.eta_s is None else _duration(job.eta_s)
        table.add_row(
            job.uuid, job.type, job.instance_url, job.phase, progress, speed, eta, _ago(job.started_at)
        )
    return table


@app.command("list-jobs")
def list_jobs(
    runner_id: RunnerIdOption = "default", config: ConfigOption = None, as_json: JsonOption = False
) -> None:
    """Jobs the daemon is working on."""
    paths = _paths(runner_id, config)
    pid, state = _daemon_state(paths)
    if pid is None or state is None:
        _not_running(paths, state, as_json)
    if as_json:
        typer.echo(json.dumps([asdict(job) for job in state.jobs], indent=1))
        return
    if not state.jobs:
        typer.echo("No job running.")
        return
    _console().print(_jobs_table(state))


@app.command()
def status(
    runner_id: RunnerIdOption = "default", config: ConfigOption = None, as_json: JsonOption = False
) -> None:
    """Daemon, instances (connection, last contact, registration), jobs and recent errors."""
    paths = _paths(runner_id, config)
    pid, state = _daemon_state(paths)
    if pid is None or state is None:
        _not_running(paths, state, as_json)
    stale = state.stale_for_s(time.time())
    if as_json:
        body: dict[str, Any] = {"running": True, "stale_s": stale, **state.to_json()}
        typer.echo(json.dumps(body, indent=1))
        return
    console = _console()
    mode = "draining (stopping)" if state.draining else "running"
    console.print(
        f"Runner {state.runner_id!r} {mode}: pid {state.pid}, version {state.version}, "
        f"up {_duration(time.time() - state.started_at)}, {state.slots_line()}"
    )
    if stale is not None:
        console.print(
            f"[red]The daemon has not updated its status for {_duration(stale)}: it may be stuck.[/red]"
        )
    if state.endpoint:
        console.print(f"Health and metrics: {state.endpoint}/healthz, /readyz, /metrics", markup=False)
    instances = Table(
        "Instance", "Runner name", "Registration", "Reachable", "Socket", "Last contact", "Last error"
    )
    for i in state.instances:
        registration = "[red]needs registration[/red]" if i.registration != "registered" else "registered"
        reachable = "yes" if i.reachable else "[red]no[/red]"
        error = f"{i.last_error} ({_ago(i.last_error_at)})" if i.last_error else ""
        socket = "connected" if i.socket_connected else "not connected"
        instances.add_row(
            i.url, i.runner_name, registration, reachable, socket, _ago(i.last_contact_at), error
        )
    console.print(instances)
    if state.jobs:
        console.print(_jobs_table(state))
    else:
        console.print("No job running.")
    if state.errors:
        console.print("Recent errors (whole messages: --json, or the daemon's log):")
        for record in state.errors[-10:]:
            first, *more = record.message.splitlines() or [""]
            extra = f" (+{len(more)} line(s))" if more else ""
            console.print(f"  {_ago(record.at)} [{record.where}] {first}{extra}", markup=False)


if __name__ == "__main__":  # pragma: no cover - `python -m tuberunner.runner.cli`
    app()
