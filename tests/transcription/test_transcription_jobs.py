"""`video-transcription` through the real coordinator and our runner: an upload asking for a transcription
gets a WebVTT caption served with the video; an input without audio errors with the official message; a
job cancelled mid-transcription stops the decoder at once, frees its slot and leaves no file; a runner
without a usable engine does not ask for transcription jobs."""

from __future__ import annotations

import re
import time
import uuid as uuidlib
from dataclasses import replace
from pathlib import Path

import pytest

from tests.coordinator.test_ingest_support import upload_ok, video_json
from tests.e2e.conftest import E2E, admin, coordinator_files_clean, idle, job_row, register
from tests.support.protocol import create_video, input_url
from tests.support.servers import RunningCoordinator
from tests.transcription.conftest import (
    Clips,
    StartTranscriptionRunner,
    no_transcribe_thread_left,
    transcribe_threads,
)
from tuberunner.coordinator.models import JobSpec
from tuberunner.protocol.jobs import JobState, JobType
from tuberunner.runner.job import ProcessingSettings
from tuberunner.runner.processors import runner_processors
from tuberunner.runner.processors.transcription import NO_AUDIO_MESSAGE
from tuberunner.runner.supervisor import CancelReason, Supervisor
from tuberunner.transcription import parse_vtt

LANGUAGE = re.compile(r"^[a-z]{2,3}$")


async def seed_transcription(running: RunningCoordinator, source: Path, language: str | None = None) -> str:
    """A pending `video-transcription` job on a new video whose source is `source` (with `language`, the
    payload names the language to transcribe in: a Tuberunner extension)."""
    video_id, video_uuid = await create_video(running, source=source.read_bytes(), resolution=36)
    job_uuid = str(uuidlib.uuid4())
    payload: dict[str, object] = {"input": {"videoFileUrl": input_url(job_uuid, video_uuid)}, "output": {}}
    if language is not None:
        payload["language"] = language
    await running.coordinator.jobs.create(
        video_id, [JobSpec(job_uuid, JobType.TRANSCRIPTION, 200, payload, {"videoUUID": video_uuid})]
    )
    return job_uuid


async def test_an_upload_with_transcription_gets_a_webvtt_caption_served_with_the_video(
    coordinator: RunningCoordinator, start_runner: StartTranscriptionRunner, clips: Clips
) -> None:
    runner = await start_runner([await register(coordinator.url, "transcriber")])
    assert JobType.TRANSCRIPTION in runner.supervisor.job_types()
    await idle(runner)
    async with admin(coordinator.url) as http:
        video_uuid = await upload_ok(
            http, clips.tone, hls="false", webVideo="true", transcription="true", storyboard="false"
        )
        listed = (await video_json(http, video_uuid))["jobs"]["list"]
        assert sorted(j["type"] for j in listed) == ["video-transcription", "vod-web-video-transcoding"]
        await runner.wait_for(lambda: all(runner.finished(j["uuid"])() for j in listed))
        video = await video_json(http, video_uuid)
        assert video["state"] == "published", video["errors"]
        for job in video["jobs"]["list"]:
            assert (job["state"]["id"], job["failures"], job["error"]) == (JobState.COMPLETED, 0, None)
            assert runner.outcomes(job["uuid"]) == ["succeeded"]
        (caption,) = video["outputs"]["captions"]
        assert LANGUAGE.match(caption["language"]), caption
        answer = await http.get(caption["url"])
    assert answer.status_code == 200
    cues = parse_vtt(answer.text)
    assert cues, "20 s of audio through the tiny model gives cues"
    assert [c.start_s for c in cues] == sorted(c.start_s for c in cues)
    assert all(0 <= c.start_s < c.end_s <= 20.001 for c in cues)
    runner.assert_idle_and_clean()
    assert no_transcribe_thread_left()
    coordinator_files_clean(coordinator.config)


async def test_a_job_naming_a_language_is_transcribed_in_it_and_the_caption_named_after_it(
    coordinator: RunningCoordinator, start_runner: StartTranscriptionRunner, clips: Clips
) -> None:
    runner = await start_runner([await register(coordinator.url, "in-french")])
    job_uuid = await seed_transcription(coordinator, clips.tone, language="fr")
    await runner.wait_for(runner.finished(job_uuid))
    assert runner.outcomes(job_uuid) == ["succeeded"]
    row = await job_row(coordinator, job_uuid)
    assert row is not None
    async with admin(coordinator.url) as http:
        video = await video_json(http, row.video_id)
        (caption,) = video["outputs"]["captions"]
        assert caption["language"] == "fr"
        assert caption["url"].endswith("-fr.vtt")
        answer = await http.get(caption["url"])
    parse_vtt(answer.text)
    runner.assert_idle_and_clean()


async def test_an_input_without_audio_is_errored_with_the_official_message(
    coordinator: RunningCoordinator, start_runner: StartTranscriptionRunner, clips: Clips
) -> None:
    runner = await start_runner([await register(coordinator.url, "no-audio")])
    job_uuid = await seed_transcription(coordinator, clips.silent_video)
    await runner.wait_for(runner.finished(job_uuid))
    (run,) = [r for r in runner.supervisor.finished if r.job.uuid == job_uuid][:1]
    assert run.failure == NO_AUDIO_MESSAGE
    row = await job_row(coordinator, job_uuid)
    assert row is not None
    assert row.failures >= 1  # reported as an error (the coordinator gives it to a runner again)


async def test_a_job_cancelled_mid_transcription_stops_the_decoder_at_once_and_frees_its_slot(
    coordinator: RunningCoordinator,
    start_runner: StartTranscriptionRunner,
    clips: Clips,
    record_property: pytest.RecordProperty,
) -> None:
    runner = await start_runner([await register(coordinator.url, "cancelled-transcription")])
    job_uuid = await seed_transcription(coordinator, clips.long_tone)
    # Progress > 0 stored by the coordinator: segments are being decoded.
    run = await runner.running(job_uuid)
    assert [t.is_alive() for t in transcribe_threads()] == [True]
    async with admin(coordinator.url) as http:
        cancelled_at = time.monotonic()
        answer = await http.post(f"/api/v1/runners/jobs/{job_uuid}/cancel")
    assert answer.status_code == 204
    await runner.wait_for(runner.finished(job_uuid))
    stop_s = time.monotonic() - cancelled_at
    record_property("cancel_to_slot_free_s", round(stop_s, 3))
    print(f"cancel → transcription stopped, slot free: {stop_s:.3f} s")
    # The job's end waits for the decoder's thread: it is gone, and nothing else of the job is left.
    assert no_transcribe_thread_left(timeout_s=0.5)
    assert run.cancel_reason is CancelReason.GONE
    (outcome,) = runner.outcomes(job_uuid)
    assert outcome.startswith(f"cancelled: {CancelReason.GONE.value}")
    runner.assert_idle_and_clean()
    row = await job_row(coordinator, job_uuid)
    assert row is not None
    assert (row.state, row.failures) == (JobState.CANCELLED, 0)
    # What is left after the cancel is the window being decoded (a fraction of a second with this model),
    # far from the 20 s or more that the 180 s of audio take.
    assert stop_s < 5.0
    assert (row.progress or 0) < 50


async def test_one_transcription_at_a_time_by_default_the_second_offer_is_left_to_others(
    tiny_model: Path,
) -> None:
    config = replace(E2E, transcription_model_path=str(tiny_model))
    processors = runner_processors(config)
    assert processors.transcription is not None
    payload = {"input": {"videoFileUrl": "http://example.invalid/x"}, "output": {}}
    assert processors.supports(JobType.TRANSCRIPTION, payload) is None
    processors.transcription.running = 1  # as while one job decodes
    reason = processors.supports(JobType.TRANSCRIPTION, payload)
    assert reason is not None
    assert "transcription.concurrency = 1" in reason
    # Other types are not held back.
    web = {"input": {"videoFileUrl": "u"}, "output": {"resolution": 144, "fps": 25}}
    assert processors.supports(JobType.VOD_WEB_VIDEO, web) is None


def test_without_a_usable_engine_the_runner_does_not_ask_for_transcription(tmp_path: Path) -> None:
    missing = replace(E2E, transcription_model_path=str(tmp_path / "no-such-model"))
    assert JobType.TRANSCRIPTION not in runner_processors(missing).table
    cli = replace(E2E, transcription_engine="whisper-ctranslate2", transcription_engine_path="/nonexistent")
    assert JobType.TRANSCRIPTION not in runner_processors(cli).table
    # Asked for explicitly: the supervisor refuses to start, naming the type.
    explicit = replace(cli, enabled_job_types=frozenset({JobType.TRANSCRIPTION}))
    processors = runner_processors(explicit)
    with pytest.raises(ValueError, match="video-transcription"):
        Supervisor(
            explicit,
            work_dir=tmp_path / "jobs",
            processors=processors.table,
            supports=processors.supports,
            settings=ProcessingSettings(ffmpeg=Path("/bin/false")),
        )
