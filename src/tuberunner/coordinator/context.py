"""The coordinator's parts, wired once per process and reached by handlers through the ASGI app."""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress

from starlette.requests import Request

from tuberunner.coordinator.admin_auth import AdminAuth, announce_new_token
from tuberunner.coordinator.builtin_storyboards import BuiltinStoryboards
from tuberunner.coordinator.change_bus import ChangeBus
from tuberunner.coordinator.claims import ClaimWatch
from tuberunner.coordinator.completion import VideoCompleter
from tuberunner.coordinator.config import CoordinatorConfig
from tuberunner.coordinator.database import Database
from tuberunner.coordinator.jobs import JobService, run_forever
from tuberunner.coordinator.live import LiveService
from tuberunner.coordinator.live_files import LiveFiles
from tuberunner.coordinator.notifier import Notifier
from tuberunner.coordinator.reaper_lock import ReaperLock
from tuberunner.coordinator.runners import RunnerRegistry
from tuberunner.coordinator.storage import Storage, open_storage
from tuberunner.coordinator.videos import VideoStore

log = logging.getLogger(__name__)


class Coordinator:
    def __init__(self, config: CoordinatorConfig) -> None:
        self.config = config
        # Read on every request body: a Path built once.
        self.uploads_dir = config.uploads_dir
        # Base URLs by how requests reached us (scheme, server, Host header, root path).
        self.base_urls: dict[tuple[object, ...], str] = {}
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.db = Database(config.sqlalchemy_url)
        # Local copies of stored files (probing) are spooled beside incoming bodies: both are swept at start.
        self.storage: Storage = open_storage(config.storage, config.files_dir, config.uploads_dir)
        self.videos = VideoStore(self.db)
        self.completer = VideoCompleter(self.videos, self.storage)
        self.jobs = JobService(
            self.db, config, self.storage, notify_pending=self._ping, completer=self.completer
        )
        self.runners = RunnerRegistry(self.db, self.jobs)
        self.live = LiveService(
            self.db, config, self.jobs, self.videos, self.storage, LiveFiles(config.data_dir / "live")
        )
        self.notifier = Notifier(self.runners, config.ping_debounce_s, config.redis_url)
        self.claims = ClaimWatch(
            self.db,
            config,
            contact_of=self.runners.contact_of,
            connected=self.notifier.namespace.runner_of_sid.values,
        )
        self.storyboards = BuiltinStoryboards(
            self.jobs, self.videos, self.storage, self.runners, config, on_own_runner=self.claims.ignore
        )
        # With Redis, several coordinator processes share the database and tell each other what changed.
        self.bus = ChangeBus(config.redis_url) if config.redis_url else None
        self.runners.on_removed = self._runners_removed
        self.jobs.on_taken_back = self.notifier.jobs_taken_back
        if self.bus is not None:
            self.jobs.on_change = self.bus.jobs_changed
        self.admin = AdminAuth(self.db, config.admin_token)
        self.reaper_lock = ReaperLock(self.db)
        self._tasks: list[asyncio.Task[None]] = []

    def _ping(self) -> None:
        self.notifier.available_jobs()

    async def _runners_removed(self, runner_ids: set[int]) -> None:
        self.claims.forget(runner_ids)
        self.storyboards.runners_removed(runner_ids)
        await self.notifier.disconnect_runners(runner_ids)
        if self.bus is not None:
            await self.bus.runners_removed(runner_ids)

    async def start(self) -> None:
        await self.storage.start()
        self.uploads_dir.mkdir(parents=True, exist_ok=True)
        # Bodies half-received when the last process died are garbage.
        for leftover in self.uploads_dir.iterdir():
            leftover.unlink(missing_ok=True)
        await self.db.migrate()
        created = await self.admin.ensure()
        if created:
            announce_new_token(created)
        await self.runners.ensure_registration_token()
        await self.jobs.extend_leases()
        if self.bus is None:
            # Alone on this database: every `completing` job was interrupted by our last stop. With
            # other processes, the reaper takes only those whose completion lease expired.
            recovered = await self.jobs.recover_completions()
            if recovered:
                log.warning("redoing %d completion(s) interrupted by the last stop", recovered)
        await self.live.start()
        self._tasks = [
            asyncio.create_task(
                run_forever(self.config.reaper_interval_s, self._reap, "lease reaper"),
                name="lease-reaper",
            ),
            asyncio.create_task(
                run_forever(
                    self.config.last_contact_flush_s, self.runners.flush_contacts, "lastContact flush"
                ),
                name="contact-flush",
            ),
            asyncio.create_task(
                run_forever(self.claims.sweep_interval_s, self._watch_claims, "unclaimed-job watch"),
                name="unclaimed-job-watch",
            ),
        ]
        if self.bus is not None:
            self._tasks += [
                asyncio.create_task(self.bus.publish_loop(), name="change-bus-publish"),
                asyncio.create_task(
                    self.bus.listen_loop(self.jobs.invalidate, self.runners.forget), name="change-bus-listen"
                ),
            ]

    async def _reap(self) -> int:
        """Only the process holding the reaper lock reaps (PostgreSQL: one of them; SQLite: this one)."""
        if not await self.reaper_lock.hold():
            return 0
        return await self.jobs.reap_expired()

    async def _watch_claims(self) -> None:
        self.storyboards.take(await self.claims.sweep())

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with suppress(asyncio.CancelledError):
                await task
        await self.storyboards.stop()
        await self.live.stop()
        await self.jobs.cancel_completions()
        await self.reaper_lock.release()
        with suppress(Exception):
            await self.runners.flush_contacts()
        await self.notifier.close()
        if self.bus is not None:
            await self.bus.close()
        await self.db.dispose()
        await self.storage.close()


def coordinator_of(request: Request) -> Coordinator:
    coordinator: Coordinator = request.app.state.coordinator
    return coordinator


_MAX_BASE_URLS = 64


def base_url_of(request: Request) -> str:
    """The absolute URL runners use to reach us (configured, or as this request reached us)."""
    coordinator = coordinator_of(request)
    configured: str | None = coordinator.config.public_url
    if configured:
        return configured.rstrip("/")
    scope = request.scope
    host = next((value for name, value in scope["headers"] if name == b"host"), None)
    key = (scope.get("scheme"), scope.get("server"), host, scope.get("app_root_path", scope.get("root_path")))
    known = coordinator.base_urls.get(key)
    if known is None:
        known = str(request.base_url).rstrip("/")
        if len(coordinator.base_urls) >= _MAX_BASE_URLS:
            coordinator.base_urls.clear()  # Host headers are the client's choice: keep the cache bounded
        coordinator.base_urls[key] = known
    return known
