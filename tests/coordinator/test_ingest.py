"""Ingest API against a real coordinator (SQLite and PostgreSQL) with real ffmpeg-made clips."""

from __future__ import annotations

import dataclasses
import uuid as uuidlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.coordinator.test_ingest_support import (
    ADMIN,
    RUNNERS,
    Clips,
    make_clips,
    register,
    upload,
    upload_ok,
    video_json,
)
from tests.support.protocol import video_folder
from tests.support.servers import RunningCoordinator, serve_coordinator
from tuberunner.coordinator.config import CoordinatorConfig
from tuberunner.protocol.jobs import JobState

# Checks that do not depend on the database run on SQLite only (the suite must stay fast).
sqlite_only = pytest.mark.parametrize("database_url", [None], ids=["sqlite"])


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Clips:
    return make_clips(tmp_path_factory.mktemp("clips"))


@pytest.fixture
async def client(coordinator: RunningCoordinator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=coordinator.url, timeout=30) as client:
        yield client


def leftovers(config: CoordinatorConfig) -> list[Path]:
    """Everything an upload may have left on disk: temp bodies and video folders."""
    found = list(config.uploads_dir.glob("*"))
    videos = config.files_dir / "videos"
    if videos.exists():
        found += list(videos.glob("*"))
    return found


async def test_upload_is_probed_stored_and_gets_its_job_graph(
    coordinator: RunningCoordinator, client: httpx.AsyncClient, clips: Clips
) -> None:
    video_uuid = await upload_ok(
        client, clips.video, name="Test pattern", resolutions="240,144", splitAudio="true", transcription="fr"
    )

    video = await video_json(client, video_uuid)
    assert video["uuid"] == video_uuid
    assert video["name"] == "Test pattern"
    assert video["state"] == "processing"
    assert video["source"]["video"]["width"] == 320
    assert video["source"]["audio"]["codec"] == "aac"
    assert video["source"]["filename"] == "clip.mp4"
    assert video["options"]["transcriptionLanguage"] == "fr"
    jobs = video["jobs"]
    assert jobs["total"] == 7
    assert jobs["byState"] == {"pending": 1, "waiting_for_parent_job": 6}
    shape = sorted((j["type"], j["resolution"], j["fps"]) for j in jobs["list"])
    assert shape == [
        ("generate-video-storyboard", None, None),
        ("video-transcription", None, None),
        ("vod-hls-transcoding", 0, 0),
        ("vod-hls-transcoding", 144, 25),
        ("vod-hls-transcoding", 240, 25),
        ("vod-web-video-transcoding", 144, 25),
        ("vod-web-video-transcoding", 240, 25),
    ]
    # same answer by numeric id
    assert (await video_json(client, video["id"]))["uuid"] == video_uuid

    # the source is stored under the video's folder, recorded as `source`
    c = coordinator.coordinator
    files = await c.videos.files(video["id"])
    assert [(f.kind, f.name, f.resolution, f.fps) for f in files] == [("source", "source.mp4", 240, 25)]
    stored = c.config.files_dir / files[0].path
    assert stored.parent == video_folder(c, video_uuid)
    assert stored.read_bytes() == clips.video.read_bytes()
    assert list(coordinator.config.uploads_dir.glob("*")) == []

    # runners see the parent with absolute input URLs, and download the source through them
    runner_token = await register(client, coordinator)
    available = (await client.post(f"{RUNNERS}/jobs/request", json={"runnerToken": runner_token})).json()
    [offered] = available["availableJobs"]
    assert offered["type"] == "vod-web-video-transcoding"
    url = offered["payload"]["input"]["videoFileUrl"]
    assert url == f"{coordinator.url}{RUNNERS}/jobs/{offered['uuid']}/files/videos/{video_uuid}/max-quality"
    job = (
        await client.post(f"{RUNNERS}/jobs/{offered['uuid']}/accept", json={"runnerToken": runner_token})
    ).json()
    download = await client.post(url, json={"runnerToken": runner_token, "jobToken": job["job"]["jobToken"]})
    assert download.status_code == 200
    assert download.content == clips.video.read_bytes()


@sqlite_only
async def test_defaults_come_from_the_configuration(client: httpx.AsyncClient, clips: Clips) -> None:
    video = await video_json(client, await upload_ok(client, clips.short))
    assert video["name"] == "short"
    assert video["options"] == {
        "resolutions": [1080, 720, 480, 360, 240, 144],
        "hls": True,
        "webVideo": True,
        "splitAudio": True,
        "transcription": False,
        "transcriptionLanguage": None,
        "storyboard": True,
    }
    # 240p input: web 240 + HLS 240 + HLS audio, web 144 + HLS 144; 2 s is too short for a storyboard
    assert video["jobs"]["total"] == 5


async def test_a_file_that_is_not_media_is_refused_and_nothing_is_kept(
    coordinator: RunningCoordinator, client: httpx.AsyncClient, clips: Clips
) -> None:
    response = await upload(client, clips.text)

    assert response.status_code == 400
    problem = response.json()
    assert problem["detail"].startswith("videofile is not a usable video or audio file: ")
    assert "not a video or audio file" in problem["detail"]
    listing = (await client.get("/api/v1/videos", headers=ADMIN)).json()
    assert listing == {"total": 0, "data": []}
    assert leftovers(coordinator.config) == []


@sqlite_only
async def test_a_still_image_is_not_a_video(
    coordinator: RunningCoordinator, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    from tests.coordinator.test_ingest_support import ffmpeg

    image = tmp_path / "frame.png"
    await ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=1", "-frames:v", "1", str(image))
    response = await upload(client, image)
    assert response.status_code == 400
    assert "still image" in response.json()["detail"]
    assert leftovers(coordinator.config) == []


@sqlite_only
async def test_bad_options_are_named(client: httpx.AsyncClient, clips: Clips) -> None:
    response = await upload(client, clips.short, resolutions="720,abc", hls="maybe", transcription="??")
    assert response.status_code == 400
    assert set(response.json()["invalid-params"]) == {"resolutions", "hls", "transcription"}

    response = await upload(client, clips.short, hls="false", webVideo="false")
    assert response.status_code == 400
    assert set(response.json()["invalid-params"]) == {"hls", "webVideo"}

    response = await client.post("/api/v1/videos", data={"name": "no file"}, headers=ADMIN)
    assert response.status_code == 400
    assert response.json()["detail"] == "Incorrect request parameters: videofile"


@sqlite_only
async def test_admin_token_is_required(client: httpx.AsyncClient, clips: Clips) -> None:
    response = await client.post("/api/v1/videos", files={"videofile": ("a.mp4", clips.short.read_bytes())})
    assert response.status_code == 401
    assert (await client.get("/api/v1/videos")).status_code == 401
    bad = {"Authorization": "Bearer nope"}
    assert (await client.get(f"/api/v1/videos/{uuidlib.uuid4()}", headers=bad)).status_code == 401
    assert (await client.delete(f"/api/v1/videos/{uuidlib.uuid4()}", headers=bad)).status_code == 401


@sqlite_only
async def test_oversized_upload_is_refused_with_413_and_leaves_no_temp_file(
    coordinator_config: CoordinatorConfig, clips: Clips
) -> None:
    config = dataclasses.replace(coordinator_config, max_upload_bytes=20_000)
    boundary = "tuberunner-test-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="videofile"; filename="big.mp4"\r\n'
        "Content-Type: video/mp4\r\n\r\n"
    ).encode()
    body = head + clips.short.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    assert len(body) > 20_000
    headers = {**ADMIN, "Content-Type": f"multipart/form-data; boundary={boundary}"}

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096]

    async with (
        serve_coordinator(config) as running,
        httpx.AsyncClient(base_url=running.url, timeout=30) as client,
    ):
        # declared length: refused before reading; streamed (chunked): refused once the limit is crossed
        declared = await upload(client, clips.short)
        streamed = await client.post("/api/v1/videos", content=chunks(), headers=headers)
        listing = (await client.get("/api/v1/videos", headers=ADMIN)).json()

    assert declared.status_code == 413
    assert streamed.status_code == 413
    assert "larger than 20000 bytes" in streamed.json()["detail"]
    assert listing["total"] == 0
    assert leftovers(config) == []


async def test_audio_upload_gets_a_preview_and_an_audio_merge_parent(
    coordinator: RunningCoordinator, client: httpx.AsyncClient, clips: Clips
) -> None:
    video_uuid = await upload_ok(client, clips.audio, resolutions="480,240", splitAudio="false")

    video = await video_json(client, video_uuid)
    assert video["source"]["audioOnly"] is True
    parent = next(j for j in video["jobs"]["list"] if j["parentUuid"] is None)
    assert (parent["type"], parent["resolution"], parent["fps"]) == ("vod-audio-merge-transcoding", 480, 25)
    assert sorted((j["type"], j["resolution"]) for j in video["jobs"]["list"] if j["parentUuid"]) == [
        ("vod-hls-transcoding", 240),
        ("vod-hls-transcoding", 480),
        ("vod-web-video-transcoding", 240),
    ]
    preview_url = video["outputs"]["previewUrl"]
    assert preview_url == f"{coordinator.url}/static/previews/{video_uuid}/preview.jpg"
    preview = await client.get(preview_url)
    assert preview.status_code == 200
    assert preview.headers["content-type"] == "image/jpeg"
    assert preview.content[:2] == b"\xff\xd8"

    # the merge job downloads the audio and that still
    runner_token = await register(client, coordinator)
    offered = (await client.post(f"{RUNNERS}/jobs/request", json={"runnerToken": runner_token})).json()
    job_uuid = offered["availableJobs"][0]["uuid"]
    job = (await client.post(f"{RUNNERS}/jobs/{job_uuid}/accept", json={"runnerToken": runner_token})).json()
    tokens = {"runnerToken": runner_token, "jobToken": job["job"]["jobToken"]}
    audio = await client.post(job["job"]["payload"]["input"]["audioFileUrl"], json=tokens)
    still = await client.post(job["job"]["payload"]["input"]["previewFileUrl"], json=tokens)
    assert audio.content == clips.audio.read_bytes()
    assert still.content == preview.content


async def test_list_paginates_newest_first(client: httpx.AsyncClient, clips: Clips) -> None:
    first = await upload_ok(client, clips.short, name="first", hls="false")
    second = await upload_ok(client, clips.short, name="second", hls="false")

    listing = (await client.get("/api/v1/videos", headers=ADMIN)).json()
    assert listing["total"] == 2
    assert [v["uuid"] for v in listing["data"]] == [second, first]
    assert listing["data"][0]["jobs"] == {"total": 2, "byState": {"pending": 1, "waiting_for_parent_job": 1}}
    page = (await client.get("/api/v1/videos?start=1&count=1&sort=createdAt", headers=ADMIN)).json()
    assert [v["uuid"] for v in page["data"]] == [second]
    bad = await client.get("/api/v1/videos?count=1000&sort=name&start=²", headers=ADMIN)
    assert bad.status_code == 400
    assert set(bad.json()["invalid-params"]) == {"start", "count", "sort"}


async def test_delete_removes_jobs_rows_and_files(
    coordinator: RunningCoordinator, client: httpx.AsyncClient, clips: Clips
) -> None:
    video_uuid = await upload_ok(client, clips.short, resolutions="240")
    video = await video_json(client, video_uuid)
    runner_token = await register(client, coordinator)
    offered = (await client.post(f"{RUNNERS}/jobs/request", json={"runnerToken": runner_token})).json()
    job_uuid = offered["availableJobs"][0]["uuid"]
    job = (await client.post(f"{RUNNERS}/jobs/{job_uuid}/accept", json={"runnerToken": runner_token})).json()

    response = await client.delete(f"/api/v1/videos/{video_uuid}", headers=ADMIN)

    assert response.status_code == 204
    assert (await client.get(f"/api/v1/videos/{video_uuid}", headers=ADMIN)).status_code == 404
    assert (await client.delete(f"/api/v1/videos/{video_uuid}", headers=ADMIN)).status_code == 404
    c = coordinator.coordinator
    for listed in video["jobs"]["list"]:
        assert await c.jobs.get(listed["uuid"]) is None
    assert not video_folder(c, video_uuid).exists()
    # the runner that held the parent learns it is gone
    update = await client.post(
        f"{RUNNERS}/jobs/{job_uuid}/update",
        json={"runnerToken": runner_token, "jobToken": job["job"]["jobToken"]},
    )
    assert update.status_code == 404
    offered = (await client.post(f"{RUNNERS}/jobs/request", json={"runnerToken": runner_token})).json()
    assert offered["availableJobs"] == []


@sqlite_only
async def test_unknown_videos_are_404(client: httpx.AsyncClient) -> None:
    for ident in (str(uuidlib.uuid4()), "12345", "not-an-id", "99999999999999999999"):
        response = await client.get(f"/api/v1/videos/{ident}", headers=ADMIN)
        assert response.status_code == 404, ident
        assert response.json()["detail"] == "Video not found"


@sqlite_only
async def test_static_files_never_leave_their_kind_and_folder(
    coordinator: RunningCoordinator, client: httpx.AsyncClient, clips: Clips
) -> None:
    video_uuid = await upload_ok(client, clips.audio, resolutions="240")
    folder = video_folder(coordinator.coordinator, video_uuid)
    assert (folder / "source.m4a").is_file()
    (folder.parent / "secret.txt").write_text("secret")
    good = f"/static/previews/{video_uuid}/preview.jpg"
    full = await client.get(good)
    assert full.status_code == 200
    assert full.headers["access-control-allow-origin"] == "*"
    head = await client.head(good)
    assert head.status_code == 200
    assert head.headers["content-length"] == str(len(full.content))
    assert head.content == b""

    attempts = [
        f"/static/previews/{video_uuid}/source.m4a",  # a real file of the video, but not a preview
        f"/static/streaming-playlists/hls/{video_uuid}/preview.jpg",  # a real file of another kind
        f"/static/previews/{video_uuid}/..%2Fsecret.txt",
        f"/static/previews/{video_uuid}/%2E%2E",
        f"/static/previews/..%2F{video_uuid}/preview.jpg",
        f"/static/previews/{video_uuid.upper()}/preview.jpg",
        "/static/previews/../../coordinator.sqlite3",
        f"/static/web-videos/{video_uuid}-240.mp4",  # not made yet
        f"/static/web-videos/..%2F{video_uuid}-240.mp4",
        f"/static/captions/{uuidlib.uuid4()}/x.vtt",
    ]
    for path in attempts:
        response = await client.get(path)
        assert response.status_code in (400, 404), path
        assert b"secret" not in response.content


async def test_cancelled_jobs_make_a_cancelled_video(
    coordinator: RunningCoordinator, client: httpx.AsyncClient, clips: Clips
) -> None:
    video_uuid = await upload_ok(client, clips.short, resolutions="240,144", hls="false")
    video = await video_json(client, video_uuid)
    parent = next(j for j in video["jobs"]["list"] if j["parentUuid"] is None)
    job = await coordinator.coordinator.jobs.get(parent["uuid"])
    assert job is not None
    await coordinator.coordinator.jobs.cancel(job)

    video = await video_json(client, video_uuid)
    assert video["state"] == "cancelled"
    assert video["jobs"]["byState"] == {"cancelled": 1, "parent_cancelled": 1}
    assert {j["state"]["id"] for j in video["jobs"]["list"]} == {
        JobState.CANCELLED,
        JobState.PARENT_CANCELLED,
    }


@sqlite_only
async def test_a_video_whose_root_job_was_deleted_is_cancelled_not_published(
    client: httpx.AsyncClient, clips: Clips
) -> None:
    video_uuid = await upload_ok(client, clips.short, resolutions="240,144", hls="false")
    video = await video_json(client, video_uuid)
    parent = next(j for j in video["jobs"]["list"] if j["parentUuid"] is None)
    # The admin API, as an operator (or PeerTube tooling) would: the children go with the root.
    response = await client.delete(f"{RUNNERS}/jobs/{parent['uuid']}", headers=ADMIN)
    assert response.status_code == 204, response.text

    video = await video_json(client, video_uuid)
    assert video["jobs"]["total"] == 0
    assert video["outputs"]["webVideos"] == []
    assert video["state"] == "cancelled"


@sqlite_only
async def test_an_uploaded_preview_is_kept_and_checked(
    coordinator: RunningCoordinator, client: httpx.AsyncClient, clips: Clips, tmp_path: Path
) -> None:
    from tests.coordinator.test_ingest_support import ffmpeg

    still = tmp_path / "cover.PNG"
    await ffmpeg("-f", "lavfi", "-i", "color=c=red:size=64x48:rate=1", "-frames:v", "1", str(still))
    audio = {"videofile": ("tone.m4a", clips.audio.read_bytes(), "audio/mp4")}

    response = await client.post(
        "/api/v1/videos",
        files={**audio, "previewfile": ("cover.PNG", still.read_bytes(), "image/png")},
        headers=ADMIN,
    )
    assert response.status_code == 200, response.text
    video = await video_json(client, response.json()["video"]["uuid"])
    assert video["outputs"]["previewUrl"].endswith("/preview.png")
    assert (await client.get(video["outputs"]["previewUrl"])).content == still.read_bytes()

    response = await client.post(
        "/api/v1/videos",
        files={**audio, "previewfile": ("x.jpg", b"not an image", "image/jpeg")},
        headers=ADMIN,
    )
    assert response.status_code == 400
    assert response.json()["detail"].startswith("previewfile is not a usable video or audio file")
    assert (await client.get("/api/v1/videos", headers=ADMIN)).json()["total"] == 1
    assert list(coordinator.config.uploads_dir.glob("*")) == []
