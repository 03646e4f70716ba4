"""Registered runners: registration, token lookups from memory, lastContact, removal.

`jobs/request` is by far the most frequent call, so its token check must not touch the database: known
tokens are cached here and dropped when this process removes a runner. lastContact is kept in memory on
every authenticated call and written in batches; admin listings merge the in-memory values.
"""

from __future__ import annotations

import logging
import time
import uuid as uuidlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from tuberunner.coordinator.database import Database
from tuberunner.coordinator.jobs import JobService
from tuberunner.coordinator.models import Runner
from tuberunner.coordinator.problems import BadRequest, NotFound
from tuberunner.coordinator.schema import registration_tokens, runners
from tuberunner.protocol.errors import Message
from tuberunner.protocol.jobs import REGISTRATION_TOKEN_PREFIX, RUNNER_TOKEN_PREFIX

log = logging.getLogger(__name__)
_BY_TOKEN = select(runners).where(runners.c.token == bindparam("token"))


@dataclass(frozen=True)
class RunnerAuth:
    runner: Runner
    token: str
    version: str | None


class RunnerRegistry:
    def __init__(
        self,
        db: Database,
        jobs: JobService,
        clock: Callable[[], float] = time.time,
        *,
        token_ttl_s: float = 10.0,
    ) -> None:
        self.db = db
        self.jobs = jobs
        self.clock = clock
        # Another coordinator process may remove a runner; a cached token is re-checked after this long.
        self.token_ttl_s = token_ttl_s
        self._by_token: dict[str, tuple[RunnerAuth, float]] = {}
        self._contacts: dict[int, tuple[float, str | None]] = {}
        # Told which runners were removed (the notifier closes their sockets).
        self.on_removed: Callable[[set[int]], Awaitable[None]] | None = None

    # ------------------------------------------------------------ lookups

    async def by_token(self, token: str) -> RunnerAuth | None:
        cached = self._by_token.get(token)
        if cached is not None and time.monotonic() - cached[1] < self.token_ttl_s:
            return cached[0]
        params = {"token": token}
        row = await self.db.read_statement(lambda conn: conn.execute(_BY_TOKEN, params).mappings().first())
        if row is None:
            return None
        auth = RunnerAuth(Runner(row["id"], row["name"], row["description"]), row["token"], row["version"])
        self._by_token[token] = (auth, time.monotonic())
        return auth

    def touch(self, runner_id: int, ip: str | None) -> None:
        """Record a contact now; written to the database by `flush_contacts`."""
        self._contacts[runner_id] = (self.clock(), ip)

    def contact_of(self, runner_id: int) -> tuple[float, str | None] | None:
        return self._contacts.get(runner_id)

    async def flush_contacts(self) -> None:
        if not self._contacts:
            return
        pending = dict(self._contacts)
        async with self.db.write() as conn:
            await conn.execute(
                update(runners)
                .where(runners.c.id == bindparam("rid"))
                .values(last_contact=bindparam("ts"), ip=bindparam("addr")),
                [{"rid": rid, "ts": ts, "addr": ip} for rid, (ts, ip) in pending.items()],
            )
        # A contact recorded during the write stays for the next flush.
        for rid, value in pending.items():
            if self._contacts.get(rid) is value:
                del self._contacts[rid]

    # ------------------------------------------------------------ registration

    async def register(
        self, registration_token: str, name: str, description: str | None, version: str | None, ip: str | None
    ) -> tuple[int, str]:
        now = self.clock()
        token = RUNNER_TOKEN_PREFIX + str(uuidlib.uuid4())
        async with self.db.write() as conn:
            reg_id = (
                await conn.execute(
                    select(registration_tokens.c.id).where(registration_tokens.c.token == registration_token)
                )
            ).scalar()
            if reg_id is None:
                raise NotFound(Message.REGISTRATION_TOKEN_INVALID)
            taken = (await conn.execute(select(runners.c.id).where(runners.c.name == name))).scalar()
            if taken is not None:
                raise BadRequest(Message.RUNNER_NAME_EXISTS)
            try:
                result = await conn.execute(
                    insert(runners).values(
                        token=token,
                        name=name,
                        description=description,
                        version=version,
                        ip=ip,
                        last_contact=now,
                        created_at=now,
                        updated_at=now,
                        registration_token_id=reg_id,
                    )
                )
            except IntegrityError as exc:  # a concurrent registration took the name (PostgreSQL)
                raise BadRequest(Message.RUNNER_NAME_EXISTS) from exc
            key = result.inserted_primary_key
            assert key is not None
        return int(key[0]), token

    async def own_runner(self, name: str, description: str, version: str) -> int:
        """The row of the coordinator's own runner (a job the coordinator does itself is held by it, as
        every processing job is held by a runner), created at first need under the oldest registration
        token. Its token is random and never leaves the database: no client can act as it."""
        async with self.db.write() as conn:
            found = (await conn.execute(select(runners.c.id).where(runners.c.name == name))).scalar()
            if found is not None:
                return int(found)
            reg_id = (
                await conn.execute(
                    select(registration_tokens.c.id).order_by(registration_tokens.c.id).limit(1)
                )
            ).scalar()
            now = self.clock()
            if reg_id is None:
                created = await conn.execute(
                    insert(registration_tokens).values(
                        token=REGISTRATION_TOKEN_PREFIX + str(uuidlib.uuid4()), created_at=now, updated_at=now
                    )
                )
                reg_key = created.inserted_primary_key
                assert reg_key is not None
                reg_id = reg_key[0]
            result = await conn.execute(
                insert(runners).values(
                    token=RUNNER_TOKEN_PREFIX + str(uuidlib.uuid4()),
                    name=name,
                    description=description,
                    version=version,
                    ip=None,
                    last_contact=now,
                    created_at=now,
                    updated_at=now,
                    registration_token_id=reg_id,
                )
            )
            key = result.inserted_primary_key
            assert key is not None
        return int(key[0])

    async def set_version(self, auth: RunnerAuth, version: str) -> None:
        async with self.db.write() as conn:
            await conn.execute(
                update(runners)
                .where(runners.c.id == auth.runner.id)
                .values(version=version, updated_at=self.clock())
            )
        self._by_token[auth.token] = (RunnerAuth(auth.runner, auth.token, version), time.monotonic())

    async def remove(self, runner_ids: Iterable[int]) -> set[int]:
        """Delete runners; their processing jobs are re-queued in the same transaction (not left to die).
        Returns the ids that existed."""
        async with self.db.write() as conn:
            ids = list(
                (await conn.execute(select(runners.c.id).where(runners.c.id.in_(list(runner_ids))))).scalars()
            )
            requeued = await self.jobs.requeue_runner_jobs(conn, ids)
            await conn.execute(delete(runners).where(runners.c.id.in_(ids)))
        await self._removed(ids, requeued)
        return set(ids)

    async def remove_registration_token(self, token_id: int) -> set[int]:
        """Delete a registration token and the runners registered with it; returns their ids."""
        async with self.db.write() as conn:
            ids = list(
                (
                    await conn.execute(
                        select(runners.c.id).where(runners.c.registration_token_id == token_id)
                    )
                ).scalars()
            )
            requeued = await self.jobs.requeue_runner_jobs(conn, ids)
            result = await conn.execute(
                delete(registration_tokens).where(registration_tokens.c.id == token_id)
            )
            if result.rowcount != 1:
                raise NotFound(Message.REGISTRATION_TOKEN_NOT_FOUND)
            # The FK cascade removes the runners; done explicitly too for engines without FK enforcement.
            await conn.execute(delete(runners).where(runners.c.id.in_(ids)))
        await self._removed(ids, requeued)
        return set(ids)

    def forget(self, runner_ids: set[int]) -> None:
        """Drop removed runners from memory (also called when another process removed them)."""
        for token, (auth, _) in list(self._by_token.items()):
            if auth.runner.id in runner_ids:
                del self._by_token[token]
        for rid in runner_ids:
            self._contacts.pop(rid, None)

    async def _removed(self, ids: list[int], requeued: int) -> None:
        gone = set(ids)
        self.forget(gone)
        self.jobs.runners_removed(requeued)
        if gone and self.on_removed is not None:
            try:
                await self.on_removed(gone)
            except Exception:  # the removal is committed; a socket left open only delays the news
                log.exception("could not tell about removed runners %s", sorted(gone))

    async def create_registration_token(self) -> str:
        now = self.clock()
        token = REGISTRATION_TOKEN_PREFIX + str(uuidlib.uuid4())
        async with self.db.write() as conn:
            await conn.execute(
                insert(registration_tokens).values(token=token, created_at=now, updated_at=now)
            )
        return token

    async def ensure_registration_token(self) -> None:
        """Like PeerTube: a fresh coordinator has one registration token."""
        async with self.db.read() as conn:
            count = (await conn.execute(select(func.count()).select_from(registration_tokens))).scalar_one()
        if count == 0:
            await self.create_registration_token()
