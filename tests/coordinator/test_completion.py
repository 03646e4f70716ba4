"""Completion of real results posted through the runner API: outputs, master playlist, idempotency,
corrupt results. Real coordinator on loopback, real ffmpeg on tiny clips."""

from __future__ import annotations

import dataclasses
import shutil
import uuid as uuidlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.coordinator.test_ingest_support import (
    ADMIN,
    RUNNERS,
    Clips,
    accept_next,
    make_clips,
    register,
    run_all_jobs,
    upload_ok,
    video_json,
)
from tests.support.protocol import results_folder, video_folder
from tests.support.servers import RunningCoordinator
from tuberunner.coordinator.models import JobResult
from tuberunner.protocol.jobs import JobState, JobType

sqlite_only = pytest.mark.parametrize("database_url", [None], ids=["sqlite"])


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Clips:
    return make_clips(tmp_path_factory.mktemp("clips"))


@pytest.fixture
async def client(coordinator: RunningCoordinator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=coordinator.url, timeout=60) as client:
        yield client


def parse_master(text: str) -> tuple[list[dict[str, str]], list[tuple[dict[str, str], str]]]:
    """(EXT-X-MEDIA attribute sets, [(EXT-X-STREAM-INF attributes, URI)])."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    assert lines[0] == "#EXTM3U"
    media: list[dict[str, str]] = []
    variants: list[tuple[dict[str, str], str]] = []
    for index, line in enumerate(lines):
        if line.startswith("#EXT-X-MEDIA:"):
            media.append(attributes(line))
        elif line.startswith("#EXT-X-STREAM-INF:"):
            uri = lines[index + 1]
            assert not uri.startswith("#")
            variants.append((attributes(line), uri))
    return media, variants


def attributes(line: str) -> dict[str, str]:
    found: dict[str, str] = {}
    rest = line.split(":", 1)[1]
    while rest:
        key, _, rest = rest.partition("=")
        if rest.startswith('"'):
            value, _, rest = rest[1:].partition('"')
            rest = rest.removeprefix(",")
        else:
            value, _, rest = rest.partition(",")
        found[key] = value
    return found


async def get_ok(client: httpx.AsyncClient, url: str, **headers: str) -> httpx.Response:
    response = await client.get(url, headers=headers)
    assert response.status_code in (200, 206), f"{url}: {response.status_code} {response.text[:200]}"
    return response


async def test_results_become_served_outputs(
    coordinator: RunningCoordinator, client: httpx.AsyncClient, clips: Clips, tmp_path: Path
) -> None:
    video_uuid = await upload_ok(
        client, clips.video, resolutions="240,144", splitAudio="true", transcription="true", storyboard="true"
    )
    runner_token = await register(client, coordinator)

    finished = await run_all_jobs(client, runner_token, tmp_path)

    assert len(finished) == 7
    video = await video_json(client, video_uuid)
    assert video["state"] == "published", video["errors"]
    assert video["jobs"]["byState"] == {"completed": 7}
    outputs = video["outputs"]
    base = coordinator.url

    # web videos, served with Range support
    assert [(w["resolution"], w["fps"]) for w in outputs["webVideos"]] == [(240, 25), (144, 25)]
    web = outputs["webVideos"][0]
    assert web["url"] == f"{base}/static/web-videos/{video_uuid}-240.mp4"
    full = await get_ok(client, web["url"])
    assert full.headers["content-type"] == "video/mp4"
    assert full.headers["accept-ranges"] == "bytes"
    assert len(full.content) == web["size"]
    part = await get_ok(client, web["url"], Range="bytes=100-199")
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes 100-199/{web['size']}"
    assert part.content == full.content[100:200]

    # HLS: the master lists both video renditions with the separated audio as a group
    hls = outputs["hls"]
    assert hls["masterPlaylistUrl"] == f"{base}/static/streaming-playlists/hls/{video_uuid}/master.m3u8"
    assert sorted(r["resolution"] for r in hls["renditions"]) == [0, 144, 240]
    master = await get_ok(client, hls["masterPlaylistUrl"])
    assert master.headers["content-type"].startswith("application/vnd.apple.mpegurl")
    media, variants = parse_master(master.text)
    [audio] = media
    assert audio["TYPE"] == "AUDIO"
    assert audio["URI"] == f"{video_uuid}-0.m3u8"
    assert [v[1] for v in variants] == [f"{video_uuid}-240.m3u8", f"{video_uuid}-144.m3u8"]
    for attrs, _ in variants:
        assert attrs["AUDIO"] == audio["GROUP-ID"]
        assert attrs["CODECS"].startswith("avc1.")
        assert "mp4a.40.2" in attrs["CODECS"]
        assert int(attrs["BANDWIDTH"]) >= int(attrs["AVERAGE-BANDWIDTH"]) > 0
        assert attrs["FRAME-RATE"] == "25.000"
    assert variants[0][0]["RESOLUTION"] == "320x240"
    assert variants[1][0]["RESOLUTION"] == "192x144"

    folder_url = hls["masterPlaylistUrl"].rsplit("/", 1)[0]
    for playlist_name in [audio["URI"], *(uri for _, uri in variants)]:
        playlist = (await get_ok(client, f"{folder_url}/{playlist_name}")).text
        resolution = playlist_name.rsplit("-", 1)[1].removesuffix(".m3u8")
        fragmented = f"{video_uuid}-{resolution}-fragmented.mp4"
        uris = [line for line in playlist.splitlines() if line and not line.startswith("#")]
        assert uris
        assert set(uris) == {fragmented}
        map_line = next(line for line in playlist.splitlines() if line.startswith("#EXT-X-MAP:"))
        map_attrs = attributes(map_line)
        assert map_attrs["URI"] == fragmented
        length, offset = (int(n) for n in map_attrs["BYTERANGE"].split("@"))
        init = await get_ok(
            client, f"{folder_url}/{fragmented}", Range=f"bytes={offset}-{offset + length - 1}"
        )
        assert init.status_code == 206
        assert init.content[4:8] == b"ftyp"

    # caption (language from the runner) and storyboard
    [caption] = outputs["captions"]
    assert caption["language"] == "en"
    assert (await get_ok(client, caption["url"])).text.startswith("WEBVTT")
    [storyboard] = outputs["storyboards"]
    assert storyboard["sprites"]["count"] == {"width": 3, "height": 1}
    assert (await get_ok(client, storyboard["url"])).content[:2] == b"\xff\xd8"

    # results were moved, not copied; inputs now resolve to the outputs
    c = coordinator.coordinator
    assert not any(results_folder(c, job["uuid"]).exists() for job in finished)
    audio_input = await c.videos.input_file(video["id"], "audio")
    assert audio_input is not None
    assert (audio_input.kind, audio_input.resolution) == ("hls-video", 0)


@sqlite_only
async def test_completion_runs_again_without_harm(
    coordinator: RunningCoordinator, client: httpx.AsyncClient, clips: Clips, tmp_path: Path
) -> None:
    video_uuid = await upload_ok(
        client, clips.short, resolutions="240", splitAudio="false", storyboard="false"
    )
    finished = await run_all_jobs(client, runner_token=await register(client, coordinator), work=tmp_path)
    assert [j["type"] for j in finished] == ["vod-web-video-transcoding", "vod-hls-transcoding"]
    c = coordinator.coordinator
    video = await c.videos.by_uuid(video_uuid)
    assert video is not None

    async def snapshot() -> list[tuple[Any, ...]]:
        files = await c.videos.files(video.id)
        return sorted(
            (
                f.kind,
                f.name,
                f.resolution,
                f.fps,
                f.size_bytes,
                str(f.extra),
                (c.config.files_dir / f.path).read_bytes(),
            )
            for f in files
        )

    before = await snapshot()
    assert [row[0] for row in before] == ["hls-master", "hls-playlist", "hls-video", "source", "web-video"]
    for finished_job in finished:
        job = await c.jobs.get(finished_job["uuid"])
        assert job is not None
        assert job.result is not None
        # The job's results folder is gone: every file is found at its destination.
        await c.completer(job, JobResult.from_json(job.result))
        await c.completer(job, JobResult.from_json(job.result))
    assert await snapshot() == before

    # A crash between the two moves of an HLS completion: the fragmented MP4 is in place, the playlist
    # still waits in the results folder with the runner's file names.
    hls_job = await c.jobs.get(finished[1]["uuid"])
    assert hls_job is not None
    folder = video_folder(c, video_uuid)
    playlist = folder / f"{video_uuid}-240.m3u8"
    pending = results_folder(c, hls_job.uuid) / "retry" / "resolutionPlaylistFile.m3u8"
    pending.parent.mkdir(parents=True)
    pending.write_text(playlist.read_text().replace(f"{video_uuid}-240-fragmented.mp4", "/tmp/x/out.mp4"))
    playlist.unlink()
    result = JobResult(
        files={
            "videoFile": pending.parent.relative_to(c.config.files_dir).as_posix() + "/videoFile.mp4",
            "resolutionPlaylistFile": pending.relative_to(c.config.files_dir).as_posix(),
        },
        fields={},
    )
    await c.completer(hls_job, result)
    assert not pending.exists()
    assert await snapshot() == before


async def test_a_corrupt_result_errors_the_job_and_its_children(
    coordinator: RunningCoordinator, client: httpx.AsyncClient, clips: Clips
) -> None:
    video_uuid = await upload_ok(client, clips.short, resolutions="240,144")
    runner_token = await register(client, coordinator)
    job = await accept_next(client, runner_token)
    assert job is not None
    assert job["type"] == "vod-web-video-transcoding"

    response = await client.post(
        f"{RUNNERS}/jobs/{job['uuid']}/success",
        data={"runnerToken": runner_token, "jobToken": job["jobToken"]},
        files={"payload[videoFile]": ("out.mp4", b"\x00\x00\x00\x18ftypmp42 truncated garbage", "video/mp4")},
    )

    assert response.status_code == 204  # the runner did its part; the coordinator keeps the verdict
    video = await video_json(client, video_uuid)
    assert video["state"] == "failed"
    parent = next(j for j in video["jobs"]["list"] if j["uuid"] == job["uuid"])
    assert parent["state"]["id"] == JobState.ERRORED
    assert parent["error"].startswith("Completion failed: ")
    assert "not a video or audio file" in parent["error"]
    children = [j for j in video["jobs"]["list"] if j["uuid"] != job["uuid"]]
    assert len(children) == 4
    assert {j["state"]["id"] for j in children} == {JobState.PARENT_ERRORED}
    assert video["errors"] == [{"job": job["uuid"], "type": job["type"], "message": parent["error"]}]
    assert video["error"] == parent["error"]
    assert video["outputs"]["webVideos"] == []
    offered = await client.post(f"{RUNNERS}/jobs/request", json={"runnerToken": runner_token})
    assert offered.json()["availableJobs"] == []
    assert not results_folder(coordinator.coordinator, job["uuid"]).exists()


@sqlite_only
async def test_a_bad_playlist_errors_the_hls_job(
    coordinator: RunningCoordinator, client: httpx.AsyncClient, clips: Clips, tmp_path: Path
) -> None:
    video_uuid = await upload_ok(client, clips.short, resolutions="240", splitAudio="false")
    runner_token = await register(client, coordinator)

    async def produce(job: dict[str, Any], inputs: dict[str, Path], work: Path) -> Any:
        from tests.coordinator.test_ingest_support import produce_outputs

        parts, fields = await produce_outputs(job, inputs, work)
        if job["type"] == "vod-hls-transcoding":
            parts["payload[resolutionPlaylistFile]"] = (
                "out.m3u8",
                b"<html>not a playlist</html>",
                "text/html",
            )
        return parts, fields

    await run_all_jobs(client, runner_token, tmp_path, produce)

    video = await video_json(client, video_uuid)
    assert video["state"] == "failed"
    [error] = video["errors"]
    assert error["type"] == "vod-hls-transcoding"
    assert "not an HLS playlist" in error["message"]
    assert video["outputs"]["hls"] is None  # nothing of the failed rendition was kept
    folder = video_folder(coordinator.coordinator, video_uuid)
    assert {p.name for p in folder.iterdir()} == {"source.mp4", f"{video_uuid}-240.mp4"}


@sqlite_only
async def test_hls_only_drops_web_videos_once_every_rendition_exists(
    coordinator: RunningCoordinator, client: httpx.AsyncClient, clips: Clips, tmp_path: Path
) -> None:
    video_uuid = await upload_ok(
        client, clips.short, resolutions="240,144", webVideo="false", storyboard="false"
    )
    video = await video_json(client, video_uuid)
    assert sorted((j["type"], j["resolution"]) for j in video["jobs"]["list"]) == [
        ("vod-hls-transcoding", 0),
        ("vod-hls-transcoding", 144),
        ("vod-hls-transcoding", 240),
        ("vod-web-video-transcoding", 240),  # PeerTube's optimize parent, dropped at the end
    ]

    await run_all_jobs(client, await register(client, coordinator), tmp_path)

    video = await video_json(client, video_uuid)
    assert video["state"] == "published"
    assert video["outputs"]["webVideos"] == []
    assert sorted(r["resolution"] for r in video["outputs"]["hls"]["renditions"]) == [0, 144, 240]
    assert not (video_folder(coordinator.coordinator, video_uuid) / f"{video_uuid}-240.mp4").exists()
    web = await client.get(f"{coordinator.url}/static/web-videos/{video_uuid}-240.mp4")
    assert web.status_code == 404


@sqlite_only
async def test_audio_upload_is_merged_with_its_still(
    coordinator: RunningCoordinator, client: httpx.AsyncClient, clips: Clips, tmp_path: Path
) -> None:
    video_uuid = await upload_ok(client, clips.audio, resolutions="480", hls="false")

    finished = await run_all_jobs(client, await register(client, coordinator), tmp_path)

    assert [j["type"] for j in finished] == ["vod-audio-merge-transcoding"]
    video = await video_json(client, video_uuid)
    assert video["state"] == "published"
    [web] = video["outputs"]["webVideos"]
    assert (web["resolution"], web["fps"]) == (480, 25)
    assert web["url"].endswith(f"/static/web-videos/{video_uuid}-480.mp4")


@sqlite_only
async def test_deleting_a_published_video_removes_its_outputs(
    coordinator: RunningCoordinator, client: httpx.AsyncClient, clips: Clips, tmp_path: Path
) -> None:
    video_uuid = await upload_ok(client, clips.short, resolutions="240", hls="false")
    await run_all_jobs(client, await register(client, coordinator), tmp_path)
    url = (await video_json(client, video_uuid))["outputs"]["webVideos"][0]["url"]
    assert (await client.get(url)).status_code == 200

    assert (await client.delete(f"/api/v1/videos/{video_uuid}", headers=ADMIN)).status_code == 204

    assert (await client.get(url)).status_code == 404
    assert not video_folder(coordinator.coordinator, video_uuid).exists()
    shutil.rmtree(tmp_path, ignore_errors=True)


@sqlite_only
async def test_a_studio_result_becomes_the_new_source(
    coordinator: RunningCoordinator, client: httpx.AsyncClient, clips: Clips
) -> None:
    video_uuid = await upload_ok(client, clips.short, resolutions="240", hls="false")
    c = coordinator.coordinator
    video = await video_json(client, video_uuid)
    parent = await c.jobs.get(video["jobs"]["list"][0]["uuid"])
    assert parent is not None
    studio = dataclasses.replace(
        parent, uuid=str(uuidlib.uuid4()), type=JobType.STUDIO, payload={"tasks": []}
    )
    edited = results_folder(c, studio.uuid) / "n" / "videoFile.mp4"
    edited.parent.mkdir(parents=True)
    shutil.copyfile(clips.video, edited)
    result = JobResult(files={"videoFile": edited.relative_to(c.config.files_dir).as_posix()}, fields={})

    await c.completer(studio, result)
    await c.completer(studio, result)

    sources = [f for f in await c.videos.files(video["id"]) if f.kind == "source"]
    assert [(f.name, f.resolution, f.fps) for f in sources] == [(f"source-studio-{studio.uuid}.mp4", 240, 25)]
    assert (c.config.files_dir / sources[0].path).read_bytes() == clips.video.read_bytes()
    assert not (video_folder(c, video_uuid) / "source.mp4").exists()
