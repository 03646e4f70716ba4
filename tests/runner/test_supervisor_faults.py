"""The supervisor when things go wrong: unreachable server, forgotten runner, pings during a check,
shutdown with work in progress, a success whose answer was lost, a config file edited while running."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import socketio

from tests.runner.conftest import (
    FakeProcessor,
    StartSupervisor,
    idle_worker,
    job_of,
    register,
    seed_job,
)
from tests.support.servers import RunningCoordinator
from tests.support.tcp_proxy import Plan, TcpProxy
from tuberunner.protocol.errors import ErrorCode
from tuberunner.protocol.jobs import JobState, JobType
from tuberunner.runner.client import AvailableJob, InstanceClient
from tuberunner.runner.config import ConfigFile, InstanceConfig, RunnerConfig
from tuberunner.runner.errors import JobGone, TransientError
from tuberunner.runner.job import AcceptedJob, JobOutput
from tuberunner.runner.outbox import Outbox
from tuberunner.runner.retry import RetryPolicy
from tuberunner.runner.supervisor import CancelReason, JobOutcome, JobPhase

WAIT_S = 10.0


async def test_a_job_whose_server_cannot_be_reached_is_given_up_after_the_outage_limit(
    coordinator: RunningCoordinator, start_supervisor: StartSupervisor
) -> None:
    port = int(coordinator.url.rsplit(":", 1)[1])
    async with TcpProxy("127.0.0.1", port) as proxy:
        instance = await register(coordinator, "cut-off", url=proxy.url)
        processor = FakeProcessor()
        await seed_job(coordinator)
        harness = await start_supervisor(
            [instance], processor, lease_s=0.3, outage_limit_s=1.0, update_interval_s=0.1
        )
        await asyncio.wait_for(processor.started.wait(), WAIT_S)
        supervisor = harness.supervisor
        (run,) = supervisor.jobs.values()
        cut_at = time.monotonic()
        proxy.default = Plan.blackhole()  # new connections are never answered
        proxy.reset_all()  # open ones die now
        await asyncio.wait_for(processor.cancelled.wait(), WAIT_S)
        given_up_after = time.monotonic() - cut_at
        assert run.cancel_reason is CancelReason.LEASE_EXPIRED
        assert "no answer for 1 s" in run.cancel_detail
        # No answer is an outage, not a refusal: the (shorter) lease does not apply. The last delivery
        # was at most one interval before the cut; the give-up comes right at the outage limit.
        assert 0.8 <= given_up_after <= 2.0
        assert await supervisor.wait_for(lambda: not supervisor.jobs, WAIT_S)
        assert not run.work_dir.exists()
        assert supervisor.free_slots() == supervisor.config.concurrency


async def test_a_job_whose_updates_the_server_refuses_is_given_up_after_the_lease_and_logged_as_errors(
    coordinator: RunningCoordinator,
    start_supervisor: StartSupervisor,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    instance = await register(coordinator, "refused")
    processor = FakeProcessor()
    job_uuid = await seed_job(coordinator)
    harness = await start_supervisor([instance], processor, lease_s=1.0, update_interval_s=0.1)
    await asyncio.wait_for(processor.started.wait(), WAIT_S)
    supervisor = harness.supervisor
    run = supervisor.jobs[job_uuid]
    jobs = coordinator.coordinator.jobs

    async def broken(*_: Any) -> bool:
        raise RuntimeError("the database is on fire")

    # Every update from now on gets a real 500 from the coordinator: it is up, its reaper runs.
    monkeypatch.setattr(jobs, "try_update", broken)
    monkeypatch.setattr(jobs, "update", broken)
    refused_at = time.monotonic()
    await asyncio.wait_for(processor.cancelled.wait(), WAIT_S)
    given_up_after = time.monotonic() - refused_at
    assert run.cancel_reason is CancelReason.LEASE_EXPIRED
    assert "refused by the server for 1 s" in run.cancel_detail
    assert 0.9 <= given_up_after <= 2.0
    refusals = [r for r in caplog.records if "the server refused its update" in r.getMessage()]
    assert refusals
    assert all(r.levelno == logging.ERROR for r in refusals)
    assert "500" in refusals[0].getMessage()


async def test_an_instance_that_forgot_us_is_flagged_and_the_other_keeps_working(
    coordinator: RunningCoordinator, start_supervisor: StartSupervisor, tmp_path: Path, clip: Path
) -> None:
    forgotten = await register(coordinator, "forgotten")
    healthy = await register(coordinator, "healthy")
    config_file = ConfigFile(tmp_path / "config.toml")
    config_file.save_instance(forgotten)
    config_file.save_instance(healthy)
    processor = FakeProcessor(source=clip, wait=False)

    def flag(instance: InstanceConfig) -> None:
        config_file.set_needs_registration(instance.url, instance.runner_name, instance.runner_token)

    harness = await start_supervisor([forgotten, healthy], processor, flag_instance=flag, concurrency=1)
    supervisor = harness.supervisor
    await idle_worker(supervisor)
    auth = await coordinator.coordinator.runners.by_token(forgotten.runner_token)
    await coordinator.coordinator.runners.remove([auth.runner.id])
    job_uuid = await seed_job(coordinator)  # its ping wakes both instances

    forgotten_worker = supervisor.workers[forgotten.key]
    assert await supervisor.wait_for(
        lambda: (
            forgotten_worker.status.registration == "needs-registration"
            and processor.runs == 1
            and not supervisor.jobs
        ),
        WAIT_S,
    )
    # Nothing polls it any more: its check loop and socket end.
    await asyncio.wait(forgotten_worker.tasks, timeout=WAIT_S)
    assert all(task.done() for task in forgotten_worker.tasks)
    assert processor.contexts[0].job.uuid == job_uuid
    row = await job_of(coordinator, job_uuid)
    assert row is not None
    assert row.result is not None  # taken and delivered by the healthy registration
    assert await supervisor.wait_for(
        lambda: config_file.load(env={}).instance(forgotten.url, "forgotten").needs_registration,  # type: ignore[union-attr]
        WAIT_S,
    )
    assert not config_file.load(env={}).instance(healthy.url, "healthy").needs_registration  # type: ignore[union-attr]
    assert any("no longer knows runner 'forgotten'" in e.message for e in supervisor.errors)


class ScriptedClient(InstanceClient):
    """An instance played by the test: offers `offers`, blocks the first request until `gate` opens,
    answers `success` from `success_answers` and `update` from `update_answers` (exceptions raised in
    order, then 204; `updates` counts the updates delivered)."""

    def __init__(self, url: str, runner_token: str) -> None:
        super().__init__(url, runner_token)
        self.offers: list[AvailableJob] = []
        self.gate = asyncio.Event()
        self.requests = 0
        self.success_answers: list[Exception] = []
        self.success_gate: asyncio.Event | None = None
        self.update_answers: list[Exception] = []
        # Answers of the updates that follow the next success attempt (the server changed meanwhile).
        self.updates_after_success: list[Exception] = []
        self.updates = 0
        self.calls: list[str] = []
        # The order of successes and delivered updates ("success", "update", ...).
        self.timeline: list[str] = []

    async def request_jobs(self, job_types: frozenset[str], version: str | None) -> list[AvailableJob]:
        self.requests += 1
        if self.requests == 1:
            await self.gate.wait()
        offers, self.offers = self.offers, []
        return offers

    async def accept(self, job_uuid: str) -> AcceptedJob:
        self.calls.append(f"accept {job_uuid}")
        return AcceptedJob(job_uuid, JobType.VOD_WEB_VIDEO, {}, "ptrjt-x", self.url)

    async def update(self, job: AcceptedJob, progress: int | None = None) -> None:
        if self.update_answers:
            raise self.update_answers.pop(0)
        self.updates += 1
        self.timeline.append("update")

    async def success(self, job: AcceptedJob, output: JobOutput) -> None:
        self.calls.append("success")
        self.timeline.append("success")
        self.update_answers += self.updates_after_success
        self.updates_after_success = []
        if self.success_gate is not None:
            await self.success_gate.wait()
        if self.success_answers:
            raise self.success_answers.pop(0)

    async def error(self, job: AcceptedJob, message: str) -> None:
        self.calls.append(f"error {message}")

    async def abort(self, job: AcceptedJob, reason: str) -> None:
        self.calls.append(f"abort {reason}")


def scripted(clients: dict[str, ScriptedClient]) -> Any:
    def factory(instance: InstanceConfig, config: RunnerConfig) -> InstanceClient:
        clients[instance.runner_name] = ScriptedClient(instance.url, instance.runner_token)
        return clients[instance.runner_name]

    return factory


async def test_pings_during_a_check_are_coalesced_into_one_more_check(
    start_supervisor: StartSupervisor,
) -> None:
    clients: dict[str, ScriptedClient] = {}
    instance = InstanceConfig("http://scripted.test", "ptrt-s", "scripted")
    harness = await start_supervisor(
        [instance], client_factory=scripted(clients), socket_enabled=False, poll_interval_s=3600
    )
    supervisor = harness.supervisor
    assert await supervisor.wait_for(
        lambda: "scripted" in clients and clients["scripted"].requests == 1, WAIT_S
    )
    client = clients["scripted"]
    worker = supervisor.workers[instance.key]
    for _ in range(3):
        worker.wake("available-jobs ping")  # arrives while the first check waits for its answer
    client.gate.set()  # the first answer offers nothing
    # No poll for an hour, no job to end: only the coalesced wake-up can make the second request.
    assert await supervisor.wait_for(lambda: worker.checks >= 2, WAIT_S)
    assert client.requests == 2


async def test_a_retried_success_answered_not_processing_counts_as_done(
    start_supervisor: StartSupervisor,
) -> None:
    clients: dict[str, ScriptedClient] = {}
    instance = InstanceConfig("http://scripted.test", "ptrt-s", "scripted")
    harness = await start_supervisor([instance], client_factory=scripted(clients), socket_enabled=False)
    supervisor = harness.supervisor
    assert await supervisor.wait_for(lambda: "scripted" in clients, WAIT_S)
    client = clients["scripted"]
    client.success_answers = [
        TransientError("send success: timed out (ReadTimeout)"),
        JobGone(
            'send success: 400 Job is not in "processing" state',
            status=400,
            code=ErrorCode.JOB_NOT_IN_PROCESSING_STATE,
        ),
    ]
    client.offers = [AvailableJob("6a1b7d1c-0000-4000-8000-000000000002", "vod-web-video-transcoding", {})]
    client.gate.set()
    assert await supervisor.wait_for(lambda: bool(supervisor.finished), WAIT_S)
    assert supervisor.finished[-1].outcome == "succeeded"
    assert client.calls[1:] == ["success", "success"]  # no error report


async def test_shutdown_lets_running_jobs_finish_within_the_grace_period(
    coordinator: RunningCoordinator, start_supervisor: StartSupervisor, clip: Path
) -> None:
    instance = await register(coordinator, "graceful")
    processor = FakeProcessor(source=clip)
    job_uuid = await seed_job(coordinator)
    harness = await start_supervisor([instance], processor, shutdown_grace_s=10)
    await asyncio.wait_for(processor.started.wait(), WAIT_S)
    supervisor = harness.supervisor
    supervisor.request_stop()
    assert await supervisor.wait_for(lambda: supervisor.draining, WAIT_S)
    await seed_job(coordinator)  # not taken any more
    processor.release.set()
    assert await asyncio.wait_for(harness.task, WAIT_S) is True
    assert processor.runs == 1
    row = await job_of(coordinator, job_uuid)
    assert row is not None
    assert row.result is not None


async def test_shutdown_aborts_what_is_left_after_the_grace_period_in_parallel(
    coordinator: RunningCoordinator, start_supervisor: StartSupervisor
) -> None:
    instance = await register(coordinator, "impatient")
    processor = FakeProcessor()
    first, second = await seed_job(coordinator), await seed_job(coordinator)
    harness = await start_supervisor([instance], processor, shutdown_grace_s=0.3, concurrency=2)
    supervisor = harness.supervisor
    assert await supervisor.wait_for(lambda: processor.runs == 2, WAIT_S)
    runs = list(supervisor.jobs.values())
    started = time.monotonic()
    supervisor.request_stop()
    assert await asyncio.wait_for(harness.task, WAIT_S) is True
    assert time.monotonic() - started < 0.3 + 2.0
    assert processor.cancelled.is_set()
    assert {run.cancel_reason for run in runs} == {CancelReason.SHUTDOWN}
    for job_uuid in (first, second):
        row = await job_of(coordinator, job_uuid)
        assert row is not None
        assert (row.state, row.failures) == (JobState.PENDING, 0)  # aborted: back in the queue
    assert not list(supervisor.work_dir.iterdir())


async def test_a_second_interrupt_stops_at_once(
    coordinator: RunningCoordinator, start_supervisor: StartSupervisor
) -> None:
    instance = await register(coordinator, "interrupted")
    processor = FakeProcessor()
    await seed_job(coordinator)
    harness = await start_supervisor([instance], processor, shutdown_grace_s=60)
    await asyncio.wait_for(processor.started.wait(), WAIT_S)
    harness.supervisor.interrupt()
    assert await harness.supervisor.wait_for(lambda: harness.supervisor.draining, WAIT_S)
    harness.supervisor.interrupt()
    assert await asyncio.wait_for(harness.task, 2.0) is False
    assert processor.cancelled.is_set()


async def test_an_instance_added_to_the_config_file_is_picked_up_while_running(
    coordinator: RunningCoordinator, start_supervisor: StartSupervisor, tmp_path: Path, clip: Path
) -> None:
    config_file = ConfigFile(tmp_path / "config.toml")
    config_file.ensure_exists()
    last = config_file.signature()

    def reload() -> RunnerConfig | None:
        nonlocal last
        if config_file.signature() == last:
            return None
        last = config_file.signature()
        # The test's fast settings stay; the instances come from the file.
        return replace(supervisor.config, instances=config_file.load(env={}).instances)

    processor = FakeProcessor(source=clip, wait=False)
    harness = await start_supervisor([], processor, reload_config=reload)
    supervisor = harness.supervisor
    instance = await register(coordinator, "late-comer")
    job_uuid = await seed_job(coordinator)
    config_file.save_instance(instance)  # what `tuberunner register` does
    assert await supervisor.wait_for(lambda: processor.runs == 1 and not supervisor.jobs, WAIT_S)
    assert processor.contexts[0].job.uuid == job_uuid
    config_file.remove_instance(instance.url, instance.runner_name)  # `tuberunner unregister`
    assert await supervisor.wait_for(lambda: not supervisor.workers, WAIT_S)


async def test_a_rejected_socket_is_retried_and_never_stops_polling(
    coordinator: RunningCoordinator, start_supervisor: StartSupervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        raise socketio.exceptions.ConnectionRefusedError("Invalid runner token.")

    monkeypatch.setattr(coordinator.coordinator.notifier.namespace, "on_connect", refuse)
    instance = await register(coordinator, "deaf")
    harness = await start_supervisor([instance], poll_interval_s=0.1, poll_jitter=0.0, socket_retry_max_s=0.2)
    supervisor = harness.supervisor
    assert await supervisor.wait_for(lambda: bool(supervisor.workers), WAIT_S)
    worker = supervisor.workers[instance.key]
    assert worker.notifier is not None
    notifier = worker.notifier
    # python-socketio itself would give up after this rejection; ours tries again with backoff...
    assert await supervisor.wait_for(lambda: notifier.attempts >= 3, WAIT_S)
    assert "Invalid runner token." in (worker.status.last_error or "")
    # ...and the polls go on all the while.
    checks = worker.checks
    assert await supervisor.wait_for(lambda: worker.checks >= checks + 3, WAIT_S)
    assert not worker.status.socket_connected


async def test_a_result_being_delivered_at_shutdown_is_kept_and_delivered_after_the_next_start(
    start_supervisor: StartSupervisor, tmp_path: Path
) -> None:
    clients: dict[str, ScriptedClient] = {}
    instance = InstanceConfig("http://scripted.test", "ptrt-s", "scripted")
    outbox_dir = tmp_path / "outbox"
    harness = await start_supervisor(
        [instance],
        client_factory=scripted(clients),
        socket_enabled=False,
        shutdown_grace_s=0.05,
        outbox_dir=outbox_dir,
    )
    supervisor = harness.supervisor
    assert await supervisor.wait_for(lambda: "scripted" in clients, WAIT_S)
    client = clients["scripted"]
    client.success_gate = asyncio.Event()  # the upload never ends
    job_uuid = "6a1b7d1c-0000-4000-8000-000000000003"
    client.offers = [AvailableJob(job_uuid, "vod-web-video-transcoding", {})]
    client.gate.set()
    assert await supervisor.wait_for(lambda: "success" in client.calls, WAIT_S)
    (run,) = supervisor.jobs.values()
    assert run.phase is JobPhase.DELIVERING
    assert supervisor.free_slots() == supervisor.config.concurrency  # a waiting result holds no slot
    supervisor.request_stop()  # the grace period ends during the upload
    assert await asyncio.wait_for(harness.task, WAIT_S) is True
    assert (run.cancel_reason, run.outcome_kind) == (CancelReason.SHUTDOWN, JobOutcome.KEPT)
    assert not any(call.startswith("abort") for call in client.calls)  # the server keeps it ours
    (kept,) = Outbox(outbox_dir).load()
    assert (kept.job.uuid, kept.job.job_token, kept.attempted) == (job_uuid, "ptrjt-x", True)

    # The next start delivers it with the job token it was accepted with, and empties the outbox.
    restarted = await start_supervisor(
        [instance], client_factory=scripted(clients), socket_enabled=False, outbox_dir=outbox_dir
    )
    second = restarted.supervisor
    assert await second.wait_for(lambda: bool(second.finished), WAIT_S)
    assert second.finished[-1].outcome == "succeeded"
    assert clients["scripted"].calls == ["success"]  # a new client: nothing accepted, delivered
    assert Outbox(outbox_dir).load() == []
    assert list(outbox_dir.iterdir()) == []


async def test_a_result_not_delivered_goes_again_only_once_a_heartbeat_got_through(
    start_supervisor: StartSupervisor,
) -> None:
    clients: dict[str, ScriptedClient] = {}
    instance = InstanceConfig("http://scripted.test", "ptrt-s", "scripted")
    harness = await start_supervisor([instance], client_factory=scripted(clients), socket_enabled=False)
    supervisor = harness.supervisor
    assert await supervisor.wait_for(lambda: "scripted" in clients, WAIT_S)
    client = clients["scripted"]
    client.success_answers = [TransientError("send success: ConnectError: connection refused")]
    # The server is down a while longer: the heartbeat meets the outage too.
    client.updates_after_success = [TransientError("update: ConnectError: connection refused")] * 3
    client.offers = [AvailableJob("6a1b7d1c-0000-4000-8000-000000000004", "vod-web-video-transcoding", {})]
    client.gate.set()
    assert await supervisor.wait_for(lambda: bool(supervisor.finished), WAIT_S)
    assert supervisor.finished[-1].outcome == "succeeded"
    first, second = [i for i, call in enumerate(client.timeline) if call == "success"]
    # Sent again once an update (small) got through, not blindly on a timer.
    assert "update" in client.timeline[first + 1 : second]
    assert client.update_answers == []  # every failing update was made before the upload went again


async def test_a_job_taken_back_while_its_result_waited_is_dropped_and_not_sent_again(
    start_supervisor: StartSupervisor, tmp_path: Path
) -> None:
    clients: dict[str, ScriptedClient] = {}
    instance = InstanceConfig("http://scripted.test", "ptrt-s", "scripted")
    harness = await start_supervisor(
        [instance], client_factory=scripted(clients), socket_enabled=False, outbox_dir=tmp_path / "outbox"
    )
    supervisor = harness.supervisor
    assert await supervisor.wait_for(lambda: "scripted" in clients, WAIT_S)
    client = clients["scripted"]
    client.success_answers = [TransientError("send success: ReadTimeout")]
    # A network cut: the server re-queued the job meanwhile, its first answer is a 404.
    client.updates_after_success = [JobGone("update job: 404 Unknown runner job", status=404)]
    client.offers = [AvailableJob("6a1b7d1c-0000-4000-8000-000000000005", "vod-web-video-transcoding", {})]
    client.gate.set()
    assert await supervisor.wait_for(lambda: bool(supervisor.finished), WAIT_S)
    run = supervisor.finished[-1]
    assert (run.cancel_reason, run.outcome_kind) == (CancelReason.GONE, JobOutcome.GONE)
    assert client.calls[1:] == ["success"]  # one attempt, no error report, nothing sent again
    assert list((tmp_path / "outbox").iterdir()) == []


async def test_a_result_the_server_keeps_failing_on_is_retried_a_bounded_number_of_times_then_reported(
    start_supervisor: StartSupervisor, tmp_path: Path
) -> None:
    clients: dict[str, ScriptedClient] = {}
    instance = InstanceConfig("http://scripted.test", "ptrt-s", "scripted")
    harness = await start_supervisor(
        [instance],
        client_factory=scripted(clients),
        socket_enabled=False,
        outbox_dir=tmp_path / "outbox",
        retry=RetryPolicy(attempts=3, base_delay_s=0.01, max_delay_s=0.02),
    )
    supervisor = harness.supervisor
    assert await supervisor.wait_for(lambda: "scripted" in clients, WAIT_S)
    client = clients["scripted"]
    client.success_answers = [TransientError("send success: 500 Internal error", status=500)] * 5
    client.offers = [AvailableJob("6a1b7d1c-0000-4000-8000-000000000006", "vod-web-video-transcoding", {})]
    client.gate.set()
    assert await supervisor.wait_for(lambda: bool(supervisor.finished), WAIT_S)
    run = supervisor.finished[-1]
    assert run.outcome_kind is JobOutcome.ERRORED
    assert client.calls[1:4] == ["success"] * 3
    (report,) = client.calls[4:]
    assert report.startswith("error result not delivered after 3 attempt(s)")
    assert list((tmp_path / "outbox").iterdir()) == []


async def test_at_start_a_waiting_result_is_delivered_and_those_of_other_registrations_are_dropped(
    coordinator: RunningCoordinator,
    start_supervisor: StartSupervisor,
    clip: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    instance = await register(coordinator, "resumed")
    job_uuid = await seed_job(coordinator)
    async with InstanceClient(coordinator.url, instance.runner_token) as client:
        job = await client.accept(job_uuid)
    outbox = Outbox(tmp_path / "outbox")
    # What a runner killed while its result waited leaves behind.
    work = tmp_path / "job"
    work.mkdir()
    shutil.copyfile(clip, work / "output.mp4")
    outbox.put(job, instance, JobOutput(files={"videoFile": work / "output.mp4"}), work)
    unregistered = InstanceConfig("http://gone.test", "ptrt-gone", "gone")
    registered_again = InstanceConfig(instance.url, "ptrt-previous-token", "resumed")
    for other, uuid in (
        (unregistered, "6a1b7d1c-0000-4000-8000-000000000007"),
        (registered_again, "6a1b7d1c-0000-4000-8000-000000000008"),
    ):
        (tmp_path / uuid).mkdir()
        (tmp_path / uuid / "output.mp4").write_bytes(b"result")
        other_job = AcceptedJob(uuid, JobType.VOD_WEB_VIDEO, {}, "ptrjt-x", other.url)
        outbox.put(other_job, other, JobOutput(files={"videoFile": tmp_path / uuid / "output.mp4"}), tmp_path)
    processor = FakeProcessor()
    harness = await start_supervisor([instance], processor, outbox_dir=outbox.root)
    supervisor = harness.supervisor
    assert await supervisor.wait_for(lambda: bool(supervisor.finished), WAIT_S)
    assert supervisor.finished[-1].outcome == "succeeded"
    assert processor.runs == 0  # delivered, not transcoded again
    row = await job_of(coordinator, job_uuid)
    assert row is not None
    assert row.result is not None
    assert list(outbox.root.iterdir()) == []
    dropped = [r.getMessage() for r in caplog.records if "dropping the waiting result" in r.getMessage()]
    assert len(dropped) == 2
    assert any("http://gone.test (gone) is not registered here any more" in m for m in dropped)
    assert any("registered again" in m for m in dropped)
