"""The `/runners` socket.io namespace (checklist N, #91–#96) with the real python-socketio client."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import socketio

from tests.coordinator.test_runner_api import Env
from tests.support.protocol import admin_headers
from tests.support.servers import ADMIN_TOKEN, RunningCoordinator, serve_coordinator
from tuberunner.coordinator.config import CoordinatorConfig
from tuberunner.protocol.jobs import AVAILABLE_JOBS_EVENT, JOBS_TAKEN_BACK_EVENT, JobState, JobType


@pytest.fixture
async def env(coordinator: RunningCoordinator, result_files: dict[str, Path]) -> Any:
    async with httpx.AsyncClient(base_url=coordinator.url, timeout=30) as http:
        yield Env(coordinator, http, result_files)


class Listener:
    """A connected runner socket that records `available-jobs` pings and jobs-taken-back events."""

    def __init__(self) -> None:
        self.client = socketio.AsyncClient(reconnection=False)
        self.pings: asyncio.Queue[float] = asyncio.Queue()
        self.taken_back: asyncio.Queue[float] = asyncio.Queue()
        self.refusals: list[Any] = []
        self.client.on(AVAILABLE_JOBS_EVENT, self._on_ping, namespace="/runners")
        self.client.on(JOBS_TAKEN_BACK_EVENT, self._on_taken_back, namespace="/runners")
        self.client.on("connect_error", self.refusals.append, namespace="/runners")

    async def _on_ping(self, *_: Any) -> None:
        self.pings.put_nowait(time.monotonic())

    async def _on_taken_back(self, *_: Any) -> None:
        self.taken_back.put_nowait(time.monotonic())

    async def connect(self, url: str, auth: Any) -> None:
        await self.client.connect(
            url, namespaces=["/runners"], auth=auth, transports=["websocket"], wait_timeout=5
        )

    async def next_ping(self, timeout_s: float = 5) -> float:
        return await asyncio.wait_for(self.pings.get(), timeout_s)

    async def no_ping_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self.pings.get(), seconds)
        except TimeoutError:
            return True
        return False


async def _refused_with(url: str, auth: Any) -> str:
    """The `connect_error` data the server sent (`{"message": ...}` on the wire)."""
    listener = Listener()
    with pytest.raises(socketio.exceptions.ConnectionError):
        await listener.connect(url, auth)
    assert len(listener.refusals) == 1
    data = listener.refusals[0]
    return str(data.get("message") if isinstance(data, dict) else data)


@pytest.mark.parametrize(
    ("auth", "message"),
    [
        (None, "No runner token provided"),
        ({}, "No runner token provided"),
        ({"runnerToken": 42}, "Runner token is invalid"),
        ({"runnerToken": "ptrt-unknown"}, "Invalid runner token."),
    ],
)
async def test_bad_tokens_are_refused_with_peertubes_messages(env: Env, auth: Any, message: str) -> None:
    assert message in await _refused_with(env.running.url, auth)


async def test_one_ping_for_a_burst_of_new_jobs_and_none_when_idle(
    tmp_path: Path, database_url: str | None, result_files: dict[str, Path]
) -> None:
    # A debounce window wider than the burst: five creations on PostgreSQL take more than 10 ms.
    config = CoordinatorConfig(
        data_dir=tmp_path / "c", database_url=database_url, admin_token=ADMIN_TOKEN, ping_debounce_s=0.5
    )
    async with serve_coordinator(config) as running, httpx.AsyncClient(base_url=running.url) as http:
        env = Env(running, http, result_files)
        token = await env.register("listener")
        listener = Listener()
        await listener.connect(running.url, {"runnerToken": token})
        try:
            assert await listener.no_ping_within(0.3)
            await asyncio.gather(*(env.seed(children=0) for _ in range(5)))
            await listener.next_ping()
            assert await listener.no_ping_within(0.7)
        finally:
            await listener.client.disconnect()


async def test_parent_success_with_children_pings_and_without_children_does_not(env: Env) -> None:
    token = await env.register("listener")
    with_child = await env.seed(children=1)
    alone = await env.seed(children=0)
    jt_child = await env.accept(token, with_child.parent)
    jt_alone = await env.accept(token, alone.parent)
    listener = Listener()
    await listener.connect(env.running.url, {"runnerToken": token})
    try:
        r = await env.success(token, alone.parent, jt_alone, env.results(JobType.VOD_WEB_VIDEO))
        assert r.status_code == 204
        assert await listener.no_ping_within(0.3)
        r = await env.success(token, with_child.parent, jt_child, env.results(JobType.VOD_WEB_VIDEO))
        assert r.status_code == 204
        await listener.next_ping()
        assert await env.state(with_child.children[0]) == JobState.PENDING
    finally:
        await listener.client.disconnect()


async def test_abort_pings_because_the_job_is_pending_again(env: Env) -> None:
    token = await env.register("listener")
    seeded = await env.seed(children=0)
    jt = await env.accept(token, seeded.parent)
    listener = Listener()
    await listener.connect(env.running.url, {"runnerToken": token})
    try:
        await env.http.post(
            f"/api/v1/runners/jobs/{seeded.parent}/abort",
            json={"runnerToken": token, "jobToken": jt, "reason": "x"},
        )
        await listener.next_ping()
    finally:
        await listener.client.disconnect()


async def test_socket_connect_records_last_contact(env: Env) -> None:
    token = await env.register("listener")
    auth = await env.c.runners.by_token(token)
    assert auth is not None
    env.c.runners._contacts.clear()
    listener = Listener()
    await listener.connect(env.running.url, {"runnerToken": token})
    try:
        assert env.c.runners.contact_of(auth.runner.id) is not None
    finally:
        await listener.client.disconnect()


async def _holder_and_bystander(env: Env) -> tuple[str, str, Listener, Listener]:
    """A runner processing a fresh job and another runner, both with a connected socket."""
    holder = await env.register("holder")
    bystander = await env.register("bystander")
    seeded = await env.seed(children=0)
    await env.accept(holder, seeded.parent)
    holder_socket, bystander_socket = Listener(), Listener()
    await holder_socket.connect(env.running.url, {"runnerToken": holder})
    await bystander_socket.connect(env.running.url, {"runnerToken": bystander})
    return seeded.parent, holder, holder_socket, bystander_socket


@pytest.mark.parametrize("action", ["cancel", "delete"])
async def test_cancelling_or_deleting_a_processing_job_tells_its_runner_only(env: Env, action: str) -> None:
    job_uuid, _, holder, bystander = await _holder_and_bystander(env)
    try:
        path = (
            f"/api/v1/runners/jobs/{job_uuid}/cancel"
            if action == "cancel"
            else f"/api/v1/runners/jobs/{job_uuid}"
        )
        method = "POST" if action == "cancel" else "DELETE"
        r = await env.http.request(method, path, headers=admin_headers())
        assert r.status_code == 204, r.text
        await asyncio.wait_for(holder.taken_back.get(), 5)
        assert bystander.taken_back.empty()
    finally:
        await holder.client.disconnect()
        await bystander.client.disconnect()


async def test_cancelling_a_pending_job_tells_no_runner(env: Env) -> None:
    token = await env.register("idle")
    seeded = await env.seed(children=0)
    listener = Listener()
    await listener.connect(env.running.url, {"runnerToken": token})
    try:
        r = await env.http.post(f"/api/v1/runners/jobs/{seeded.parent}/cancel", headers=admin_headers())
        assert r.status_code == 204, r.text
        assert await env.state(seeded.parent) == JobState.CANCELLED
        # An absence: nothing to await but a window as long as the positive cases' delivery takes.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(listener.taken_back.get(), 0.3)
    finally:
        await listener.client.disconnect()


async def test_an_expired_lease_tells_the_runner_that_held_the_job(
    tmp_path: Path, database_url: str | None, result_files: dict[str, Path]
) -> None:
    # A lease the reaper loop never reaches on its own (reaped by hand below, once it has expired).
    config = CoordinatorConfig(
        data_dir=tmp_path / "c",
        database_url=database_url,
        admin_token=ADMIN_TOKEN,
        default_lease_s=0.2,
        reaper_interval_s=3600,
    )
    async with serve_coordinator(config) as running, httpx.AsyncClient(base_url=running.url) as http:
        env = Env(running, http, result_files)
        job_uuid, _, holder, bystander = await _holder_and_bystander(env)
        try:
            deadline = time.monotonic() + 10
            while await env.state(job_uuid) != JobState.PENDING:
                assert time.monotonic() < deadline, "the lease never expired"
                await env.c.jobs.reap_expired()
            await asyncio.wait_for(holder.taken_back.get(), 5)
            assert bystander.taken_back.empty()
        finally:
            await holder.client.disconnect()
            await bystander.client.disconnect()


async def test_a_job_made_pending_while_a_ping_is_being_sent_gets_a_ping_of_its_own(env: Env) -> None:
    """Runners woken by a ping that is already on its way may ask before a job pending since then is
    committed: that job needs the next ping, not to be merged into the one being sent."""
    token = await env.register("listener")
    listener = Listener()
    await listener.connect(env.running.url, {"runnerToken": token})
    sio = env.c.notifier.sio
    emit = sio.emit
    sending, release = asyncio.Event(), asyncio.Event()

    async def slow_first_emit(*args: Any, **kwargs: Any) -> None:
        if not sending.is_set():  # the first ping stays on its way until released
            sending.set()
            await release.wait()
        await emit(*args, **kwargs)

    sio.emit = slow_first_emit
    try:
        await env.seed(children=0)
        await asyncio.wait_for(sending.wait(), 5)
        await env.seed(children=0)  # pending while the first ping is being sent
        release.set()
        await listener.next_ping()
        await listener.next_ping()
    finally:
        sio.emit = emit
        await listener.client.disconnect()
