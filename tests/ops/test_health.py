"""Liveness and readiness: the runner daemon's endpoint follows its instance going down and coming back,
and an instance that forgot the runner; readiness also needs ffmpeg and disk space; a blocked event loop
is not healthy; the coordinator's readiness needs its storage."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import (
    ADMIN,
    daemon_env,
    register_daemon,
    run_cli,
    stop_daemon,
)
from tests.ops.conftest import (
    DAEMON_SETTINGS,
    answer_of,
    get,
    metrics_of,
    start_tuberunner,
    total,
    until,
    value,
)
from tests.runner.conftest import FAST, FakeProcessor, idle_worker, register
from tests.support.servers import CoordinatorProcess, RunningCoordinator, free_port
from tuberunner.ops.health import LoopMonitor
from tuberunner.ops.http import RunnerEndpoint
from tuberunner.protocol.jobs import JobType
from tuberunner.runner.job import ProcessingSettings
from tuberunner.runner.supervisor import Supervisor


async def test_the_daemon_is_ready_while_its_instance_answers_and_knows_it(tmp_path: Path) -> None:
    coordinator = CoordinatorProcess(tmp_path / "coordinator", None)
    await asyncio.to_thread(coordinator.start)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = daemon_env(tmp_path / "home", TUBERUNNER_DAEMON_HTTP_PORT=str(port), **DAEMON_SETTINGS)
    log_path = tmp_path / "daemon.log"
    daemon: asyncio.subprocess.Process | None = None
    try:
        await register_daemon(env, coordinator.url, "watched")
        daemon = await start_tuberunner(env, log_path, "server")
        ready = await answer_of(endpoint + "/readyz", 200)
        assert ready["checks"]["instances"] == {
            "ok": True,
            "detail": f"{coordinator.url} (watched): reachable",
        }
        assert {name for name, check in ready["checks"].items() if check["ok"]} == {
            "event_loop",
            "instances",
            "ffmpeg",
            "disk",
            "accepting",
        }
        metrics = await metrics_of(endpoint)
        labels = {"instance": coordinator.url, "runner_name": "watched"}
        assert value(metrics, "tuberunner_runner_instance_up", **labels) == 1

        # The instance goes down: not ready (alive all the same), and the failed check is counted.
        await asyncio.to_thread(coordinator.stop)
        down = await answer_of(endpoint + "/readyz", 503)
        assert down["status"] == "fail"
        assert down["checks"]["instances"]["ok"] is False
        assert f"{coordinator.url} (watched): unreachable" in down["checks"]["instances"]["detail"]
        healthz = await get(endpoint + "/healthz")
        assert healthz is not None
        assert healthz.status_code == 200
        metrics = await metrics_of(endpoint)
        assert value(metrics, "tuberunner_runner_instance_up", **labels) == 0
        assert value(metrics, "tuberunner_runner_socket_connected", **labels) == 0
        assert total(metrics, "tuberunner_runner_retries_total", error_class="transient") >= 1
        # `status` reads the status file, rewritten soon after each change.
        shown: list[dict[str, object]] = []

        async def status_shows_it_unreachable() -> bool:
            status = await run_cli(env, "status", "--json")
            assert status.returncode == 0, status.stderr
            shown[:] = json.loads(status.stdout)["instances"]
            return shown[0]["reachable"] is False

        await until(status_shows_it_unreachable, "`status` shows the instance unreachable")
        assert shown[0]["registration"] == "registered"

        # Back up on the same port: ready again (a check answered), and the socket reconnects (its own
        # backoff: it may come a moment after readiness).
        await asyncio.to_thread(coordinator.start)
        await answer_of(endpoint + "/readyz", 200)
        metrics = await metrics_of(endpoint)
        assert value(metrics, "tuberunner_runner_instance_up", **labels) == 1

        async def socket_reconnected() -> bool:
            metrics = await metrics_of(endpoint)
            return value(metrics, "tuberunner_runner_socket_reconnects_total", instance=coordinator.url) == 1

        await until(socket_reconnected, "the socket reconnected once")

        # The instance forgets the runner: not authorised any more, so not ready.
        async with httpx.AsyncClient(base_url=coordinator.url, headers=ADMIN, timeout=30) as http:
            runners = (await http.get("/api/v1/runners")).json()["data"]
            (runner,) = [r for r in runners if r["name"] == "watched"]
            (await http.delete(f"/api/v1/runners/{runner['id']}")).raise_for_status()
        forgotten = await answer_of(endpoint + "/readyz", 503)
        assert (
            forgotten["checks"]["instances"]["detail"] == f"{coordinator.url} (watched): needs registration"
        )
        metrics = await metrics_of(endpoint)
        assert value(metrics, "tuberunner_runner_instance_registered", **labels) == 0
        assert value(metrics, "tuberunner_runner_give_ups_total", error_class="runner_unknown") == 1

        assert await stop_daemon(daemon) == 0, log_path.read_text()[-3000:]
    finally:
        if daemon is not None and daemon.returncode is None:
            daemon.kill()
            await daemon.wait()
        await asyncio.to_thread(coordinator.stop)


async def test_readiness_needs_ffmpeg_and_disk_space(coordinator: RunningCoordinator, tmp_path: Path) -> None:
    ffmpeg = tmp_path / "bin" / "ffmpeg"
    ffmpeg.parent.mkdir()
    shutil.copy("/bin/true", ffmpeg)
    instance = await register(coordinator, "checked")
    supervisor = Supervisor(
        replace(FAST, instances=(instance,)),
        work_dir=tmp_path / "work",
        processors={JobType.VOD_WEB_VIDEO: FakeProcessor(wait=False)},
        supports=lambda job_type, payload: None,
        settings=ProcessingSettings(ffmpeg=ffmpeg),
    )
    task = asyncio.create_task(supervisor.run())
    try:
        await idle_worker(supervisor)
        async with RunnerEndpoint(supervisor, "127.0.0.1", 0) as endpoint:
            ready = await answer_of(endpoint.url + "/readyz", 200)
            assert ready["checks"]["ffmpeg"] == {"ok": True, "detail": str(ffmpeg)}

            ffmpeg.unlink()
            gone = await answer_of(endpoint.url + "/readyz", 503)
            assert gone["checks"]["ffmpeg"] == {
                "ok": False,
                "detail": f"{ffmpeg} is missing or not executable",
            }
            shutil.copy("/bin/true", ffmpeg)
            await answer_of(endpoint.url + "/readyz", 200)

            supervisor.apply_config(replace(supervisor.config, min_free_disk_bytes=2**62))
            full = await answer_of(endpoint.url + "/readyz", 503)
            assert full["checks"]["disk"]["ok"] is False
            assert full["checks"]["instances"]["ok"] is True
            metrics = await metrics_of(endpoint.url)
            assert (value(metrics, "tuberunner_runner_disk_free_bytes") or 0) > 0

            # Not found and not allowed are answered too.
            missing = await get(endpoint.url + "/nothing")
            assert missing is not None
            assert missing.status_code == 404
            async with httpx.AsyncClient() as http:
                assert (await http.post(endpoint.url + "/readyz")).status_code == 405
    finally:
        supervisor.request_stop()
        assert await asyncio.wait_for(task, 20)


async def test_a_blocked_event_loop_is_not_healthy_until_it_turns_again() -> None:
    ticked = asyncio.Event()
    monitor = LoopMonitor(0.05, max_lag_s=0.2, on_tick=ticked.set)
    task = asyncio.create_task(monitor.run())
    try:
        await ticked.wait()
        assert monitor.check().ok
        ticked.clear()
        time.sleep(0.5)  # the fault: something blocks the loop
        stale = monitor.check()
        assert not stale.ok
        assert stale.detail.startswith("no tick for")
        await ticked.wait()  # the first tick after the block measures how late it woke
        late = monitor.check()
        assert not late.ok
        assert late.detail.startswith("the event loop woke")
        ticked.clear()
        await ticked.wait()
        assert monitor.check().ok
        assert monitor.max_lag_seen_s >= 0.3
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.parametrize("coordinator_config", [{"rtmp_port": None}], indirect=True)
async def test_the_coordinator_is_ready_while_its_storage_takes_files(
    coordinator: RunningCoordinator,
) -> None:
    healthz = await answer_of(coordinator.url + "/healthz", 200)
    assert healthz["checks"]["event_loop"]["ok"] is True
    ready = await answer_of(coordinator.url + "/readyz", 200)
    assert set(ready["checks"]) == {"event_loop", "started", "database", "storage", "socket", "rtmp"}
    assert ready["checks"]["rtmp"]["detail"].startswith("RTMP on 127.0.0.1:")
    assert ready["checks"]["database"] == {"ok": True, "detail": "answers SELECT 1"}

    files = coordinator.config.files_dir
    moved = files.with_name("files-moved")
    files.rename(moved)
    files.write_bytes(b"not a folder")  # the files folder replaced by a file: nothing can be stored
    try:
        broken = await answer_of(coordinator.url + "/readyz", 503)
        assert broken["checks"]["storage"]["ok"] is False
        assert broken["checks"]["database"]["ok"] is True
    finally:
        files.unlink()
        moved.rename(files)
    await answer_of(coordinator.url + "/readyz", 200)
