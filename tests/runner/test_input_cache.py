"""The shared input cache against the real coordinator on loopback, behind a real TCP proxy."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import httpx
import pytest

from tests.runner.fixtures_media import FAST, Env, proxied_env, video_url
from tests.support.servers import RunningCoordinator
from tests.support.tcp_proxy import Plan
from tuberunner.oneshot.disk import EmbeddedDisk
from tuberunner.runner.errors import JobGone
from tuberunner.runner.input_cache import CacheKey, InputCache
from tuberunner.runner.job import AcceptedJob

SIZE = 2 * 1024 * 1024 + 777
DATA = os.urandom(SIZE)


@pytest.fixture
def database_url() -> None:
    """The storage backend plays no part here: SQLite only."""
    return None


@pytest.fixture
async def env(coordinator: RunningCoordinator) -> AsyncIterator[Env]:
    async with proxied_env(coordinator) as env:
        yield env


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def cache_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


async def two_jobs_of_one_video(env: Env, data: bytes = DATA) -> tuple[AcceptedJob, AcceptedJob, int, str]:
    video = await env.seeder.video(data, jobs=2)
    first = await env.seeder.accept(video.jobs[0], http=env.http)
    second = await env.seeder.accept(video.jobs[1], http=env.http)
    return first, second, video.id, video.uuid


async def test_two_jobs_of_one_video_download_it_once(env: Env, folder: Path) -> None:
    first, second, _, _ = await two_jobs_of_one_video(env)
    cache = InputCache(env.inputs, folder, max_bytes=10 * SIZE, limits=FAST)
    async with cache.inputs_for(first) as fetch_first, cache.inputs_for(second) as fetch_second:
        path_first = await fetch_first(video_url(first))
        path_second = await fetch_second(video_url(second))
        assert path_first == path_second
        assert path_first.read_bytes() == DATA
    assert (cache.stats.downloads, cache.stats.hits, cache.stats.checks) == (1, 1, 1)
    # The second job only asked for the last byte, with its own URL and token.
    assert env.inputs.offsets == [0, SIZE - 1]
    assert env.proxy.stats.bytes_down < SIZE + 10_000
    # Released but kept (under the size limit) for the next job of the video.
    assert path_first.exists()


async def test_a_file_changed_on_the_server_is_not_served_from_the_cache(env: Env, folder: Path) -> None:
    """The parent read the original; after its success `max-quality` is its output (another file)."""
    parent, child, video_id, video_uuid = await two_jobs_of_one_video(env)
    cache = InputCache(env.inputs, folder, max_bytes=10 * SIZE, limits=FAST)
    optimized = os.urandom(SIZE // 2)
    async with cache.inputs_for(parent) as fetch_parent:
        original = await fetch_parent(video_url(parent))
        await env.seeder.put(
            video_id, video_uuid, "web-video", "optimized-240.mp4", optimized, resolution=240
        )
        async with cache.inputs_for(child) as fetch_child:
            fresh = await fetch_child(video_url(child))
            assert fresh.read_bytes() == optimized
            # The parent still reads what it downloaded, untouched.
            assert original.read_bytes() == DATA
        assert (cache.stats.downloads, cache.stats.stale) == (2, 1)
    # The retired original went with its last reader; the fresh one stays cached.
    assert not original.exists()
    assert cache_files(folder) == [fresh.name]


async def test_a_stale_entry_nobody_holds_is_deleted_when_replaced(env: Env, folder: Path) -> None:
    first, second, video_id, video_uuid = await two_jobs_of_one_video(env)
    cache = InputCache(env.inputs, folder, max_bytes=10 * SIZE, limits=FAST)
    async with cache.inputs_for(first) as fetch_first:
        original = await fetch_first(video_url(first))
    await env.seeder.put(video_id, video_uuid, "web-video", "opt-240.mp4", os.urandom(1000), resolution=240)
    async with cache.inputs_for(second) as fetch_second:
        fresh = await fetch_second(video_url(second))
        assert not original.exists()
        assert cache_files(folder) == [fresh.name]
    assert cache.size_bytes == 1000


async def test_jobs_asking_together_share_one_download(env: Env, folder: Path) -> None:
    first, second, _, _ = await two_jobs_of_one_video(env)
    env.proxy.default = Plan.forward(rate_bytes_per_s=8_000_000)
    cache = InputCache(env.inputs, folder, max_bytes=10 * SIZE, limits=FAST)
    async with cache.inputs_for(first) as fetch_first, cache.inputs_for(second) as fetch_second:
        async with asyncio.TaskGroup() as tg:
            one = tg.create_task(fetch_first(video_url(first)))
            two = tg.create_task(fetch_second(video_url(second)))
        assert one.result() == two.result()
        assert one.result().read_bytes() == DATA
    assert cache.stats.downloads == 1
    assert cache.stats.bytes_fetched == SIZE
    assert env.inputs.offsets == [0, SIZE - 1]


async def test_a_cancelled_downloader_hands_its_bytes_to_the_next_waiting_job(env: Env, folder: Path) -> None:
    first, second, _, _ = await two_jobs_of_one_video(env)
    env.proxy.default = Plan.forward(rate_bytes_per_s=4_000_000)
    cache = InputCache(env.inputs, folder, max_bytes=10 * SIZE, limits=FAST)
    async with cache.inputs_for(second) as fetch_second:
        async with cache.inputs_for(first) as fetch_first, asyncio.TaskGroup() as tg:
            downloading = tg.create_task(fetch_first(video_url(first)))
            while env.proxy.stats.bytes_down < SIZE // 3:
                await asyncio.sleep(0.01)
            waiting = tg.create_task(fetch_second(video_url(second)))
            await asyncio.sleep(0.05)
            downloading.cancel()
        path = waiting.result()
        assert path.read_bytes() == DATA
    # The second job resumed where the first stopped: nothing was fetched twice.
    assert len(env.inputs.offsets) == 2
    assert env.inputs.offsets[1] >= SIZE // 3
    assert cache.stats.bytes_fetched == SIZE


async def test_when_the_downloading_job_is_gone_the_waiting_job_downloads_with_its_own_token(
    env: Env, folder: Path
) -> None:
    first, second, _, _ = await two_jobs_of_one_video(env)
    gone = AcceptedJob(first.uuid, first.type, first.payload, "ptrjt-revoked", first.instance_url)
    cache = InputCache(env.inputs, folder, max_bytes=10 * SIZE, limits=FAST)
    async with cache.inputs_for(gone) as fetch_gone, cache.inputs_for(second) as fetch_second:
        results = await asyncio.gather(
            fetch_gone(video_url(first)), fetch_second(video_url(second)), return_exceptions=True
        )
    assert isinstance(results[0], JobGone)
    assert isinstance(results[1], Path)
    assert results[1].read_bytes() == DATA


async def test_unreferenced_entries_are_evicted_least_recently_used_first(env: Env, folder: Path) -> None:
    cache = InputCache(env.inputs, folder, max_bytes=int(SIZE * 2.5), limits=FAST)
    jobs = [await env.job(os.urandom(SIZE)) for _ in range(5)]

    async def fetch_and_release(job: AcceptedJob) -> Path:
        async with cache.inputs_for(job) as fetch:
            return await fetch(video_url(job))

    async with cache.inputs_for(jobs[0]) as fetch_held:
        held = await fetch_held(video_url(jobs[0]))
        paths = [await fetch_and_release(job) for job in jobs[1:4]]
        # Limit 2.5 files: each new file pushed out the least recently used one nobody holds. The oldest
        # of all is held by its job, so it stayed.
        assert held.exists()
        assert [p.exists() for p in paths] == [False, False, True]
        assert cache.stats.evictions == 2
    assert held.exists()  # released, and the cache is under its limit: kept for later jobs
    newest = await fetch_and_release(jobs[4])
    # Now the released one is the least recently used.
    assert not held.exists()
    assert cache_files(folder) == sorted([paths[2].name, newest.name])
    assert cache.size_bytes == 2 * SIZE


async def test_idle_entries_are_pruned(env: Env, folder: Path) -> None:
    now = [1000.0]
    cache = InputCache(
        env.inputs, folder, max_bytes=10 * SIZE, max_idle_s=60, limits=FAST, clock=lambda: now[0]
    )
    job = await env.job(DATA)
    async with cache.inputs_for(job) as fetch:
        path = await fetch(video_url(job))
    now[0] += 61
    cache.prune()
    assert not path.exists()
    assert cache_files(folder) == []


async def test_a_url_without_a_cache_key_is_downloaded_privately_and_removed_on_release(
    env: Env, folder: Path
) -> None:
    job = await env.job(DATA)
    url = video_url(job) + "?attempt=1"  # a query string: not a plain runner input URL, never shared
    assert CacheKey.of(url) is None
    cache = InputCache(env.inputs, folder, max_bytes=10 * SIZE, limits=FAST)
    async with cache.inputs_for(job) as fetch:
        path = await fetch(url)
        assert path.read_bytes() == DATA
    assert not path.exists()
    assert cache_files(folder) == []


def test_leftovers_of_a_previous_process_are_swept_and_nothing_else(tmp_path: Path) -> None:
    (tmp_path / "ci-old-g1.mp4").write_bytes(b"x")
    (tmp_path / "ci-old-g2.part").write_bytes(b"x")
    (tmp_path / "not-ours.txt").write_bytes(b"x")
    InputCache(_NoSource(), tmp_path, max_bytes=1)
    assert cache_files(tmp_path) == ["not-ours.txt"]


def test_cache_key_leaves_out_the_job_part_of_the_url() -> None:
    base = "https://tube.example/api/v1/runners/jobs"
    video = "files/videos/3f0a1c2e-0000-4000-8000-000000000001"
    one = CacheKey.of(f"{base}/job-one/{video}/max-quality")
    two = CacheKey.of(f"{base}/job-two/{video}/max-quality")
    assert one is not None
    assert one == two
    assert one.base_url == "https://tube.example"
    assert one.resource == "max-quality"
    assert CacheKey.of(f"{base}/job-one/{video}/max-quality/audio") != one
    assert CacheKey.of(f"https://other.example/api/v1/runners/jobs/job-one/{video}/max-quality") != one


class _NoSource:
    def open_input(
        self, url: str, job: AcceptedJob, offset: int
    ) -> AbstractAsyncContextManager[httpx.Response]:
        raise AssertionError("no download expected")


# ------------------------------------------------------------------ a shared disk (the one-shot mode)


def shared_disk(env: Env, coordinator: RunningCoordinator) -> EmbeddedDisk:
    return EmbeddedDisk(coordinator.coordinator, env.seeder.runner_token)


async def test_on_a_shared_disk_inputs_are_linked_and_checked_again_before_a_reuse(
    env: Env, coordinator: RunningCoordinator, folder: Path
) -> None:
    parent, child, video_id, video_uuid = await two_jobs_of_one_video(env)
    cache = InputCache(
        env.inputs, folder, max_bytes=10 * SIZE, limits=FAST, shared_disk=shared_disk(env, coordinator)
    )
    async with cache.inputs_for(parent) as fetch_parent:
        original = await fetch_parent(video_url(parent))
        assert original.read_bytes() == DATA
        assert original.stat().st_nlink > 1  # the coordinator's file itself, not a copy
        assert (cache.stats.linked, cache.stats.downloads) == (1, 0)
        assert env.proxy.stats.bytes_down < 10_000  # the accepts' answers: no file crossed HTTP
        # `max-quality` becomes another file (the parent's output, as on its success).
        optimized = os.urandom(SIZE // 2)
        await env.seeder.put(
            video_id, video_uuid, "web-video", "optimized-240.mp4", optimized, resolution=240
        )
        async with cache.inputs_for(child) as fetch_child:
            fresh = await fetch_child(video_url(child))
            assert fresh.read_bytes() == optimized
            assert original.read_bytes() == DATA  # what the parent holds stays as it was
    assert (cache.stats.linked, cache.stats.stale, cache.stats.downloads) == (2, 1, 0)
    assert not original.exists()
    assert cache_files(folder) == [fresh.name]


async def test_on_a_shared_disk_an_input_of_another_runners_job_is_downloaded(
    env: Env, coordinator: RunningCoordinator, folder: Path
) -> None:
    # The coordinator hands a file over only with the job's own tokens: a job this runner does not hold
    # (here: the disk of another runner token) gets the coordinator's answer over HTTP, as ever.
    job = await env.job(DATA)
    other = await env.seeder.c.runners.create_registration_token()
    _, other_token = await coordinator.coordinator.runners.register(other, "other", "", None, "127.0.0.1")
    cache = InputCache(
        env.inputs,
        folder,
        max_bytes=10 * SIZE,
        limits=FAST,
        shared_disk=EmbeddedDisk(coordinator.coordinator, other_token),
    )
    async with cache.inputs_for(job) as fetch:
        path = await fetch(video_url(job))
        assert path.read_bytes() == DATA
        assert path.stat().st_nlink == 1
    assert (cache.stats.linked, cache.stats.downloads) == (0, 1)
