"""The dashboard in headless Chromium against a real coordinator and our real runner running the real
ffmpeg: a job's progress shows and grows, the cancel button cancels it on the server and the runner stops;
a published video plays through the vendored hls.js; text from runners and uploads stays text.

Set TUBERUNNER_DASHBOARD_SCREENSHOT=docs/dashboard.png to have the player test save a screenshot of the
page (with a job running next to the published video)."""

from __future__ import annotations

import asyncio
import os
import re
import uuid as uuidlib
from pathlib import Path

import httpx
import pytest

pytest.importorskip("playwright.async_api", reason="Playwright is not installed: pip install -e '.[dev]'")

from playwright.async_api import Dialog, Page, expect

from tests.coordinator.test_ingest_support import upload_ok
from tests.dashboard.conftest import PAGE_MS, Clips, Dashboard, register_runner
from tests.e2e.conftest import StartRunner, admin, idle, job_row
from tests.support.protocol import create_video, input_url
from tests.support.servers import RunningCoordinator
from tuberunner import __version__
from tuberunner.coordinator.models import JobSpec
from tuberunner.protocol.jobs import MAX_FAILURES, JobState, JobType

# Job events (a transcode starting, a pipeline finishing) on 2 shared cores; page reactions wait for
# `expect`'s default (conftest.PAGE_MS).
JOB_MS = 60_000
LONG_RESOLUTION = 720  # about 15 s of ffmpeg: always cancelled long before its end
SCREENSHOT = os.environ.get("TUBERUNNER_DASHBOARD_SCREENSHOT")


async def seed_transcode(running: RunningCoordinator, source: Path, *, name: str, resolution: int) -> str:
    """A pending web-video job at `resolution` on a new video named `name` whose source is `source`."""
    video_id, video_uuid = await create_video(running, name=name, source=source.read_bytes(), resolution=90)
    job_uuid = str(uuidlib.uuid4())
    payload = {
        "input": {"videoFileUrl": input_url(job_uuid, video_uuid), "separatedAudioFileUrl": []},
        "output": {"resolution": resolution, "fps": 25},
    }
    private = {"videoUUID": video_uuid, "isNewVideo": True}
    await running.coordinator.jobs.create(
        video_id, [JobSpec(job_uuid, JobType.VOD_WEB_VIDEO, 100, payload, private)]
    )
    return job_uuid


async def shown_progress_above(page: Page, job_uuid: str, floor: int) -> int:
    """Wait until the job's row shows a progress above `floor`; return what it shows then."""
    selector = f'#jobs tr[data-job="{job_uuid}"] .pct'
    await page.wait_for_function(
        "([selector, floor]) => parseInt(document.querySelector(selector)?.textContent ?? '') > floor",
        arg=[selector, floor],
        timeout=JOB_MS,
    )
    text = await page.locator(selector).text_content()
    assert text is not None
    return int(text.rstrip("%"))


async def admin_job(url: str, job_uuid: str) -> dict[str, object]:
    async with admin(url) as http:
        listed = (await http.get("/api/v1/runners/jobs", params={"search": job_uuid})).json()
    (job,) = listed["data"]
    assert isinstance(job, dict)
    return job


async def test_a_running_job_shows_its_progress_growing_and_the_cancel_button_cancels_it(
    coordinator: RunningCoordinator, start_runner: StartRunner, clips: Clips, dashboard: Dashboard
) -> None:
    runner = await start_runner([await register_runner(coordinator.url, "edge-box-1")])
    job_uuid = await seed_transcode(coordinator, clips.long, name="Long clip", resolution=LONG_RESOLUTION)
    page = await dashboard.sign_in(coordinator.url)
    row = page.locator(f'#jobs tr[data-job="{job_uuid}"]')
    await expect(row).to_have_attribute("data-state", str(int(JobState.PROCESSING)), timeout=JOB_MS)

    first = await shown_progress_above(page, job_uuid, 0)
    second = await shown_progress_above(page, job_uuid, first)
    assert 0 < first < second < 100
    await expect(row.locator("progress")).to_be_visible()
    await expect(row.get_by_role("cell", name="edge-box-1")).to_be_visible()
    await expect(row.get_by_role("cell", name="Long clip")).to_be_visible()
    # The runner's row: its version and the job it holds, with its progress.
    runner_row = page.locator("#runners tbody tr", has_text="edge-box-1")
    await expect(runner_row.locator("td")).to_have_text(
        ["edge-box-1", __version__, "127.0.0.1", re.compile(r"\d+ s ago"), re.compile("web-video")]
    )
    await expect(runner_row.locator(f'.current-job[data-job="{job_uuid}"]')).to_contain_text("web-video")

    asked: list[str] = []

    async def accept(dialog: Dialog) -> None:
        asked.append(dialog.message)
        await dialog.accept()

    page.once("dialog", accept)
    await row.get_by_role("button", name="Cancel").click()

    await expect(row.locator(".badge")).to_have_text("Cancelled")
    await expect(row.get_by_role("button", name="Cancel")).to_be_hidden()
    await expect(runner_row.locator(".current-job")).to_have_count(0)
    (question,) = asked
    assert "vod-web-video-transcoding" in question
    # On the server: cancelled through the admin API, and the runner stopped its ffmpeg (the runner
    # fixture checks that no ffmpeg is left).
    job = await admin_job(coordinator.url, job_uuid)
    assert job["state"] == {"id": int(JobState.CANCELLED), "label": "Cancelled"}
    await runner.wait_for(runner.finished(job_uuid))
    (outcome,) = runner.outcomes(job_uuid)
    assert outcome.startswith("cancelled")
    row_after = await job_row(coordinator, job_uuid)
    assert row_after is not None
    assert (row_after.state, row_after.failures) == (JobState.CANCELLED, 0)


async def test_a_published_video_lists_its_outputs_and_plays_through_hls_js(
    coordinator: RunningCoordinator, start_runner: StartRunner, clips: Clips, dashboard: Dashboard
) -> None:
    runner = await start_runner([await register_runner(coordinator.url, "edge-box-1")])
    await idle(runner)
    async with admin(coordinator.url) as http:
        video_uuid = await upload_ok(
            http,
            clips.upload,
            name="Sample clip",
            resolutions="144",
            hls="true",
            webVideo="true",
            splitAudio="true",
            storyboard="false",
        )
    page = await dashboard.sign_in(coordinator.url)
    row = page.locator(f'#videos tr[data-video="{video_uuid}"]')
    await expect(row.locator("td").first).to_have_text("Sample clip")
    await expect(row).to_have_attribute("data-state", "published", timeout=JOB_MS)
    await expect(row.locator("a.output")).to_have_text(["HLS", "180p MP4", "144p MP4"])
    await expect(row).to_contain_text("5 completed")

    # Filters: by state, by type, both.
    jobs = page.locator("#jobs tbody tr")
    await expect(jobs).to_have_count(5)
    await page.locator("#job-state").select_option(str(int(JobState.ERRORED)))
    await expect(jobs).to_have_count(0)
    await expect(page.locator("#jobs .empty")).to_be_visible()
    await page.locator("#job-state").select_option(str(int(JobState.COMPLETED)))
    await expect(jobs).to_have_count(5)
    await page.locator("#job-type").select_option(str(JobType.VOD_HLS))
    await expect(jobs).to_have_count(3)
    for job in await jobs.all():
        await expect(job.locator("td").first).to_have_text(str(JobType.VOD_HLS))
    await page.locator("#job-state").select_option("")
    await page.locator("#job-type").select_option("")
    await expect(jobs).to_have_count(5)

    # The master playlist (two renditions and the separated audio) plays through the vendored hls.js.
    await row.get_by_role("button", name="Play").click()
    video = page.locator("#player-video")
    await expect(video).to_have_attribute("data-engine", "hls.js")
    await expect(page.locator("#player-title")).to_have_text("Sample clip")
    await page.wait_for_function(
        "() => { const v = document.querySelector('#player-video');"
        " return v.readyState >= 2 && v.videoWidth > 0 && v.currentTime > 0.3; }",
        timeout=PAGE_MS,
    )
    size = await video.evaluate("v => [v.videoWidth, v.videoHeight]")
    assert tuple(size) in {(320, 180), (256, 144)}
    await expect(page.locator("#player-note")).to_have_text("HLS (hls.js)")

    if SCREENSHOT:
        await screenshot(coordinator, clips, page, Path(SCREENSHOT))


async def screenshot(running: RunningCoordinator, clips: Clips, page: Page, path: Path) -> None:
    """The page with a job running next to the published video, paused on a frame."""
    job_uuid = await seed_transcode(running, clips.long, name="Conference talk", resolution=LONG_RESOLUTION)
    await shown_progress_above(page, job_uuid, 5)
    # A still frame a second in (the clip has played to its end by now).
    await page.locator("#player-video").evaluate(
        "v => new Promise(done => { v.pause(); v.addEventListener('seeked', done, {once: true});"
        " v.currentTime = 1.2; })"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=path, full_page=True)


async def test_text_from_runners_and_uploads_is_shown_as_text_never_as_markup(
    coordinator: RunningCoordinator, dashboard: Dashboard
) -> None:
    """Runner names, video names and job errors come from others; none of them may become markup. A
    wrong token shows the refusal and nothing else; signing out forgets the token."""
    hostile = '<img src=x onerror="window.owned=1"><script>window.owned=2</script>'
    video_id, video_uuid = await create_video(coordinator, name=f"{hostile} video")
    job_uuid = str(uuidlib.uuid4())
    payload = {
        "input": {"videoFileUrl": input_url(job_uuid, video_uuid), "separatedAudioFileUrl": []},
        "output": {"resolution": 144, "fps": 25},
    }
    await coordinator.coordinator.jobs.create(
        video_id, [JobSpec(job_uuid, JobType.VOD_WEB_VIDEO, 100, payload, {"videoUUID": video_uuid})]
    )
    runner_token = (await register_runner(coordinator.url, f"{hostile} runner")).runner_token
    message = f"ffmpeg exited with code 1: {hostile}"
    async with httpx.AsyncClient(base_url=coordinator.url) as http:
        for _ in range(MAX_FAILURES):  # errors re-queue the job until the last one
            accepted = await http.post(
                f"/api/v1/runners/jobs/{job_uuid}/accept", json={"runnerToken": runner_token}
            )
            accepted.raise_for_status()
            failed = await http.post(
                f"/api/v1/runners/jobs/{job_uuid}/error",
                json={
                    "runnerToken": runner_token,
                    "jobToken": accepted.json()["job"]["jobToken"],
                    "message": message,
                },
            )
            failed.raise_for_status()

    page = await dashboard.sign_in(coordinator.url, token="tra-not-the-token")
    await expect(page.locator("#login-error")).to_contain_text("Invalid admin token")
    await expect(page.locator("#board")).to_be_hidden()
    assert await page.evaluate("sessionStorage.length") == 0
    assert dashboard.take_401s(), "the refused call shows in the console"

    await dashboard.sign_in(coordinator.url)
    row = page.locator(f'#jobs tr[data-job="{job_uuid}"]')
    await expect(row).to_have_attribute("data-state", str(int(JobState.ERRORED)))
    await expect(row.locator(".error-text")).to_have_text(message)
    await expect(row.locator("td").nth(3)).to_have_text(f"{hostile} runner")
    await expect(page.locator("#runners tbody strong")).to_have_text(f"{hostile} runner")
    await expect(page.locator(f'#videos tr[data-video="{video_uuid}"] strong')).to_have_text(
        f"{hostile} video"
    )
    assert await page.locator("#board img, #board script").count() == 0
    assert await page.evaluate("window.owned") is None

    await page.get_by_role("button", name="Sign out").click()
    await expect(page.locator("#login")).to_be_visible()
    await expect(page.locator("#board")).to_be_hidden()
    assert await page.evaluate("sessionStorage.length") == 0


@pytest.mark.parametrize("coordinator_config", [{"unclaimed_after_s": 1.0}], indirect=True)
async def test_a_job_no_connected_runner_takes_is_listed_above_the_jobs_and_badged(
    coordinator: RunningCoordinator, dashboard: Dashboard
) -> None:
    """No runner takes transcription here (none is connected): after the wait the job is unclaimed."""
    video_id, video_uuid = await create_video(coordinator, name="Keynote")
    job_uuid = str(uuidlib.uuid4())
    payload = {"input": {"videoFileUrl": input_url(job_uuid, video_uuid) + "/audio"}, "output": {}}
    await coordinator.coordinator.jobs.create(
        video_id, [JobSpec(job_uuid, JobType.TRANSCRIPTION, 200, payload, {"videoUUID": video_uuid})]
    )
    page = await dashboard.sign_in(coordinator.url)
    notice = page.locator("#unclaimed")
    await expect(notice).to_be_visible()
    await expect(page.locator("#unclaimed-count")).to_have_text("1")
    item = page.locator(f'#unclaimed-list li[data-job="{job_uuid}"]')
    await expect(item).to_contain_text("video-transcription of Keynote, unclaimed since")
    await expect(item).to_contain_text("it waits for a runner that takes this type")
    row = page.locator(f'#jobs tr[data-job="{job_uuid}"]')
    await expect(row.locator(".badge.unclaimed")).to_have_text("unclaimed")
    await expect(page.locator(f'#videos tr[data-video="{video_uuid}"] .attachment')).to_have_text(
        "captions unclaimed"
    )

    job = await coordinator.coordinator.jobs.get(job_uuid)
    assert job is not None
    await coordinator.coordinator.jobs.cancel(job)
    await expect(notice).to_be_hidden()
    await expect(row.locator(".badge.unclaimed")).to_have_count(0)


@pytest.mark.parametrize(
    "coordinator_config",
    [
        {
            "rtmp_port": None,
            "live_segment_duration_s": 1.0,
            "live_segment_list_size": 6,
            "live_reconnect_grace_s": 1.0,
        }
    ],
    indirect=True,
)
async def test_a_live_shows_its_state_and_urls_and_plays_while_it_runs(
    coordinator: RunningCoordinator, dashboard: Dashboard, tmp_path: Path
) -> None:
    """A live being streamed (real ffmpeg publishing, a protocol-level runner delivering its segments) is
    listed as live with its viewers' URL and the RTMP URL; the player plays it through hls.js; once the
    publisher is gone the row says ended."""
    from tests.support.live import LiveRunner, create_live, publishing, request_live_job, wait_for
    from tests.support.protocol import register_runner as register_protocol_runner

    async with httpx.AsyncClient(base_url=coordinator.url, timeout=10) as http:
        created = await create_live(http, "Evening show", resolutions="240")
        token = await register_protocol_runner(http, "live-box")
        live = created["live"]
        runner = LiveRunner(http, token, tmp_path / "runner")
        async with publishing(f"{live['rtmpUrl']}/{live['streamKey']}", 60) as publisher:
            await runner.accept((await request_live_job(http, token))["uuid"])
            running = asyncio.create_task(runner.run())

            async def three() -> bool:
                return len(runner.sent) >= 3

            await wait_for(three, 15, "three segments")
            page = await dashboard.sign_in(coordinator.url)
            row = page.locator(f'#videos tr[data-video="{created["video"]["uuid"]}"]')
            await expect(row).to_have_attribute("data-state", "live")
            await expect(row.locator("a.live-hls")).to_have_attribute("href", live["hlsUrl"])
            await expect(row.locator(".rtmp")).to_have_text(live["rtmpUrl"])
            await expect(row.locator(".live-facts")).to_contain_text("publisher connected")
            await row.get_by_role("button", name="Play").click()
            await expect(page.locator("#player-video")).to_have_attribute("data-engine", "hls.js")
            await expect(page.locator("#player-note")).to_have_text("live HLS (hls.js)")
            await page.wait_for_function(
                "() => { const v = document.querySelector('#player-video');"
                " return v.readyState >= 2 && v.videoWidth === 320 && v.currentTime > 1.0; }",
                timeout=PAGE_MS * 2,
            )
            publisher.kill()
            await asyncio.wait_for(running, 15)
        await expect(row).to_have_attribute("data-state", "ended", timeout=PAGE_MS)
