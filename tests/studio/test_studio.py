"""Studio edits end to end: an upload with edits through the ingest API, our runner running the
`video-studio-transcoding` job (every task kind, real ffmpeg), the edited video re-transcoded by the jobs its
completion creates, and the served web video checked: duration, dimensions and streams by probing, the
watermark by the pixels of its corner (frames decoded with PyAV)."""

from __future__ import annotations

import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest

from tests.e2e.conftest import (
    FaultProxy,
    JobChanges,
    StartRunner,
    admin,
    coordinator_files_clean,
    idle,
    proxy_to,
    register,
)
from tests.studio.conftest import MAIN_DURATION_S, MAIN_SIZE, WATERMARK_COLOR, StudioMedia
from tests.support.protocol import create_video, store_video_file
from tests.support.servers import RunningCoordinator
from tests.support.tcp_proxy import Plan
from tuberunner.coordinator.job_graph import PRIORITY_STUDIO, runner_file_url
from tuberunner.coordinator.models import JobSpec
from tuberunner.media.probe import MediaInfo, probe
from tuberunner.protocol.jobs import MAX_FAILURES, JobState, JobType

DURATION_TOLERANCE_S = 0.2
FPS = 25.0
# Any resolution above the 180p clip: the re-transcoding then makes the original resolution only.
ABOVE_THE_CLIP = "1080"
FINAL = frozenset({"published", "failed", "cancelled"})
# A download connection carrying this much is reset: more than the main clip, less than the heavy intro.
RESET_AFTER_BYTES = 600_000


@dataclass
class Edited:
    video: dict[str, Any]
    info: MediaInfo
    path: Path


async def video_of(http: httpx.AsyncClient, video_uuid: str) -> dict[str, Any]:
    answer = await http.get(f"/api/v1/videos/{video_uuid}")
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def submit(http: httpx.AsyncClient, media: StudioMedia, **edits: str | Path) -> str:
    fields = {k: v for k, v in edits.items() if isinstance(v, str)}
    files: dict[str, tuple[str, bytes, str]] = {
        "videofile": (media.main.name, media.main.read_bytes(), "video/mp4")
    }
    for name, path in edits.items():
        if isinstance(path, Path):
            files[name] = (path.name, path.read_bytes(), "application/octet-stream")
    answer = await http.post(
        "/api/v1/videos",
        data={"resolutions": ABOVE_THE_CLIP, "hls": "false", "storyboard": "false", **fields},
        files=files,
    )
    assert answer.status_code == 200, answer.text
    video_uuid: str = answer.json()["video"]["uuid"]
    return video_uuid


async def edit(
    coordinator: RunningCoordinator,
    start_runner: StartRunner,
    media: StudioMedia,
    tmp_path: Path,
    **edits: str | Path,
) -> Edited:
    """Submit the main clip with `edits`, let one runner do every job, fetch the edited web video."""
    runner = await start_runner([await register(coordinator.url, "studio")])
    await idle(runner)
    changes = JobChanges(coordinator)
    async with admin(coordinator.url) as http:
        video_uuid = await submit(http, media, **edits)
        # First the studio job alone, on the original, at PeerTube's studio priority.
        (studio,) = (await video_of(http, video_uuid))["jobs"]["list"]
        assert (studio["type"], studio["priority"]) == (JobType.STUDIO, PRIORITY_STUDIO)

        async def done() -> bool:
            return (await video_of(http, video_uuid))["state"] in FINAL

        await changes.until(done)
        video = await video_of(http, video_uuid)
        assert video["state"] == "published", video["errors"]
        jobs = video["jobs"]["list"]
        # Then the edited video's own job graph, its root waiting for the studio job.
        assert [(j["type"], j["parentUuid"]) for j in jobs] == [
            (JobType.STUDIO, None),
            (JobType.VOD_WEB_VIDEO, studio["uuid"]),
        ]
        for job in jobs:
            assert (job["state"]["id"], job["failures"], job["error"]) == (JobState.COMPLETED, 0, None)
        (web,) = video["outputs"]["webVideos"]
        answer = await http.get(web["url"])
        assert answer.status_code == 200
        path = tmp_path / "edited.mp4"
        path.write_bytes(answer.content)
    await runner.wait_for(lambda: all(runner.finished(j["uuid"])() for j in jobs))
    runner.assert_idle_and_clean()
    coordinator_files_clean(coordinator.config)
    # The task files were served for the edit and are gone with it; the original gave way to the edit.
    files = await coordinator.coordinator.videos.files(video["id"])
    assert [f.kind for f in files if f.kind in ("task-file", "source")] == ["source"]
    assert not any(p.name.startswith(("intro-", "outro-", "watermark-")) for p in path.parent.iterdir())
    return Edited(video, await probe(path), path)


def assert_layout(info: MediaInfo, duration_s: float) -> None:
    """The main clip's picture and frame rate, H.264 + AAC, lasting `duration_s`."""
    assert info.video is not None
    assert (info.video.width, info.video.height) == MAIN_SIZE
    assert info.video.codec == "h264"
    assert info.video.pix_fmt == "yuv420p"
    assert info.video.fps == pytest.approx(FPS, abs=0.01)
    assert info.audio is not None
    assert info.audio.codec == "aac"
    assert abs(info.duration_s - duration_s) <= DURATION_TOLERANCE_S, info.duration_s


def frame_at(path: Path, time_s: float) -> np.ndarray[Any, Any]:
    """The RGB picture shown at `time_s` (the first frame at or after it)."""
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            if frame.time is not None and frame.time >= time_s:
                picture: np.ndarray[Any, Any] = frame.to_ndarray(format="rgb24").astype(np.int16)
                return picture
    raise AssertionError(f"{path.name} has no frame at {time_s} s")


def watermark_box() -> tuple[slice, slice]:
    """Where PeerTube's ratios put a 2:1 watermark on the main clip: height 0.1 h, right and top margins
    0.05 h (inset by one pixel against scaling and chroma blur)."""
    width, height = MAIN_SIZE
    box_h = round(height * 0.1)
    box_w = box_h * 2
    right = width - round(height * 0.05)
    top = round(height * 0.05)
    return slice(top + 1, top + box_h - 1), slice(right - box_w + 1, right - 1)


def assert_watermarked(edited: Path, original: Path, *, at_s: float, original_at_s: float) -> None:
    rows, columns = watermark_box()
    ours, theirs = frame_at(edited, at_s), frame_at(original, original_at_s)
    corner = np.abs(ours[rows, columns] - theirs[rows, columns]).mean()
    # The same-sized box on the left: only re-encoding noise there.
    left = slice(columns.start - MAIN_SIZE[0] // 2, columns.stop - MAIN_SIZE[0] // 2)
    control = np.abs(ours[rows, left] - theirs[rows, left]).mean()
    assert control < 12, control
    assert corner > 60, corner
    magenta = np.array(WATERMARK_COLOR)
    assert np.abs(ours[rows, columns] - magenta).mean() < 40


async def test_a_cut_keeps_what_lies_between_start_and_end(
    coordinator: RunningCoordinator, start_runner: StartRunner, studio_media: StudioMedia, tmp_path: Path
) -> None:
    edited = await edit(coordinator, start_runner, studio_media, tmp_path, cutStart="0.5", cutEnd="2.25")
    assert_layout(edited.info, 2.25 - 0.5)
    assert edited.video["options"]["studio"]["cutStart"] == 0.5


async def test_an_intro_without_sound_comes_first_fitted_on_black(
    coordinator: RunningCoordinator, start_runner: StartRunner, studio_media: StudioMedia, tmp_path: Path
) -> None:
    intro = await probe(studio_media.intro)
    assert intro.audio is None
    edited = await edit(coordinator, start_runner, studio_media, tmp_path, introfile=studio_media.intro)
    assert_layout(edited.info, intro.duration_s + MAIN_DURATION_S)
    # The square intro is fitted into 320x180: black bars on its left and right.
    first = frame_at(edited.path, 0.0)
    assert first[:, :20].mean() < 20
    assert first[:, 150:170].mean() > 40


async def test_an_outro_with_sound_comes_last(
    coordinator: RunningCoordinator, start_runner: StartRunner, studio_media: StudioMedia, tmp_path: Path
) -> None:
    outro = await probe(studio_media.outro)
    edited = await edit(coordinator, start_runner, studio_media, tmp_path, outrofile=studio_media.outro)
    assert_layout(edited.info, MAIN_DURATION_S + outro.duration_s)
    # The beginning is still the main clip.
    start = np.abs(frame_at(edited.path, 0.0) - frame_at(studio_media.main, 0.0)).mean()
    assert start < 12, start


async def test_a_watermark_sits_in_the_top_right_corner(
    coordinator: RunningCoordinator, start_runner: StartRunner, studio_media: StudioMedia, tmp_path: Path
) -> None:
    edited = await edit(
        coordinator, start_runner, studio_media, tmp_path, watermarkfile=studio_media.watermark
    )
    assert_layout(edited.info, MAIN_DURATION_S)
    assert_watermarked(edited.path, studio_media.main, at_s=1.0, original_at_s=1.0)


async def test_every_task_kind_chained_in_order(
    coordinator: RunningCoordinator, start_runner: StartRunner, studio_media: StudioMedia, tmp_path: Path
) -> None:
    intro, outro = await probe(studio_media.intro), await probe(studio_media.outro)
    edited = await edit(
        coordinator,
        start_runner,
        studio_media,
        tmp_path,
        cutStart="1",
        cutEnd="2.5",
        introfile=studio_media.intro,
        outrofile=studio_media.outro,
        watermarkfile=studio_media.watermark,
    )
    # cut first (1.5 s of the main clip), then intro before it, outro after it, the watermark over all.
    assert_layout(edited.info, intro.duration_s + 1.5 + outro.duration_s)
    assert_watermarked(edited.path, studio_media.main, at_s=intro.duration_s + 0.5, original_at_s=1.5)
    rows, columns = watermark_box()
    assert np.abs(frame_at(edited.path, 0.2)[rows, columns] - np.array(WATERMARK_COLOR)).mean() < 40


async def test_bad_edits_are_refused_with_the_field_named(
    coordinator: RunningCoordinator, studio_media: StudioMedia
) -> None:
    cases: list[tuple[dict[str, str | Path], str]] = [
        ({"cutStart": "2", "cutEnd": "1"}, "cutEnd"),
        ({"cutStart": "-1"}, "cutStart"),
        ({"cutEnd": "60"}, "cutEnd"),
        ({"watermarkfile": studio_media.main.parent / "nothing.png"}, "watermarkfile"),
        ({"introfile": studio_media.watermark}, "introfile"),
    ]
    async with admin(coordinator.url) as http:
        for edits, field in cases:
            (studio_media.main.parent / "nothing.png").write_bytes(b"not an image")
            files = {"videofile": (studio_media.main.name, studio_media.main.read_bytes(), "video/mp4")}
            files |= {
                k: (v.name, v.read_bytes(), "image/png") for k, v in edits.items() if isinstance(v, Path)
            }
            answer = await http.post(
                "/api/v1/videos", data={k: v for k, v in edits.items() if isinstance(v, str)}, files=files
            )
            assert answer.status_code == 400, answer.text
            assert field in answer.json()["invalid-params"], answer.json()
        assert (await http.get("/api/v1/videos")).json()["total"] == 0
    coordinator_files_clean(coordinator.config)


async def test_a_task_file_download_cut_by_the_network_resumes(
    coordinator: RunningCoordinator, start_runner: StartRunner, studio_media: StudioMedia, tmp_path: Path
) -> None:
    assert studio_media.main.stat().st_size < RESET_AFTER_BYTES / 2 < studio_media.heavy_intro.stat().st_size
    async with proxy_to(coordinator.url) as proxy:
        # The first connection to carry this much downstream is reset (the ones open then too): the
        # heavy intro's download, whether it has a connection of its own or follows the main clip's.
        # Armed before the runner connects: a connection follows the plan it was opened with.
        proxy.once(Plan.reset_after(RESET_AFTER_BYTES))
        runner = await start_runner([await register(coordinator.url, "studio-faults", via=proxy.url)])
        await idle(runner)
        changes = JobChanges(coordinator)
        async with admin(coordinator.url) as http:
            video_uuid = await submit(http, studio_media, introfile=studio_media.heavy_intro)

            async def done() -> bool:
                return (await video_of(http, video_uuid))["state"] in FINAL

            await changes.until(done)
            video = await video_of(http, video_uuid)
        assert proxy.faulted.is_set()
        assert isinstance(proxy, FaultProxy)
    assert video["state"] == "published", video["errors"]
    studio = video["jobs"]["list"][0]
    assert studio["type"] == JobType.STUDIO
    # Resumed within the same run: no error reported, one run, and nothing left on either side.
    assert (studio["state"]["id"], studio["failures"]) == (JobState.COMPLETED, 0)
    assert runner.outcomes(studio["uuid"]) == ["succeeded"]
    await runner.wait_for(lambda: all(runner.finished(j["uuid"])() for j in video["jobs"]["list"]))
    runner.assert_idle_and_clean()
    coordinator_files_clean(coordinator.config)
    heavy = await probe(studio_media.heavy_intro)
    (web,) = video["outputs"]["webVideos"]
    async with admin(coordinator.url) as http:
        path = tmp_path / "edited.mp4"
        path.write_bytes((await http.get(web["url"])).content)
    assert_layout(await probe(path), heavy.duration_s + MAIN_DURATION_S)


async def test_a_task_file_that_is_not_media_fails_the_job_with_the_reason(
    coordinator: RunningCoordinator, start_runner: StartRunner, studio_media: StudioMedia
) -> None:
    runner = await start_runner([await register(coordinator.url, "studio-bad-file")])
    await idle(runner)
    c = coordinator.coordinator
    video_id, video_uuid = await create_video(
        coordinator, source=studio_media.main.read_bytes(), resolution=180
    )
    bad_bytes = b"these are not the frames you are looking for\n" * 100
    await store_video_file(c, video_id, video_uuid, "task-file", "intro-bad.mp4", bad_bytes)
    job_uuid = str(uuidlib.uuid4())
    payload = {
        "input": {
            "videoFileUrl": runner_file_url(job_uuid, video_uuid, "max-quality"),
            "separatedAudioFileUrl": [],
        },
        # The bad file comes first: each of the five runs fails before any ffmpeg.
        "tasks": [
            {
                "name": "add-intro",
                "options": {"file": runner_file_url(job_uuid, video_uuid, "studio/task-files/intro-bad.mp4")},
            },
            {"name": "cut", "options": {"start": 0.5}},
        ],
        "output": {},
    }
    changes = JobChanges(coordinator)
    await c.jobs.create(
        video_id, [JobSpec(job_uuid, JobType.STUDIO, PRIORITY_STUDIO, payload, {"videoUUID": video_uuid})]
    )

    async def errored() -> bool:
        row = await c.jobs.get(job_uuid)
        return row is not None and row.state == JobState.ERRORED

    await changes.until(errored)
    row = await c.jobs.get(job_uuid)
    assert row is not None
    assert row.failures == MAX_FAILURES
    assert row.error is not None
    assert row.error.startswith("Cannot read the intro file"), row.error
    # Every run reported the same reason; none left a file or a process behind.
    await runner.wait_for(runner.finished(job_uuid, MAX_FAILURES))
    assert {run.failure for run in runner.supervisor.finished if run.job.uuid == job_uuid} == {row.error}
    runner.assert_idle_and_clean()
    coordinator_files_clean(coordinator.config)
