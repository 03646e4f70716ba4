"""Every video is published whatever runners are connected: only web videos and HLS hold a video back.

The official runner 0.0.21 predates storyboards: on our coordinator it completed every transcoding job and
the video waited forever for its `generate-video-storyboard` job. Reproduced twice here, with a short
unclaimed wait (`unclaimed_after_s`): our runner with only the VOD transcoding types enabled (it declares
them with `jobTypes`, as 8.x runners do), and a protocol-level client that behaves as 0.0.21 (no
`jobTypes`, takes the first job it supports). The video is published as soon as its transcoding is done;
the storyboard is made by the coordinator itself once no runner has taken it for the wait; the captions
(which only a runner can make) stay pending and are shown as unclaimed by `coordinator status`, `/metrics`
and a warning in the log.
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.coordinator.test_ingest_support import upload_ok, video_json
from tests.e2e.conftest import (
    JobChanges,
    Media,
    StartRunner,
    admin,
    coordinator_files_clean,
    daemon_env,
    idle,
    register,
    run_cli,
)
from tests.ops.conftest import metrics_of, value
from tests.support.servers import ADMIN_TOKEN, RunningCoordinator
from tuberunner.coordinator.builtin_storyboards import OWN_RUNNER_NAME
from tuberunner.media.probe import probe
from tuberunner.protocol.jobs import JobState, JobType

UNCLAIMED_AFTER_S = 1.0
VOD_TYPES = frozenset({JobType.VOD_WEB_VIDEO, JobType.VOD_HLS, JobType.VOD_AUDIO_MERGE})
SHORT_WAIT = pytest.mark.parametrize(
    "coordinator_config", [{"unclaimed_after_s": UNCLAIMED_AFTER_S}], indirect=True
)


def attachment(video: dict[str, Any], kind: str) -> dict[str, Any]:
    (found,) = [a for a in video["attachments"] if a["kind"] == kind]
    return found


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


async def storyboard_made_by_the_coordinator(
    http: httpx.AsyncClient, video: dict[str, Any], tmp: Path
) -> None:
    """The storyboard job completed, held by the coordinator's own runner; its sprite sheet is served."""
    (job,) = [j for j in video["jobs"]["list"] if j["type"] == JobType.STORYBOARD]
    assert (job["state"]["id"], job["failures"], job["error"]) == (JobState.COMPLETED, 0, None)
    listed = (await http.get("/api/v1/runners/jobs", params={"search": job["uuid"]})).json()["data"]
    assert listed[0]["runner"]["name"] == OWN_RUNNER_NAME
    (storyboard,) = video["outputs"]["storyboards"]
    sheet = tmp / "storyboard.jpg"
    sheet.write_bytes((await http.get(storyboard["url"])).content)
    info = await probe(sheet)
    assert info.video is not None
    assert (
        info.video.width == storyboard["sprites"]["size"]["width"] * storyboard["sprites"]["count"]["width"]
    )


@SHORT_WAIT
async def test_a_runner_taking_only_transcoding_publishes_the_video_and_the_coordinator_makes_its_storyboard(
    coordinator: RunningCoordinator,
    start_runner: StartRunner,
    media: Media,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    runner = await start_runner([await register(coordinator.url, "vod-only")], enabled_job_types=VOD_TYPES)
    await idle(runner)
    changes = JobChanges(coordinator)
    caplog.set_level(logging.WARNING, logger="tuberunner.coordinator.claims")
    async with admin(coordinator.url) as http:
        video_uuid = await upload_ok(
            http, media.upload, resolutions="144", hls="false", storyboard="true", transcription="true"
        )

        async def published_with_storyboard() -> bool:
            video = await video_json(http, video_uuid)
            return video["state"] != "processing" and attachment(video, "storyboard")["state"] != "pending"

        await changes.until(published_with_storyboard)
        video = await video_json(http, video_uuid)
        assert video["state"] == "published", video["errors"]
        transcoded = [j for j in video["jobs"]["list"] if j["type"] == JobType.VOD_WEB_VIDEO]
        assert [runner.outcomes(j["uuid"]) for j in transcoded] == [["succeeded"], ["succeeded"]]
        assert attachment(video, "storyboard")["state"] == "done"
        await storyboard_made_by_the_coordinator(http, video, tmp_path)
        (storyboard_job,) = [j for j in video["jobs"]["list"] if j["type"] == JobType.STORYBOARD]
        (parent,) = [j for j in transcoded if j["parentUuid"] is None]
        # Made once its wait was over: pending since its parent completed, taken by no runner for 1 s.
        assert epoch(storyboard_job["startedAt"]) - epoch(parent["finishedAt"]) >= UNCLAIMED_AFTER_S

        # The captions: no runner takes transcription and the coordinator cannot make them. The video
        # does not wait for them; they are shown as unclaimed, in the video and coordinator-wide.
        captions = attachment(video, "captions")
        assert captions["state"] == "pending"
        assert captions["unclaimedSince"] is not None
        (transcription,) = [j for j in video["jobs"]["list"] if j["type"] == JobType.TRANSCRIPTION]
        assert transcription["unclaimedSince"] == captions["unclaimedSince"]
        unclaimed = (await http.get("/api/v1/runners/jobs/unclaimed")).json()
        assert unclaimed["total"] == 1
        assert unclaimed["data"][0]["uuid"] == transcription["uuid"]
        assert (unclaimed["data"][0]["videoUUID"], unclaimed["data"][0]["fallback"]) == (video_uuid, None)

    samples = await metrics_of(coordinator.url)
    unclaimed_gauge = "tuberunner_coordinator_unclaimed_jobs"
    assert value(samples, unclaimed_gauge, job_type=JobType.TRANSCRIPTION) == 1
    assert value(samples, unclaimed_gauge, job_type=JobType.STORYBOARD) == 0
    assert value(samples, "tuberunner_coordinator_builtin_storyboards_total") == 1

    warnings = [r.getMessage() for r in caplog.records if r.name == "tuberunner.coordinator.claims"]
    (about_captions,) = [w for w in warnings if transcription["uuid"] in w]
    assert "no connected runner has taken video-transcription jobs" in about_captions
    assert "the video is published without them" in about_captions
    assert any(storyboard_job["uuid"] in w and "makes this storyboard itself" in w for w in warnings)

    env = daemon_env(tmp_path / "cli", TUBERUNNER_ADMIN_TOKEN=ADMIN_TOKEN)
    status = await run_cli(env, "coordinator", "status", "--url", coordinator.url)
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[0] == "1 pending job(s) no connected runner takes:"
    assert f"video-transcription {transcription['uuid']} (video {video_uuid})" in status.stdout
    assert "waits for a runner" in status.stdout
    of_video = await run_cli(env, "coordinator", "status", video_uuid, "--url", coordinator.url)
    assert of_video.returncode == 0, of_video.stderr
    assert "published" in of_video.stdout.splitlines()[0]
    assert "storyboard: done" in of_video.stdout
    assert "captions: pending (unclaimed: no connected runner has taken its job type since" in of_video.stdout
    runner.assert_idle_and_clean()
    coordinator_files_clean(coordinator.config)


class OfficialRunner0021:
    """The protocol behaviour of the official runner 0.0.21 (notes §2.2): `jobs/request` without
    `jobTypes`, the first offered job of a type it supports, one job at a time, and a check after every
    job. It uploads the input it downloaded as its result: the coordinator probes it and keeps it."""

    TAKES = frozenset({JobType.VOD_WEB_VIDEO, JobType.VOD_HLS, JobType.VOD_AUDIO_MERGE})

    def __init__(self, http: httpx.AsyncClient, token: str) -> None:
        self.http = http
        self.token = token
        self.accepted: list[str] = []

    async def check(self) -> bool:
        """One check: take the first supported job and do it; False when none was offered."""
        offered = await self.http.post("/api/v1/runners/jobs/request", json={"runnerToken": self.token})
        supported = [j for j in offered.json()["availableJobs"] if j["type"] in self.TAKES]
        if not supported:
            return False
        answer = await self.http.post(
            f"/api/v1/runners/jobs/{supported[0]['uuid']}/accept", json={"runnerToken": self.token}
        )
        assert answer.status_code == 200, answer.text
        job = answer.json()["job"]
        self.accepted.append(job["uuid"])
        tokens = {"runnerToken": self.token, "jobToken": job["jobToken"]}
        source = await self.http.post(job["payload"]["input"]["videoFileUrl"], json=tokens)
        assert source.status_code == 200
        done = await self.http.post(
            f"/api/v1/runners/jobs/{job['uuid']}/success",
            data=tokens,
            files={"payload[videoFile]": ("output.mp4", source.content, "video/mp4")},
        )
        assert done.status_code == 204, done.text
        return True


@SHORT_WAIT
async def test_a_runner_sending_no_job_types_passes_over_the_storyboard_and_the_video_still_publishes(
    coordinator: RunningCoordinator, media: Media, tmp_path: Path
) -> None:
    token = (await register(coordinator.url, "official-0.0.21")).runner_token
    async with admin(coordinator.url) as http:
        video_uuid = await upload_ok(http, media.upload, resolutions="144", hls="false", storyboard="true")
        official = OfficialRunner0021(http, token)
        while await official.check():
            pass
        video = await video_json(http, video_uuid)
        assert video["state"] == "published", video["errors"]
        assert len(official.accepted) == 2  # both web videos; it never took the storyboard

        # It was offered the storyboard first and took the lower web video instead: it passed it over.
        auth = await coordinator.coordinator.runners.by_token(token)
        assert auth is not None
        assert not coordinator.coordinator.claims.may_take(auth.runner.id, JobType.STORYBOARD)

        async def storyboard_done() -> bool:
            return attachment(await video_json(http, video_uuid), "storyboard")["state"] != "pending"

        await JobChanges(coordinator).until(storyboard_done)
        video = await video_json(http, video_uuid)
        await storyboard_made_by_the_coordinator(http, video, tmp_path)
        jobs = {j["type"]: j for j in video["jobs"]["list"] if j["parentUuid"] is None}
        (storyboard_job,) = [j for j in video["jobs"]["list"] if j["type"] == JobType.STORYBOARD]
        # Pending since its parent completed, then taken by no runner for the whole wait.
        parent = jobs[JobType.VOD_WEB_VIDEO]
        assert epoch(storyboard_job["startedAt"]) - epoch(parent["finishedAt"]) >= UNCLAIMED_AFTER_S
    coordinator_files_clean(coordinator.config)
