"""Input downloads against the real coordinator on loopback, through a real TCP proxy that injects faults."""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.runner.fixtures_media import FAST, CoordinatorInputs, Env, leftovers, proxied_env, video_url
from tests.support.servers import RunningCoordinator
from tests.support.tcp_proxy import Action, Plan
from tuberunner.protocol.jobs import JobType
from tuberunner.runner.errors import JobFailed, JobGone, TransientError
from tuberunner.runner.job import AcceptedJob
from tuberunner.runner.retry import Deadlines
from tuberunner.runner.transfers import (
    DownloadLimits,
    InputDownloader,
    Transfer,
    read_version,
    resource_of,
    result_content_type,
)

DATA = os.urandom(3 * 1024 * 1024 + 12345)


@pytest.fixture
def database_url() -> None:
    """The storage backend plays no part here: SQLite only."""
    return None


@pytest.fixture
async def env(coordinator: RunningCoordinator) -> AsyncIterator[Env]:
    async with proxied_env(coordinator) as env:
        yield env


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """The job's folder (tmp_path also holds the coordinator's data)."""
    return tmp_path / "work"


async def test_download_puts_the_whole_input_in_place_under_a_typed_name(env: Env, work: Path) -> None:
    job = await env.job(DATA)
    path = await InputDownloader(env.inputs, job, work, FAST)(video_url(job))
    assert path.read_bytes() == DATA
    assert path.suffix == ".mp4"  # from Content-Type: ffmpeg and humans both like it
    assert leftovers(work) == [path.name]
    assert env.inputs.offsets == [0]


async def test_a_reset_mid_body_resumes_with_range_and_yields_identical_bytes(env: Env, work: Path) -> None:
    job = await env.job(DATA)
    env.proxy.plan_next(Plan.reset_after(1_000_000))
    transfer = Transfer(work / "input")
    done = await transfer.run(env.inputs, job, video_url(job), FAST)
    assert done.path.read_bytes() == DATA
    assert env.proxy.stats.actions == [Action.RESET]
    assert len(env.inputs.offsets) == 2
    assert 0 < env.inputs.offsets[1] <= 1_000_000
    # Resumed, not restarted: the network carried the file once, plus what the reset threw away.
    assert transfer.bytes_fetched == len(DATA)
    assert done.version.size_bytes == len(DATA)
    assert done.version.etag  # the coordinator names the file it serves
    assert leftovers(work) == [done.path.name]


async def test_an_early_end_of_stream_resumes_too(env: Env, work: Path) -> None:
    job = await env.job(DATA)
    env.proxy.plan_next(Plan.close_after(700_000))
    env.proxy.plan_next(Plan.close_after(900_000))
    path = await InputDownloader(env.inputs, job, work, FAST)(video_url(job))
    assert path.read_bytes() == DATA
    assert env.proxy.stats.actions == [Action.CLOSE, Action.CLOSE]
    assert len(env.inputs.offsets) == 3
    assert env.inputs.offsets[0] < env.inputs.offsets[1] < env.inputs.offsets[2]


async def test_a_stalled_connection_is_cut_by_the_read_deadline_and_resumed(env: Env, work: Path) -> None:
    job = await env.job(DATA)
    env.proxy.plan_next(Plan.stall_after(500_000))
    limits = DownloadLimits(
        deadlines=Deadlines(connect_s=1, read_s=0.3), retry=FAST.retry, base_s=FAST.base_s
    )
    path = await InputDownloader(env.inputs, job, work, limits)(video_url(job))
    assert path.read_bytes() == DATA
    assert env.proxy.stats.actions == [Action.STALL]
    assert env.inputs.offsets[1] > 0


async def test_a_server_answering_200_to_a_range_restarts_from_zero(env: Env, work: Path) -> None:
    job = await env.job(DATA)
    env.inputs.send_range = False  # plays a server that ignores Range
    env.proxy.plan_next(Plan.reset_after(1_000_000))
    transfer = Transfer(work / "input")
    done = await transfer.run(env.inputs, job, video_url(job), FAST)
    assert done.path.read_bytes() == DATA
    assert env.inputs.offsets[1] > 0  # it asked to resume...
    assert transfer.bytes_fetched > len(DATA)  # ...and took the whole file again


async def test_a_file_replaced_on_the_server_between_attempts_is_downloaded_again_whole(
    env: Env, work: Path
) -> None:
    video = await env.seeder.video(DATA)
    job = await env.seeder.accept(video.jobs[0], http=env.http)
    replacement = os.urandom(2 * 1024 * 1024)

    @dataclass
    class ReplacingSource:
        """Before the second request, the parent's output replaces `max-quality` (as after its success)."""

        inner: CoordinatorInputs
        calls: int = 0

        @asynccontextmanager
        async def open_input(self, url: str, job: AcceptedJob, offset: int) -> AsyncIterator[httpx.Response]:
            self.calls += 1
            if self.calls == 2:
                await env.seeder.put(
                    video.id, video.uuid, "web-video", "out-480.mp4", replacement, resolution=480
                )
            async with self.inner.open_input(url, job, offset) as response:
                yield response

    env.proxy.plan_next(Plan.reset_after(1_000_000))
    path = await InputDownloader(ReplacingSource(env.inputs), job, work, FAST)(video_url(job))
    assert path.read_bytes() == replacement
    # Resume asked from the cut, saw another file size, and started again from 0.
    assert env.inputs.offsets[0] == 0
    assert env.inputs.offsets[1] > 0
    assert env.inputs.offsets[-1] == 0


@dataclass
class LyingSource:
    """A server whose Content-Length does not match its body (the proxy cannot rewrite headers)."""

    announced: int
    body: bytes
    calls: int = 0

    @asynccontextmanager
    async def open_input(self, url: str, job: AcceptedJob, offset: int) -> AsyncIterator[httpx.Response]:
        self.calls += 1
        yield httpx.Response(
            200,
            headers={"content-length": str(self.announced), "content-type": "video/mp4"},
            stream=httpx.ByteStream(self.body),
        )


@pytest.mark.parametrize("announced", [len(DATA) + 100, len(DATA) - 100], ids=["short-body", "long-body"])
async def test_a_body_that_does_not_match_its_announced_length_is_an_error(
    announced: int, work: Path
) -> None:
    source = LyingSource(announced, DATA)
    job = AcceptedJob("j", JobType.VOD_WEB_VIDEO, {}, "t", "http://x")
    with pytest.raises(TransientError, match=r"connection ended at byte|sent more than"):
        await InputDownloader(source, job, work, FAST)("http://x/f")
    assert source.calls == FAST.retry.attempts
    assert leftovers(work) == []


async def test_a_job_gone_on_the_server_is_not_retried(env: Env, work: Path) -> None:
    job = await env.job(DATA)
    stale = AcceptedJob(job.uuid, job.type, job.payload, "ptrjt-not-the-token", job.instance_url)
    with pytest.raises(JobGone, match="Unknown runner job"):
        await InputDownloader(env.inputs, stale, work, FAST)(video_url(job))
    assert env.inputs.offsets == [0]
    assert leftovers(work) == []


async def test_a_download_slower_than_its_total_deadline_gives_up(env: Env, work: Path) -> None:
    job = await env.job(DATA)
    env.proxy.default = Plan.forward(rate_bytes_per_s=2_000_000)
    limits = DownloadLimits(deadlines=FAST.deadlines, retry=FAST.retry, base_s=0.3, min_rate_bytes_per_s=1e9)
    with pytest.raises(TransientError, match="not finished after"):
        await InputDownloader(env.inputs, job, work, limits)(video_url(job))
    assert leftovers(work) == []


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB filesystem (tmpfs); needs root and mount(8)."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


async def test_a_full_disk_fails_the_job_and_removes_the_partial(env: Env, full_disk: Path) -> None:
    job = await env.job(DATA)
    with pytest.raises(JobFailed, match="Not enough disk space"):
        await InputDownloader(env.inputs, job, full_disk, FAST)(video_url(job))
    assert leftovers(full_disk) == []
    assert env.inputs.offsets == [0]  # a full disk is not retried


async def test_read_version_asks_for_the_last_byte_only(env: Env) -> None:
    job = await env.job(DATA)
    version = await read_version(env.inputs, job, video_url(job), probe_offset=len(DATA) - 1, limits=FAST)
    assert version.size_bytes == len(DATA)
    assert version.etag is not None
    assert version.last_modified is not None
    assert env.inputs.offsets == [len(DATA) - 1]
    assert env.proxy.stats.bytes_down < 2000


def test_resource_and_content_type_helpers() -> None:
    base = "https://tube.example/api/v1/runners/jobs/0c6c/files/videos/9f2e-aa"
    assert resource_of(base + "/max-quality") == ("9f2e-aa", "max-quality")
    assert resource_of(base + "/max-quality/audio") == ("9f2e-aa", "max-quality/audio")
    assert resource_of(base + "/previews/max-quality") == ("9f2e-aa", "previews/max-quality")
    assert resource_of(base + "/studio/task-files/intro-1.mp4") == (
        "9f2e-aa",
        "studio/task-files/intro-1.mp4",
    )
    assert resource_of("https://tube.example/static/x.mp4") is None
    assert result_content_type("videoFile", Path("a.mp4")) == "video/mp4"
    assert result_content_type("resolutionPlaylistFile", Path("a.m3u8")) == "application/vnd.apple.mpegurl"
    assert result_content_type("vttFile", Path("a")) == "text/vtt"


async def test_with_the_real_instance_client_a_reset_download_resumes(env: Env, work: Path) -> None:
    """The same contract through `InstanceClient.open_input` (client.py), the runner's real source."""
    from tuberunner.runner.client import InstanceClient

    job = await env.job(DATA)
    async with InstanceClient(env.proxy.url, env.inputs.runner_token, deadlines=FAST.deadlines) as client:
        # A new client: its first connection is the download's.
        env.proxy.plan_next(Plan.reset_after(1_000_000))
        transfer = Transfer(work / "input")
        done = await transfer.run(client, job, video_url(job), FAST)
    assert done.path.read_bytes() == DATA
    assert env.proxy.stats.actions == [Action.RESET]
    assert transfer.attempts == 2
    assert transfer.bytes_fetched == len(DATA)
