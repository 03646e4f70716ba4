"""The whole pipeline on loopback: an upload through the ingest API, our runner taking every job of its graph
(web videos, HLS ladder, separated audio) with the real ffmpeg, and outputs that play: probed, and HLS
playlists that parse and only reference files the coordinator serves."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
import pytest

from tests.coordinator.test_ingest_support import upload_ok, video_json
from tests.e2e.conftest import (
    JobChanges,
    Media,
    Runner,
    StartRunner,
    admin,
    coordinator_files_clean,
    daemon_cache,
    daemon_env,
    ffmpeg_pids_in,
    idle,
    register,
    register_daemon,
    start_daemon,
    stop_daemon,
)
from tests.support.servers import RunningCoordinator
from tuberunner.media.probe import MediaInfo, probe
from tuberunner.protocol.jobs import JobState, JobType
from tuberunner.runner.state import read_state

# The upload is 320x180: the ladder asked for is 144p, plus the input's own 180p (PeerTube's "always
# transcode the original resolution") and the separated audio rendition (0).
LADDER = {180: (320, 180), 144: (256, 144)}
FPS = 25.0
DURATION_TOLERANCE_S = 0.2
ATTRIBUTE = re.compile(r'([A-Z0-9-]+)=("[^"]*"|[^,]*)')


def attributes(line: str) -> dict[str, str]:
    return {key: value.strip('"') for key, value in ATTRIBUTE.findall(line.split(":", 1)[1])}


@dataclass
class MediaPlaylist:
    url: str
    map_uri: str
    segments: list[tuple[float, int, int]]  # duration, length, offset (of one file, by byte range)
    file_uri: str

    @property
    def duration_s(self) -> float:
        return sum(duration for duration, _, _ in self.segments)


def parse_media_playlist(url: str, text: str) -> MediaPlaylist:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    assert lines[0] == "#EXTM3U"
    assert "#EXT-X-ENDLIST" in lines
    assert any(line == "#EXT-X-PLAYLIST-TYPE:VOD" for line in lines)
    (map_line,) = [line for line in lines if line.startswith("#EXT-X-MAP:")]
    map_uri = attributes(map_line)["URI"]
    segments: list[tuple[float, int, int]] = []
    uris = set()
    duration: float | None = None
    byterange: tuple[int, int] | None = None
    for line in lines:
        if line.startswith("#EXTINF:"):
            duration = float(line[len("#EXTINF:") :].split(",")[0])
        elif line.startswith("#EXT-X-BYTERANGE:"):
            length, offset = line[len("#EXT-X-BYTERANGE:") :].split("@")
            byterange = (int(length), int(offset))
        elif not line.startswith("#"):
            assert duration is not None, f"segment {line} without EXTINF"
            assert byterange is not None, f"segment {line} without EXT-X-BYTERANGE"
            segments.append((duration, *byterange))
            uris.add(line)
            duration, byterange = None, None
    assert segments
    assert uris == {map_uri}, "a single-file rendition: every segment is a byte range of the MAP's file"
    return MediaPlaylist(url, map_uri, segments, urljoin(url, map_uri))


async def fetch_to(http: httpx.AsyncClient, url: str, dest: Path) -> Path:
    response = await http.get(url)
    assert response.status_code == 200, f"{url}: {response.status_code}"
    dest.write_bytes(response.content)
    return dest


def assert_duration(info: MediaInfo, expected_s: float) -> None:
    assert abs(info.duration_s - expected_s) <= DURATION_TOLERANCE_S, (info.path.name, info.duration_s)


def assert_video(info: MediaInfo, resolution: int) -> None:
    assert info.video is not None
    assert info.video.codec == "h264"
    assert (info.video.width, info.video.height) == LADDER[resolution]
    assert info.video.fps == pytest.approx(FPS, abs=0.01)
    assert info.video.pix_fmt == "yuv420p"


@pytest.mark.parametrize(
    "database_url", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
async def test_an_upload_goes_through_the_whole_job_graph_and_its_outputs_play(
    coordinator: RunningCoordinator, start_runner: StartRunner, media: Media, tmp_path: Path
) -> None:
    instance = await register(coordinator.url, "pipeline")
    runner = await start_runner([instance])
    await idle(runner)
    source = await probe(media.upload)
    async with admin(coordinator.url) as http:
        video_uuid = await upload_ok(
            http,
            media.upload,
            resolutions="144",
            hls="true",
            webVideo="true",
            splitAudio="true",
            storyboard="false",
        )
        listed = (await video_json(http, video_uuid))["jobs"]["list"]
        # web 180 (parent) → HLS 180 (video only) → HLS audio; web 144 → HLS 144.
        assert sorted((j["type"], j["resolution"]) for j in listed) == [
            ("vod-hls-transcoding", 0),
            ("vod-hls-transcoding", 144),
            ("vod-hls-transcoding", 180),
            ("vod-web-video-transcoding", 144),
            ("vod-web-video-transcoding", 180),
        ]
        job_uuids = [j["uuid"] for j in listed]
        await runner.wait_for(lambda: all(runner.finished(u)() for u in job_uuids))
        video = await video_json(http, video_uuid)

        # Every job completed once, by one run of our runner, without an error.
        assert video["state"] == "published", video["errors"]
        for job in video["jobs"]["list"]:
            assert (job["state"]["id"], job["failures"], job["error"]) == (JobState.COMPLETED, 0, None)
            assert runner.outcomes(job["uuid"]) == ["succeeded"]
        runner.assert_idle_and_clean()
        coordinator_files_clean(coordinator.config)
        # Encoded once: the parent made the 144p rung too; web 144, HLS 144 and HLS 180 reused the kept files.
        encodes = runner.supervisor.encodes
        assert encodes is not None
        assert encodes.stats.reused == 3

        # Web videos: H.264 + AAC at each resolution, same duration as the upload.
        outputs = video["outputs"]
        assert [w["resolution"] for w in outputs["webVideos"]] == [180, 144]
        for web in outputs["webVideos"]:
            resolution = web["resolution"]
            info = await probe(await fetch_to(http, web["url"], tmp_path / f"web-{resolution}.mp4"))
            assert_video(info, resolution)
            assert info.audio is not None
            assert info.audio.codec == "aac"
            assert info.format_name.startswith("mov,mp4")
            assert_duration(info, source.duration_s)

        # HLS: the master names an audio group and one variant per resolution; each media playlist is
        # a single fragmented MP4 addressed by byte ranges that exist in the served file.
        hls = outputs["hls"]
        master_url = hls["masterPlaylistUrl"]
        master = (await http.get(master_url)).text.splitlines()
        assert master[0] == "#EXTM3U"
        (audio_line,) = [line for line in master if line.startswith("#EXT-X-MEDIA:")]
        audio = attributes(audio_line)
        assert (audio["TYPE"], audio["GROUP-ID"], audio["DEFAULT"]) == ("AUDIO", "audio", "YES")
        variants = {}
        for index, line in enumerate(master):
            if line.startswith("#EXT-X-STREAM-INF:"):
                variant = attributes(line)
                assert variant["AUDIO"] == "audio"
                assert variant["CODECS"].startswith("avc1.")
                assert "mp4a.40.2" in variant["CODECS"]
                assert float(variant["FRAME-RATE"]) == pytest.approx(FPS)
                variants[variant["RESOLUTION"]] = urljoin(master_url, master[index + 1])
        assert set(variants) == {f"{w}x{h}" for w, h in LADDER.values()}

        renditions = {resolution: variants[f"{w}x{h}"] for resolution, (w, h) in LADDER.items()}
        renditions[0] = urljoin(master_url, audio["URI"])
        for resolution, url in sorted(renditions.items()):
            response = await http.get(url)
            assert response.status_code == 200
            playlist = parse_media_playlist(url, response.text)
            assert abs(playlist.duration_s - source.duration_s) <= DURATION_TOLERANCE_S
            path = await fetch_to(http, playlist.file_uri, tmp_path / f"hls-{resolution}.mp4")
            size = path.stat().st_size
            ends = [offset + length for _, length, offset in playlist.segments]
            assert max(ends) <= size
            # Byte ranges follow each other without a gap.
            offsets = [offset for _, _, offset in playlist.segments]
            assert offsets == sorted(offsets)
            assert all(end == nxt for end, nxt in zip(ends, offsets[1:], strict=False))
            info = await probe(path)
            assert_duration(info, source.duration_s)
            if resolution == 0:
                assert info.video is None
                assert info.audio is not None
                assert info.audio.codec == "aac"
            else:
                assert_video(info, resolution)
                assert info.audio is None  # the audio is the separate rendition


@pytest.mark.slow
async def test_the_daemon_registered_by_the_cli_publishes_a_video_and_stops_clean_on_sigterm(
    coordinator: RunningCoordinator, media: Media, tmp_path: Path
) -> None:
    env = daemon_env(tmp_path / "home")
    cache_dir = daemon_cache(env)
    changes = JobChanges(coordinator)
    await register_daemon(env, coordinator.url, "daemon")
    async with admin(coordinator.url) as http:
        # Created before the daemon starts: its start-up check finds the job, no ping needed.
        video_uuid = await upload_ok(
            http,
            media.upload,
            resolutions="144",
            hls="true",
            webVideo="true",
            splitAudio="true",
            storyboard="false",
        )
        log_path = tmp_path / "daemon.log"
        daemon = await start_daemon(env, log_path)
        try:

            async def published() -> bool:
                return (await video_json(http, video_uuid))["state"] != "processing"

            await changes.until(published)
            video = await video_json(http, video_uuid)
            assert video["state"] == "published", (video["errors"], log_path.read_text()[-3000:])
            assert video["jobs"]["byState"] == {"completed": 5}
            assert all(job["failures"] == 0 for job in video["jobs"]["list"])
        finally:
            code = await stop_daemon(daemon)
    assert code == 0, log_path.read_text()[-3000:]
    assert ffmpeg_pids_in(tmp_path) == []
    assert list((cache_dir / "jobs").iterdir()) == []
    assert sorted(p.name for p in cache_dir.rglob("*.part")) == []
    state = read_state(cache_dir / "state.json")
    assert state is not None
    assert state.jobs == []
    (instance,) = state.instances
    assert (instance.runner_name, instance.registration) == ("daemon", "registered")


async def test_a_storyboard_job_makes_a_sprite_sheet_of_the_payloads_grid(
    coordinator: RunningCoordinator, start_runner: StartRunner, media: Media, tmp_path: Path
) -> None:
    instance = await register(coordinator.url, "storyboard")
    runner = await start_runner([instance])
    await idle(runner)
    async with admin(coordinator.url) as http:
        video_uuid = await upload_ok(
            http, media.upload, resolutions="144", hls="false", webVideo="true", storyboard="true"
        )
        listed = (await video_json(http, video_uuid))["jobs"]["list"]
        (storyboard_job,) = [j for j in listed if j["type"] == "generate-video-storyboard"]
        job_uuids = [j["uuid"] for j in listed]
        await runner.wait_for(lambda: all(runner.finished(u)() for u in job_uuids))
        video = await video_json(http, video_uuid)
        assert video["state"] == "published", video["errors"]
        assert runner.outcomes(storyboard_job["uuid"]) == ["succeeded"]
        runner.assert_idle_and_clean()

        (storyboard,) = video["outputs"]["storyboards"]
        sprites = storyboard["sprites"]
        path = await fetch_to(http, storyboard["url"], tmp_path / "storyboard.jpg")
    # One sprite per `duration` seconds of the 5 s upload, laid out on the payload's grid.
    assert sprites["count"]["width"] * sprites["count"]["height"] >= 5 // sprites["duration"]
    info = await probe(path)
    assert info.video is not None
    assert (info.video.width, info.video.height) == (
        sprites["size"]["width"] * sprites["count"]["width"],
        sprites["size"]["height"] * sprites["count"]["height"],
    )


async def test_in_a_mixed_fleet_rung_jobs_run_anywhere_and_the_video_publishes(
    coordinator: RunningCoordinator, start_runner: StartRunner, media: Media, tmp_path: Path
) -> None:
    """One runner takes the web videos and keeps the ladder's rungs; another, that keeps nothing (as an
    official runner), takes the HLS jobs and makes them from the max-quality file itself."""
    web_runner = await start_runner(
        [await register(coordinator.url, "web")], enabled_job_types=frozenset({JobType.VOD_WEB_VIDEO})
    )
    hls_runner = await start_runner(
        [await register(coordinator.url, "hls")],
        enabled_job_types=frozenset({JobType.VOD_HLS}),
        keep_encodes=False,
    )
    await idle(web_runner)
    await idle(hls_runner)
    async with admin(coordinator.url) as http:
        video_uuid = await upload_ok(
            http,
            media.upload,
            resolutions="144",
            hls="true",
            webVideo="true",
            splitAudio="true",
            storyboard="false",
        )
        listed = (await video_json(http, video_uuid))["jobs"]["list"]
        await web_runner.wait_for(finished_all(web_runner, listed, JobType.VOD_WEB_VIDEO))
        await hls_runner.wait_for(finished_all(hls_runner, listed, JobType.VOD_HLS))
        video = await video_json(http, video_uuid)
    assert video["state"] == "published", video["errors"]
    encodes = web_runner.supervisor.encodes
    assert encodes is not None
    assert encodes.stats.reused == 1  # web 144 took its rung; the HLS jobs ran on the other runner
    hls_jobs = [j for j in video["jobs"]["list"] if j["type"] == "vod-hls-transcoding"]
    assert len(hls_jobs) == 3
    for job in hls_jobs:
        assert hls_runner.outcomes(job["uuid"]) == ["succeeded"]
    for rendition in video["outputs"]["hls"]["renditions"]:
        info = await probe(await fetch_to_new(rendition["videoUrl"], tmp_path, coordinator.url))
        if rendition["resolution"]:
            assert_video(info, rendition["resolution"])


async def fetch_to_new(url: str, folder: Path, base: str) -> Path:
    async with admin(base) as http:
        return await fetch_to(http, url, folder / url.rsplit("/", 1)[-1])


def finished_all(runner: Runner, listed: list[dict[str, Any]], job_type: JobType) -> Callable[[], bool]:
    uuids = [job["uuid"] for job in listed if job["type"] == job_type]
    return lambda: all(runner.finished(uuid)() for uuid in uuids)
