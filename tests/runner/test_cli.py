"""The runner's verbs with XDG folders in tmp: register/unregister against the real coordinator without a
daemon, listing, status from the status file, import, and the daemon's start-up failures."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from tests.runner.conftest import FakeProcessor, StartSupervisor, job_of, register, seed_job
from tests.support.protocol import create_video, input_url
from tests.support.servers import RunningCoordinator
from tuberunner.coordinator.models import JobSpec
from tuberunner.protocol.jobs import JobState, JobType
from tuberunner.runner.cli import app
from tuberunner.runner.client import InstanceClient
from tuberunner.runner.config import ConfigFile
from tuberunner.runner.errors import RunnerUnknown
from tuberunner.runner.paths import RunnerPaths, runner_paths
from tuberunner.runner.state import DaemonState, JobStatus, PidLock, running_daemon_pid, write_state


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {
        "XDG_CONFIG_HOME": str(tmp_path / "config-home"),
        "XDG_CACHE_HOME": str(tmp_path / "cache-home"),
        "HOME": str(tmp_path / "home"),
    }


@pytest.fixture
def paths(env: dict[str, str]) -> RunnerPaths:
    return runner_paths("default", env=env)


async def cli(env: dict[str, str], *args: str) -> Result:
    """Run a verb in a thread: the coordinator under test lives in this thread's event loop."""
    return await asyncio.to_thread(CliRunner().invoke, app, list(args), env=env)


async def test_register_is_idempotent_and_keeps_manual_edits(
    coordinator: RunningCoordinator, env: dict[str, str], paths: RunnerPaths
) -> None:
    token = await coordinator.coordinator.runners.create_registration_token()
    args = [
        "register",
        "--url",
        coordinator.url + "/",
        "--registration-token",
        token,
        "--runner-name",
        "cli-box",
    ]
    result = await cli(env, *args, "--runner-description", "made by a test")
    assert result.exit_code == 0, result.output
    assert "registered on" in result.output
    config = ConfigFile(paths.config_file).load(env={})
    (instance,) = config.instances
    assert (instance.url, instance.runner_name, instance.runner_description) == (
        coordinator.url,
        "cli-box",
        "made by a test",
    )
    assert await coordinator.coordinator.runners.by_token(instance.runner_token) is not None

    text = paths.config_file.read_text().replace("[jobs]\n", "[jobs]\n# hand-written note\nconcurrency = 5\n")
    paths.config_file.write_text(text)
    again = await cli(env, *args)
    assert again.exit_code == 0
    assert "already registered" in again.output
    other = await cli(env, *args[:-1], "cli-box-2")
    assert other.exit_code == 0, other.output
    assert "# hand-written note\nconcurrency = 5" in paths.config_file.read_text()
    assert [i.runner_name for i in ConfigFile(paths.config_file).load(env={}).instances] == [
        "cli-box",
        "cli-box-2",
    ]


@pytest.mark.parametrize(
    ("url", "token", "code", "message"),
    [
        (None, "ptrrt-wrong", 1, "Registration token is invalid"),
        ("ftp://nowhere", "ptrrt-x", 2, "http:// or https://"),
        ("http://127.0.0.1:9", "ptrrt-x", 1, "register 'n' on http://127.0.0.1:9"),
    ],
)
async def test_a_failed_registration_exits_non_zero_and_changes_nothing(
    coordinator: RunningCoordinator,
    env: dict[str, str],
    paths: RunnerPaths,
    url: str | None,
    token: str,
    code: int,
    message: str,
) -> None:
    result = await cli(
        env, "register", "--url", url or coordinator.url, "--registration-token", token, "--runner-name", "n"
    )
    assert result.exit_code == code
    assert message in result.output
    assert not paths.config_file.exists() or ConfigFile(paths.config_file).load(env={}).instances == ()


async def test_a_name_taken_on_the_instance_is_explained(
    coordinator: RunningCoordinator, env: dict[str, str]
) -> None:
    await register(coordinator, "taken")
    token = await coordinator.coordinator.runners.create_registration_token()
    result = await cli(
        env, "register", "--url", coordinator.url, "--registration-token", token, "--runner-name", "taken"
    )
    assert result.exit_code == 1
    assert "This runner name already exists on this instance" in result.output


async def test_unregister_removes_the_runner_everywhere_and_is_idempotent(
    coordinator: RunningCoordinator, env: dict[str, str], paths: RunnerPaths
) -> None:
    instance = await register(coordinator, "leaving")
    ConfigFile(paths.config_file).save_instance(instance)
    result = await cli(env, "unregister", "--url", coordinator.url, "--runner-name", "leaving")
    assert result.exit_code == 0, result.output
    assert ConfigFile(paths.config_file).load(env={}).instances == ()
    async with InstanceClient(coordinator.url, instance.runner_token) as client:
        with pytest.raises(RunnerUnknown):
            await client.request_jobs(frozenset(), None)
    again = await cli(env, "unregister", "--url", coordinator.url, "--runner-name", "leaving")
    assert again.exit_code == 0
    assert "nothing to do" in again.output


async def test_unregister_from_an_unreachable_instance_needs_force(
    env: dict[str, str], paths: RunnerPaths
) -> None:
    from tuberunner.runner.config import InstanceConfig

    ConfigFile(paths.config_file).save_instance(InstanceConfig("http://127.0.0.1:9", "ptrt-x", "gone"))
    args = ["unregister", "--url", "http://127.0.0.1:9", "--runner-name", "gone"]
    refused = await cli(env, *args)
    assert refused.exit_code == 1
    assert "--force" in refused.output
    assert len(ConfigFile(paths.config_file).load(env={}).instances) == 1
    forced = await cli(env, *args, "--force")
    assert forced.exit_code == 0, forced.output
    assert "only locally" in forced.output
    assert ConfigFile(paths.config_file).load(env={}).instances == ()


async def test_list_registered_reads_the_config_file(env: dict[str, str], paths: RunnerPaths) -> None:
    from tuberunner.runner.config import InstanceConfig

    config_file = ConfigFile(paths.config_file)
    config_file.save_instance(InstanceConfig("https://a.example", "ptrt-a", "ra", "first"))
    config_file.save_instance(InstanceConfig("https://b.example", "ptrt-b", "rb"))
    config_file.set_needs_registration("https://b.example", "rb", "ptrt-b")
    result = await cli(env, "list-registered", "--json")
    assert result.exit_code == 0
    assert json.loads(result.output) == [
        {
            "url": "https://a.example",
            "runnerName": "ra",
            "runnerDescription": "first",
            "needsRegistration": False,
        },
        {
            "url": "https://b.example",
            "runnerName": "rb",
            "runnerDescription": None,
            "needsRegistration": True,
        },
    ]
    table = await cli(env, "list-registered")
    assert "needs registration" in table.output
    assert "ptrt-" not in table.output  # tokens are secrets


async def test_status_says_when_no_daemon_runs(env: dict[str, str], paths: RunnerPaths) -> None:
    for verb in ("status", "list-jobs"):
        result = await cli(env, verb)
        assert result.exit_code == 1
        assert "is not running (it left no status file)" in result.output
    # A stale pid file and status file of a dead daemon: the lock is free, so it is not running.
    paths.cache_dir.mkdir(parents=True)
    paths.pid_file.write_text("999999\n")
    paths.state_file.write_text('{"pid": 999999}')
    result = await cli(env, "status", "--json")
    assert result.exit_code == 1
    assert json.loads(result.output) == {"running": False, "runner_id": "default"}


async def test_status_and_list_jobs_show_the_running_daemon(
    coordinator: RunningCoordinator,
    start_supervisor: StartSupervisor,
    env: dict[str, str],
    paths: RunnerPaths,
) -> None:
    instance = await register(coordinator, "busy")
    processor = FakeProcessor(progress=25)
    job_uuid = await seed_job(coordinator)
    with PidLock(paths.pid_file):
        harness = await start_supervisor(
            [instance], processor, state_file=paths.state_file, runner_id="default"
        )
        await asyncio.wait_for(processor.started.wait(), 10)
        supervisor = harness.supervisor
        assert await supervisor.wait_for(
            lambda: (
                all(w.status.last_contact_at for w in supervisor.workers.values())
                and json.loads(paths.state_file.read_text())["jobs"] != []
            ),
            10,
        )
        status = await cli(env, "status", "--json")
        assert status.exit_code == 0, status.output
        body = json.loads(status.output)
        assert (body["running"], body["pid"], body["concurrency"]) == (True, os.getpid(), 2)
        (shown,) = body["instances"]
        assert (shown["url"], shown["runner_name"], shown["registration"]) == (
            coordinator.url,
            "busy",
            "registered",
        )
        jobs = await cli(env, "list-jobs", "--json")
        (job,) = json.loads(jobs.output)
        assert (job["uuid"], job["type"], job["progress"]) == (job_uuid, "vod-web-video-transcoding", 25)
        table = await cli(env, "status")
        assert job_uuid in table.output
        assert "25 %" in table.output
        processor.release.set()


async def test_import_config_takes_the_official_file_of_the_same_id(
    env: dict[str, str], paths: RunnerPaths
) -> None:
    official = Path(env["XDG_CONFIG_HOME"]) / "peertube-runner-nodejs" / "default" / "config.toml"
    official.parent.mkdir(parents=True)
    official.write_text(
        '[jobs]\nconcurrency = 3\n[[registeredInstances]]\nurl = "https://pt.example"\n'
        'runnerToken = "ptrt-o"\nrunnerName = "old"\n'
    )
    result = await cli(env, "import-config")
    assert result.exit_code == 0, result.output
    assert "added https://pt.example as 'old'" in result.output
    config = ConfigFile(paths.config_file).load(env={})
    assert config.concurrency == 3
    assert config.instance("https://pt.example", "old") is not None
    missing = await cli(env, "import-config", str(paths.config_file.parent / "nope.toml"))
    assert missing.exit_code == 2


async def test_the_daemon_does_not_start_with_a_broken_config_a_missing_ffmpeg_or_a_twin(
    env: dict[str, str], paths: RunnerPaths
) -> None:
    paths.config_file.parent.mkdir(parents=True)
    paths.config_file.write_text("[jobs]\nconcurrency = 'x'\n")
    broken = await cli(env, "server")
    assert broken.exit_code == 2
    paths.config_file.write_text('[ffmpeg]\npath = "/nonexistent/ffmpeg"\n')
    no_ffmpeg = await cli(env, "server")
    assert no_ffmpeg.exit_code == 2
    bad_type = await cli(env, "server", "--enable-job", "vod-hsl")
    assert bad_type.exit_code == 2
    with PidLock(paths.pid_file):
        twin = await cli(env, "server")
    assert twin.exit_code == 1


async def test_the_daemon_runs_a_real_job_and_drains_on_sigterm(
    coordinator: RunningCoordinator, env: dict[str, str], paths: RunnerPaths, clip: Path, tmp_path: Path
) -> None:
    """`tuberunner server` as a process: real processors and ffmpeg, status file, SIGTERM → exit 0."""
    instance = await register(coordinator, "daemon")
    config_file = ConfigFile(paths.config_file)
    config_file.ensure_exists()
    text = (
        paths.config_file.read_text()
        .replace("[jobs]\n", "[jobs]\nupdate_interval_s = 0.2\nshutdown_grace_s = 5\n")
        .replace("[daemon]\n", "[daemon]\nstate_interval_s = 0.1\nconfig_check_interval_s = 0.1\n")
    )
    paths.config_file.write_text(text)
    config_file.save_instance(instance)
    video_id, video_uuid = await create_video(coordinator, source=clip.read_bytes(), resolution=240)
    job_uuid = str(uuid.uuid4())
    payload = {
        "input": {"videoFileUrl": input_url(job_uuid, video_uuid), "separatedAudioFileUrl": []},
        "output": {"resolution": 144, "fps": 10},
    }
    spec = JobSpec(
        job_uuid, JobType.VOD_WEB_VIDEO, 100, payload, {"videoUUID": video_uuid, "isNewVideo": True}
    )
    log_path = tmp_path / "daemon.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tuberunner.runner.cli",
            "server",
            env={**os.environ, **env},
            stdout=log,
            stderr=log,
        )
        try:
            await coordinator.coordinator.jobs.create(video_id, [spec])
            async with asyncio.timeout(30):
                while (row := await job_of(coordinator, job_uuid)) is None or row.state != JobState.COMPLETED:
                    assert process.returncode is None, log_path.read_text()
                    await asyncio.sleep(0.1)  # another process: nothing to await but its effects
                status = await cli(env, "status", "--json")
                assert status.exit_code == 0, status.output
                assert json.loads(status.output)["instances"][0]["runner_name"] == "daemon"
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), 15) == 0, log_path.read_text()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert running_daemon_pid(paths.pid_file) is None
    assert list(paths.work_dir.iterdir()) == []
    stopped = await cli(env, "status")
    assert stopped.exit_code == 1


async def test_status_warns_when_the_daemon_stopped_stamping_its_status(
    env: dict[str, str], paths: RunnerPaths
) -> None:
    paths.cache_dir.mkdir(parents=True)
    stuck = DaemonState(
        pid=os.getpid(),
        runner_id="default",
        version="1.0.0",
        started_at=time.time() - 3600,
        updated_at=time.time() - 600,
        concurrency=1,
        state_interval_s=2.0,
    )
    write_state(paths.state_file, stuck)
    with PidLock(paths.pid_file):
        result = await cli(env, "status")
        as_json = await cli(env, "status", "--json")
    assert result.exit_code == 0
    assert "it may be stuck" in result.output
    assert json.loads(as_json.output)["stale_s"] >= 600


async def test_status_counts_busy_slots_without_waiting_results_and_lives_apart(
    env: dict[str, str], paths: RunnerPaths
) -> None:
    paths.cache_dir.mkdir(parents=True)

    def job(uuid_: str, job_type: JobType, phase: str) -> JobStatus:
        return JobStatus(uuid_, str(job_type), "http://peertube.example", phase, time.time(), None)

    state = DaemonState(
        pid=os.getpid(),
        runner_id="default",
        version="1.0.0",
        started_at=time.time(),
        updated_at=time.time(),
        concurrency=2,
        live_concurrency=1,
        jobs=[
            job("a", JobType.VOD_WEB_VIDEO, "running"),
            job("b", JobType.VOD_HLS, "delivering"),  # its result waits: no slot
            job("c", JobType.LIVE_RTMP_HLS, "running"),
        ],
    )
    write_state(paths.state_file, state)
    with PidLock(paths.pid_file):
        result = await cli(env, "status")
    assert result.exit_code == 0, result.output
    assert "1/2 slot(s) busy, 1/1 live" in result.output
