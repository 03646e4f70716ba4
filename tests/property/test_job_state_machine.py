"""The job state machine (spec §3, §6) against a small model, through the real HTTP API of a real
coordinator (uvicorn on loopback, SQLite and PostgreSQL), by hypothesis' stateful testing.

Rules: register / unregister runners; request, accept, update, error, abort, success (first and retried)
with the current job token, an old one, another job's or a made-up one, by the holder or another runner;
admin cancel and delete; lease expiry (the real reaper, run with its clock moved past every lease); restart
(the coordinator stopped and started again on the same data folder). After every step the admin job list
and the database must match the model exactly: states, failures, holders, job tokens.

Every refused call is checked for its exact status, `detail` and `code` (spec §2.3, §3.11).

    TUBERUNNER_PROPERTY_EXAMPLES=200 .venv/bin/pytest tests/property -p no:cacheprovider   # longer, by hand
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests.fuzz.threaded import ThreadedCoordinator
from tests.support.databases import postgres_available, postgres_database
from tests.support.protocol import admin_headers, seed_jobs, vod_job_specs
from tests.support.results import result_parts
from tests.support.servers import ADMIN_TOKEN
from tuberunner.coordinator.config import CoordinatorConfig
from tuberunner.protocol.errors import ErrorCode, Message
from tuberunner.protocol.jobs import CANCELLABLE_STATES, MAX_AVAILABLE_JOBS, MAX_FAILURES, JobState, JobType

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("TUBERUNNER_PROPERTY_EXAMPLES", "20"))
STEPS = int(os.environ.get("TUBERUNNER_PROPERTY_STEPS", "50"))
# Shrinking replays hundreds of runs, each with a coordinator of its own: minutes, not seconds. Off by default
# (a failure still prints every step that led to it); on by hand with TUBERUNNER_PROPERTY_SHRINK=1.
PHASES = tuple(Phase) if os.environ.get("TUBERUNNER_PROPERTY_SHRINK") else (Phase.explicit, Phase.generate)
MAX_LEASE_EXPIRIES = 3
LEASE_S = 120.0
ADMIN = admin_headers()
RUNNERS = "/api/v1/runners"
S = JobState


@dataclass
class ModelJob:
    uuid: str
    type: JobType
    order: int  # creation order: the coordinator's id order
    parent: str | None
    state: JobState
    failures: int = 0
    expiries: int = 0
    # The job token as the coordinator stores it (kept by a completed job, cleared otherwise), and the
    # runner the job row points to (the holder, or the last one for a completed or cancelled job).
    token: str | None = None
    runner: str | None = None
    deleted: bool = False
    completed_with: str | None = None
    issued: list[str] = field(default_factory=list)


@dataclass
class Model:
    jobs: dict[str, ModelJob] = field(default_factory=dict)
    runner_tokens: dict[str, str] = field(default_factory=dict)
    registered: set[str] = field(default_factory=set)

    def live(self) -> list[ModelJob]:
        return [j for j in self.jobs.values() if not j.deleted]

    def children(self, uuid: str) -> list[ModelJob]:
        return [j for j in self.live() if j.parent == uuid]

    def descendants(self, uuid: str) -> list[ModelJob]:
        found: list[ModelJob] = []
        frontier = [uuid]
        while frontier:
            kids = [j for j in self.live() if j.parent in frontier]
            found += kids
            frontier = [j.uuid for j in kids]
        return found

    def mark_descendants(self, uuid: str, state: JobState) -> None:
        for job in self.descendants(uuid):
            if not job.state.is_final:
                job.state, job.token = state, None

    def requeue(self, job: ModelJob) -> None:
        job.state, job.token, job.runner = S.PENDING, None, None

    def fail(self, job: ModelJob) -> None:
        """ERRORED (by the error path or the reaper): token cleared, descendants parent-errored."""
        job.state, job.token = S.ERRORED, None
        self.mark_descendants(job.uuid, S.PARENT_ERRORED)

    def pending(self) -> list[str]:
        return [j.uuid for j in sorted(self.live(), key=lambda j: j.order) if j.state == S.PENDING]


# ---------------------------------------------------------------------------------------------- answers


def _expect(
    response: httpx.Response, status: int, detail: str | None = None, code: str | None = None
) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    if status < 400:
        return
    problem = response.json()
    assert response.headers["content-type"].startswith("application/problem+json")
    if detail is not None:
        assert problem["detail"] == detail, problem
    assert problem.get("code") == code, problem


def _unknown_job(response: httpx.Response) -> None:
    _expect(response, 404, Message.UNKNOWN_RUNNER_JOB)


def _not_processing(response: httpx.Response) -> None:
    _expect(response, 400, Message.JOB_NOT_PROCESSING, ErrorCode.JOB_NOT_IN_PROCESSING_STATE)


# Mostly the right token and the holder (the calls that change states); the others must all be refused.
TOKEN_CHOICES = st.sampled_from(["current"] * 6 + ["old", "foreign", "made-up"])
CALLER_CHOICES = st.sampled_from(["holder", "holder", "drawn"])


class JobStateMachine(RuleBasedStateMachine):
    runners = Bundle("runners")
    jobs = Bundle("jobs")

    def __init__(self, result_files: dict[str, Path], database: Callable[[], str | None]) -> None:
        super().__init__()
        self.result_files = result_files
        self.tmp = Path(tempfile.mkdtemp(prefix="tuberunner-property-"))
        self.config = CoordinatorConfig(
            data_dir=self.tmp / "coordinator",
            database_url=database(),  # an empty database for every example
            admin_token=ADMIN_TOKEN,
            default_lease_s=LEASE_S,
            max_lease_expiries=MAX_LEASE_EXPIRIES,
            # Leases expire only when a rule says so (the reaper is run by hand with a clock moved ahead).
            reaper_interval_s=3600.0,
            ping_debounce_s=0.01,
        )
        self.model = Model()
        self.server: ThreadedCoordinator | None = None
        self.http: httpx.Client | None = None
        self.names = 0
        self.graphs = 0
        self.restarts = 0
        self._start()

    # ------------------------------------------------------------------ plumbing

    def _start(self) -> None:
        self.server = ThreadedCoordinator(self.config).__enter__()
        self.http = httpx.Client(base_url=self.server.url, timeout=60)

    def _stop(self) -> None:
        if self.http is not None:
            self.http.close()
            self.http = None
        if self.server is not None:
            server, self.server = self.server, None
            server.__exit__(None, None, None)

    def teardown(self) -> None:
        try:
            self._stop()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    @property
    def client(self) -> httpx.Client:
        assert self.http is not None
        return self.http

    @property
    def coordinator(self) -> ThreadedCoordinator:
        assert self.server is not None
        return self.server

    def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return self.client.post(path, json=body)

    def _token(self, job: ModelJob, kind: str, data: st.DataObject) -> str:
        others = [t for j in self.model.jobs.values() if j is not job for t in j.issued]
        if kind == "current" and job.issued:
            return job.token or job.issued[-1]
        if kind == "old" and len(job.issued) > 1:
            return data.draw(st.sampled_from(job.issued[:-1]), label="old token")
        if kind == "foreign" and others:
            return data.draw(st.sampled_from(others), label="foreign token")
        return "ptrjt-00000000-0000-4000-8000-000000000000"

    def _focus(self, job_uuid: str, states: tuple[JobState, ...], data: st.DataObject) -> str:
        """Mostly a job in one of `states` (where the interesting answers are), else the drawn one."""
        candidates = [j.uuid for j in sorted(self.model.live(), key=lambda j: j.order) if j.state in states]
        if candidates and data.draw(st.integers(0, 3), label="focus") > 0:
            return data.draw(st.sampled_from(candidates), label="focused job")
        return job_uuid

    def _holds(self, job: ModelJob, runner: str, token: str) -> bool:
        """Spec §3.11 step 2: this job, with this token, attached to this (registered) runner."""
        return (
            not job.deleted
            and runner in self.model.registered
            and job.runner == runner
            and job.token == token
        )

    # ------------------------------------------------------------------ set-up rules

    @initialize(target=runners)
    def first_runner(self) -> str:
        return self._register()

    @initialize(target=jobs)
    def first_graph(self) -> Any:
        return self._seed()

    @precondition(lambda self: len(self.model.runner_tokens) < 3)
    @rule(target=runners)
    def register(self) -> str:
        return self._register()

    @precondition(lambda self: self.graphs < 4)
    @rule(target=jobs)
    def seed(self) -> Any:
        return self._seed()

    def _register(self) -> str:
        self.names += 1
        name = f"runner-{self.names}"
        reg = self.coordinator.run(self.coordinator.running.coordinator.runners.create_registration_token())
        r = self._post(f"{RUNNERS}/register", {"registrationToken": reg, "name": name})
        _expect(r, 200)
        self.model.runner_tokens[name] = r.json()["runnerToken"]
        self.model.registered.add(name)
        return name

    def _seed(self) -> Any:
        """A video and PeerTube's graph for it: web 720p (pending) ← HLS 720p; ← web 480p ← HLS 480p."""
        self.graphs += 1
        specs = partial(vod_job_specs, resolutions=(720, 480))
        uuids = self.coordinator.run(seed_jobs(self.coordinator.running, specs))
        graph = specs("0" * 36)  # the same shape: parents by index
        index = {spec.uuid: n for n, spec in enumerate(graph)}
        for n, uuid in enumerate(uuids):
            parent = graph[n].parent_uuid
            self.model.jobs[uuid] = ModelJob(
                uuid=uuid,
                type=graph[n].type,
                order=len(self.model.jobs),
                parent=uuids[index[parent]] if parent else None,
                state=S.WAITING_FOR_PARENT_JOB if parent else S.PENDING,
            )
        return multiple(*uuids)

    # ------------------------------------------------------------------ runner rules

    # Always one registered runner at least: the other rules need one to get anywhere.
    @precondition(lambda self: len(self.model.registered) > 1)
    @rule(runner=runners)
    def unregister(self, runner: str) -> None:
        r = self._post(f"{RUNNERS}/unregister", {"runnerToken": self.model.runner_tokens[runner]})
        if runner not in self.model.registered:
            _expect(r, 404, Message.UNKNOWN_RUNNER_TOKEN, ErrorCode.UNKNOWN_RUNNER_TOKEN)
            return
        _expect(r, 204)
        self.model.registered.discard(runner)
        for job in self.model.live():
            if job.runner == runner and job.state == S.PROCESSING:
                self.model.requeue(job)

    @rule(runner=runners)
    def request(self, runner: str) -> None:
        self._request(runner)

    def _request(self, runner: str) -> list[str]:
        """The pending jobs, by priority then creation, at most 10 (spec §3.3)."""
        r = self._post(f"{RUNNERS}/jobs/request", {"runnerToken": self.model.runner_tokens[runner]})
        if runner not in self.model.registered:
            _expect(r, 404, Message.UNKNOWN_RUNNER_TOKEN, ErrorCode.UNKNOWN_RUNNER_TOKEN)
            return []
        _expect(r, 200)
        offered = [j["uuid"] for j in r.json()["availableJobs"]]
        assert offered == self.model.pending()[:MAX_AVAILABLE_JOBS]
        return offered

    @rule(runner=runners, job_uuid=jobs, data=st.data())
    def accept(self, runner: str, job_uuid: str, data: st.DataObject) -> None:
        """Any runner accepts any job (a pending one, mostly)."""
        self._accept(runner, self._focus(job_uuid, (S.PENDING,), data))

    @precondition(lambda self: any(j.state == S.PENDING for j in self.model.live()))
    @rule(runner=runners, data=st.data())
    def take_an_offered_job(self, runner: str, data: st.DataObject) -> None:
        """What a runner does: request, then accept one of the jobs offered."""
        offered = self._request(runner)
        if offered:
            self._accept(runner, data.draw(st.sampled_from(offered), label="offered job"))

    @rule(
        kind=st.sampled_from(["update", "abort", "error", "success"]),
        runner=runners,
        job_uuid=jobs,
        token_kind=TOKEN_CHOICES,
        who=CALLER_CHOICES,
        data=st.data(),
    )
    def call(
        self, kind: str, runner: str, job_uuid: str, token_kind: str, who: str, data: st.DataObject
    ) -> None:
        """A job call (spec §3.11) with the current job token, an old one, another job's or a made-up one,
        by the holder or another runner, about a held job (mostly) or any job."""
        job = self.model.jobs[self._focus(job_uuid, (S.PROCESSING, S.COMPLETED), data)]
        caller = job.runner if who == "holder" and job.runner is not None else runner
        self._job_call(kind, job, caller, self._token(job, token_kind, data), data)

    @precondition(lambda self: any(j.state == S.PROCESSING for j in self.model.live()))
    @rule(kind=st.sampled_from(["update", "abort", "error", "error", "success", "success"]), data=st.data())
    def work(self, kind: str, data: st.DataObject) -> None:
        """What the holder of a processing job does with it."""
        held = [j for j in sorted(self.model.live(), key=lambda j: j.order) if j.state == S.PROCESSING]
        job = data.draw(st.sampled_from(held), label="held job")
        assert job.runner is not None
        assert job.token is not None
        self._job_call(kind, job, job.runner, job.token, data)

    @precondition(lambda self: self.model.registered and any(j.state == S.PENDING for j in self.model.live()))
    @rule(times=st.integers(1, MAX_FAILURES), data=st.data())
    def fail_repeatedly(self, times: int, data: st.DataObject) -> None:
        """A job that makes every runner fail: accepted and errored again and again (errored at the 5th)."""
        pending = [j for j in sorted(self.model.live(), key=lambda j: j.order) if j.state == S.PENDING]
        job = data.draw(st.sampled_from(pending), label="failing job")
        runner = data.draw(st.sampled_from(sorted(self.model.registered)), label="runner")
        for _ in range(times):
            if job.state != S.PENDING:
                break
            self._accept(runner, job.uuid)
            assert job.token is not None
            self._job_call("error", job, runner, job.token, data)

    @precondition(lambda self: any(j.completed_with for j in self.model.live()))
    @rule(data=st.data())
    def retry_a_success(self, data: st.DataObject) -> None:
        done = [j for j in sorted(self.model.live(), key=lambda j: j.order) if j.completed_with]
        job = data.draw(st.sampled_from(done), label="completed job")
        assert job.runner is not None
        assert job.completed_with is not None
        self._success(job, job.runner, job.completed_with)

    def _accept(self, runner: str, job_uuid: str) -> None:
        job = self.model.jobs[job_uuid]
        r = self._post(f"{RUNNERS}/jobs/{job_uuid}/accept", {"runnerToken": self.model.runner_tokens[runner]})
        if job.deleted:
            _unknown_job(r)
        elif job.state in (S.PROCESSING, S.COMPLETING):
            _expect(r, 409, Message.JOB_NOT_PENDING_ANYMORE, ErrorCode.JOB_NOT_IN_PENDING_STATE)
        elif job.state != S.PENDING:
            # PeerTube answers this 400 without a code; ours carries it so code-branching clients ignore it.
            _expect(r, 400, Message.JOB_NOT_PENDING, ErrorCode.JOB_NOT_IN_PENDING_STATE)
        elif runner not in self.model.registered:
            _expect(r, 404, Message.UNKNOWN_RUNNER_TOKEN, ErrorCode.UNKNOWN_RUNNER_TOKEN)
        else:
            _expect(r, 200)
            accepted = r.json()["job"]
            assert accepted["uuid"] == job_uuid
            assert accepted["state"] == {"id": 2, "label": "Processing"}
            assert accepted["runner"]["name"] == runner
            token = accepted["jobToken"]
            assert token.startswith("ptrjt-")
            assert all(token not in j.issued for j in self.model.jobs.values())
            job.state, job.token, job.runner = S.PROCESSING, token, runner
            job.issued.append(token)

    def _job_call(self, kind: str, job: ModelJob, caller: str, token: str, data: st.DataObject) -> None:
        if kind == "success":
            self._success(job, caller, token)
            return
        path = f"{RUNNERS}/jobs/{job.uuid}/{kind}"
        body: dict[str, Any] = {"runnerToken": self.model.runner_tokens[caller], "jobToken": token}
        if kind == "update":
            body["progress"] = data.draw(st.integers(0, 100), label="progress")
            allowed: tuple[JobState, ...] = (S.PROCESSING, S.COMPLETING, S.COMPLETED)
        else:
            body["reason" if kind == "abort" else "message"] = f"{kind} from the property test"
            allowed = (S.PROCESSING,)
        r = self._post(path, body)
        if not self._holds(job, caller, token):
            _unknown_job(r)
        elif job.state not in allowed:
            _not_processing(r)
        else:
            _expect(r, 204)
            if kind == "abort":
                self.model.requeue(job)  # no failure counted
            elif kind == "error":
                job.failures += 1
                if job.failures < MAX_FAILURES:
                    self.model.requeue(job)  # spec §6.4: errors 1–4 go back to pending
                else:
                    self.model.fail(job)  # the 5th is final

    def _success(self, job: ModelJob, caller: str, token: str) -> None:
        before = self._admin_job(job.uuid) if not job.deleted else None
        r = self.client.post(
            f"{RUNNERS}/jobs/{job.uuid}/success",
            data={"runnerToken": self.model.runner_tokens[caller], "jobToken": token},
            files=result_parts(job.type, self.result_files),
        )
        if not self._holds(job, caller, token):
            _unknown_job(r)
        elif job.state == S.COMPLETED and job.completed_with == token:
            # A retried success: 204, and nothing happens again (the completion ran once).
            _expect(r, 204)
            after = self._admin_job(job.uuid)
            assert before is not None
            assert (after["finishedAt"], after["updatedAt"]) == (before["finishedAt"], before["updatedAt"])
        elif job.state != S.PROCESSING:
            _not_processing(r)
        else:
            _expect(r, 204)
            job.state, job.completed_with = S.COMPLETED, token
            for child in self.model.children(job.uuid):
                if child.state == S.WAITING_FOR_PARENT_JOB:
                    child.state = S.PENDING

    # ------------------------------------------------------------------ admin rules

    # Cancel more often than delete: a deleted graph only answers 404 for the rest of the run.
    @rule(job_uuid=jobs, action=st.sampled_from(["cancel", "cancel", "cancel", "delete"]))
    def admin(self, job_uuid: str, action: str) -> None:
        if action == "cancel":
            self._cancel(job_uuid)
        else:
            self._delete(job_uuid)

    def _cancel(self, job_uuid: str) -> None:
        job = self.model.jobs[job_uuid]
        r = self.client.post(f"{RUNNERS}/jobs/{job_uuid}/cancel", headers=ADMIN)
        if job.deleted:
            _unknown_job(r)
        elif job.state not in CANCELLABLE_STATES:
            _expect(r, 400, Message.CANNOT_CANCEL)
        else:
            _expect(r, 204)
            job.state, job.token = S.CANCELLED, None
            self.model.mark_descendants(job_uuid, S.PARENT_CANCELLED)

    def _delete(self, job_uuid: str) -> None:
        job = self.model.jobs[job_uuid]
        r = self.client.delete(f"{RUNNERS}/jobs/{job_uuid}", headers=ADMIN)
        if job.deleted:
            _unknown_job(r)
            return
        _expect(r, 204)
        for gone in [job, *self.model.descendants(job_uuid)]:
            gone.deleted = True

    # ------------------------------------------------------------------ faults

    @rule()
    def expire_leases(self) -> None:
        """The real reaper, run once with its clock past every lease (the background one never runs)."""
        jobs_service = self.coordinator.running.coordinator.jobs

        async def reap() -> int:
            real = jobs_service.clock
            jobs_service.clock = lambda: real() + LEASE_S + 1
            try:
                return await jobs_service.reap_expired()
            finally:
                jobs_service.clock = real

        reaped = self.coordinator.run(reap())
        processing = [j for j in self.model.live() if j.state == S.PROCESSING]
        assert reaped == len(processing)
        for job in processing:
            job.expiries += 1
            if job.expiries >= MAX_LEASE_EXPIRIES:
                self.model.fail(job)
            else:
                self.model.requeue(job)

    @precondition(lambda self: self.restarts < 2)
    @rule()
    def restart(self) -> None:
        self.restarts += 1
        self._stop()
        self._start()

    # ------------------------------------------------------------------ invariants

    def _admin_job(self, job_uuid: str) -> dict[str, Any]:
        r = self.client.get(f"{RUNNERS}/jobs", params={"search": job_uuid}, headers=ADMIN)
        _expect(r, 200)
        (found,) = r.json()["data"]
        assert isinstance(found, dict)
        return found

    @invariant()
    def the_coordinator_agrees_with_the_model(self) -> None:
        if self.http is None:
            return
        r = self.client.get(f"{RUNNERS}/jobs", params={"count": 100, "sort": "createdAt"}, headers=ADMIN)
        _expect(r, 200)
        seen = {j["uuid"]: j for j in r.json()["data"]}
        live = {j.uuid: j for j in self.model.live()}
        assert set(seen) == set(live)
        for uuid, job in live.items():
            shown = seen[uuid]
            assert shown["state"]["id"] == job.state, (uuid, shown["state"], job)
            assert shown["failures"] == job.failures, (uuid, shown, job)
            if job.state == S.PROCESSING:
                assert shown["runner"] is not None
                assert shown["runner"]["name"] == job.runner
                assert job.runner in self.model.registered
            assert "jobToken" not in shown

    @invariant()
    def no_job_is_held_twice_and_tokens_are_the_models(self) -> None:
        if self.server is None:
            return
        service = self.coordinator.running.coordinator.jobs

        async def rows() -> dict[str, tuple[str | None, int]]:
            found = {}
            for job in self.model.live():
                row = await service.get(job.uuid)
                assert row is not None
                found[job.uuid] = (row.processing_job_token, row.lease_expiries)
            return found

        stored = self.coordinator.run(rows())
        tokens = [token for token, _ in stored.values() if token is not None]
        assert len(tokens) == len(set(tokens))
        for uuid, (token, expiries) in stored.items():
            job = self.model.jobs[uuid]
            assert token == job.token, (uuid, token, job)
            assert expiries == job.expiries, (uuid, expiries, job)


def _run(result_files: dict[str, Path], database: Callable[[], str | None], examples: int) -> None:
    class Machine(JobStateMachine):
        def __init__(self) -> None:
            super().__init__(result_files, database)

    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=STEPS,
            phases=PHASES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        ),
    )


def test_the_job_state_machine_matches_its_model_on_sqlite(result_files: dict[str, Path]) -> None:
    _run(result_files, lambda: None, EXAMPLES)


@pytest.mark.postgres
def test_the_job_state_machine_matches_its_model_on_postgres(result_files: dict[str, Path]) -> None:
    reason = asyncio.run(postgres_available())
    if reason:
        pytest.skip(reason)
    _run(result_files, lambda: asyncio.run(_emptied_postgres()), max(EXAMPLES // 2, 1))


async def _emptied_postgres() -> str:
    async with postgres_database() as url:  # truncated on entry
        return url
