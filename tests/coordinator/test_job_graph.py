"""The job graph of a new video (spec §6.5, §7): shapes, chains, priorities, fps rules."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tuberunner.coordinator.job_graph import (
    PRIORITY_OPTIONAL_TRANSCODING,
    PRIORITY_REQUIRED_TRANSCODING,
    PRIORITY_STORYBOARD,
    PRIORITY_TRANSCRIPTION,
    GraphOptions,
    build_job_graph,
    is_audio_upload,
)
from tuberunner.coordinator.models import JobSpec
from tuberunner.media.probe import AudioInfo, MediaInfo, VideoInfo
from tuberunner.protocol.jobs import JobType
from tuberunner.protocol.payloads import parse_payload

ALL = (144, 240, 360, 480, 720, 1080, 1440, 2160)
VIDEO_UUID = "0b9c6a3e-8d1b-4c7a-9f55-2d4c1e0f7a10"
WEB = JobType.VOD_WEB_VIDEO
HLS = JobType.VOD_HLS


def media(
    width: int = 1280,
    height: int = 720,
    fps: float = 30.0,
    *,
    audio: bool = True,
    video: bool = True,
    duration_s: float = 10.0,
    video_codec: str = "h264",
) -> MediaInfo:
    return MediaInfo(
        path=Path("/in.mp4"),
        format_name="mov,mp4,m4a,3gp,3g2,mj2",
        duration_s=duration_s,
        size_bytes=1000,
        bit_rate=1_000_000,
        video=VideoInfo(video_codec, "High", 31, width, height, fps, "yuv420p", None, 0) if video else None,
        audio=AudioInfo("aac", "LC", 48000, 2, "stereo", 128000) if audio else None,
    )


def graph(info: MediaInfo, **options: Any) -> list[JobSpec]:
    counter = iter(range(1000))
    base = {"resolutions": ALL, "storyboard": False}
    return build_job_graph(
        VIDEO_UUID, info, GraphOptions(**{**base, **options}), new_uuid=lambda: f"job-{next(counter):03d}"
    )


def parent_of(specs: list[JobSpec], spec: JobSpec) -> JobSpec | None:
    return next((s for s in specs if s.uuid == spec.parent_uuid), None)


def out(spec: JobSpec) -> tuple[int, int]:
    return spec.payload["output"]["resolution"], spec.payload["output"]["fps"]


def test_720p_all_resolutions_web_and_hls_gives_10_jobs_in_chains() -> None:
    specs = graph(media(), split_audio=False)

    assert len(specs) == 10
    assert Counter(s.type for s in specs) == {WEB: 5, HLS: 5}
    roots = [s for s in specs if s.parent_uuid is None]
    assert len(roots) == 1  # 1 pending, 9 waiting for their parent
    parent = roots[0]
    assert parent.type == WEB
    assert out(parent) == (720, 30)
    assert parent.priority == PRIORITY_REQUIRED_TRANSCODING
    assert parent.private_payload == {"videoUUID": VIDEO_UUID, "isNewVideo": True, "deleteInputFileId": None}

    hls_max = next(s for s in specs if s.type == HLS and out(s)[0] == 720)
    assert hls_max.parent_uuid == parent.uuid
    assert hls_max.priority == PRIORITY_REQUIRED_TRANSCODING
    for resolution in (480, 360, 240, 144):
        web = next(s for s in specs if s.type == WEB and out(s)[0] == resolution)
        hls = next(s for s in specs if s.type == HLS and out(s)[0] == resolution)
        assert web.parent_uuid == parent.uuid  # chain: parent → web → HLS
        assert hls.parent_uuid == web.uuid
        assert web.priority == hls.priority == PRIORITY_OPTIONAL_TRANSCODING
    # parents come before their children (JobService.create needs it)
    seen: set[str] = set()
    for spec in specs:
        assert spec.parent_uuid is None or spec.parent_uuid in seen
        seen.add(spec.uuid)


def test_payload_shapes_follow_the_protocol() -> None:
    specs = graph(media(), split_audio=True)
    for spec in specs:
        parse_payload(spec.type, spec.payload)  # the runner's own models accept them
        video_input = spec.payload["input"]
        assert video_input["videoFileUrl"] == (
            f"/api/v1/runners/jobs/{spec.uuid}/files/videos/{VIDEO_UUID}/max-quality"
        )
        assert video_input["separatedAudioFileUrl"] == []
    hls = [s for s in specs if s.type == HLS]
    assert all(s.payload["output"]["separatedAudio"] is True for s in hls)
    assert all(s.private_payload["deleteWebVideoFiles"] is False for s in hls)
    assert all(set(s.private_payload) == {"videoUUID", "isNewVideo", "deleteWebVideoFiles"} for s in hls)


def test_the_parent_names_the_lower_rungs_and_every_rung_job_names_the_parent() -> None:
    specs = graph(media(fps=60), resolutions=(720, 480, 240), split_audio=True)
    parent = next(s for s in specs if s.parent_uuid is None)
    assert parent.payload["tuberunnerLadder"] == {
        "id": parent.uuid,
        "rungs": [{"resolution": 480, "fps": 30}, {"resolution": 240, "fps": 30}],
    }
    for spec in specs:
        if spec is parent:
            continue
        if spec.type in (WEB, HLS) and out(spec)[0] > 0:
            assert spec.payload["tuberunnerLadder"] == {"id": parent.uuid}
        else:  # the audio-only rendition, storyboard, transcription: nothing to share
            assert "tuberunnerLadder" not in spec.payload
        parse_payload(spec.type, spec.payload)
    # An audio upload's parent merges audio and a picture: no ladder at all.
    audio_specs = graph(media(video=False))
    assert all("tuberunnerLadder" not in s.payload for s in audio_specs)


def test_split_audio_adds_an_audio_only_rendition_after_the_max_hls() -> None:
    specs = graph(media(), split_audio=True)

    assert len(specs) == 11
    audio = next(s for s in specs if s.type == HLS and out(s) == (0, 0))
    hls_max = parent_of(specs, audio)
    assert hls_max is not None
    assert hls_max.type == HLS
    assert out(hls_max) == (720, 30)
    assert audio.payload["output"]["separatedAudio"] is True
    assert audio.priority == PRIORITY_REQUIRED_TRANSCODING


def test_no_audio_rendition_without_audio() -> None:
    specs = graph(media(audio=False), split_audio=True, transcription=True)

    assert all(out(s) != (0, 0) for s in specs if s.type == HLS)
    assert all(s.type != JobType.TRANSCRIPTION for s in specs)
    assert all(s.payload["output"]["separatedAudio"] is False for s in specs if s.type == HLS)


def test_hls_only_keeps_the_web_video_parent_and_marks_hls_jobs() -> None:
    specs = graph(media(), web_video=False, split_audio=False)

    assert Counter(s.type for s in specs) == {WEB: 1, HLS: 5}
    parent = specs[0]
    assert parent.type == WEB
    assert parent.parent_uuid is None
    hls = [s for s in specs if s.type == HLS]
    assert all(s.parent_uuid == parent.uuid for s in hls)  # each chain is a single HLS job
    assert all(s.private_payload["deleteWebVideoFiles"] is True for s in hls)


def test_web_only_has_no_hls() -> None:
    specs = graph(media(), hls=False)
    assert Counter(s.type for s in specs) == {WEB: 5}
    assert all(s.parent_uuid == specs[0].uuid for s in specs[1:])


def test_neither_web_nor_hls_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        graph(media(), web_video=False, hls=False)


def test_audio_upload_merges_with_the_preview() -> None:
    info = media(video=False)
    assert is_audio_upload(info)
    specs = graph(info, resolutions=(480, 360), split_audio=False, storyboard=True)

    parent = specs[0]
    assert parent.type == JobType.VOD_AUDIO_MERGE
    assert parent.payload == {
        "input": {
            "audioFileUrl": f"/api/v1/runners/jobs/{parent.uuid}/files/videos/{VIDEO_UUID}/max-quality",
            "previewFileUrl": (
                f"/api/v1/runners/jobs/{parent.uuid}/files/videos/{VIDEO_UUID}/previews/max-quality"
            ),
        },
        "output": {"resolution": 480, "fps": 25},
    }
    parse_payload(parent.type, parent.payload)
    assert [(s.type, out(s)) for s in specs[1:]] == [(HLS, (480, 25)), (WEB, (360, 25)), (HLS, (360, 25))]
    assert all(s.type != JobType.STORYBOARD for s in specs)


def test_cover_art_counts_as_an_audio_upload() -> None:
    assert is_audio_upload(media(video_codec="mjpeg"))
    assert not is_audio_upload(media())
    assert not is_audio_upload(media(audio=False))


def test_fps_rules() -> None:
    specs = graph(media(1920, 1080, fps=59.94), split_audio=False)
    fps = {(s.type, out(s)[0]): out(s)[1] for s in specs}
    assert fps[(WEB, 1080)] == 60  # origin resolution keeps its (rounded) rate
    assert fps[(WEB, 720)] == 60  # 720p and above keep high frame rates
    assert fps[(WEB, 480)] == 30  # below 720p: the largest of 24/25/30 dividing 60
    assert fps[(HLS, 144)] == 30

    high = {out(s) for s in graph(media(1280, 720, fps=120.0), split_audio=False) if s.type == WEB}
    assert (720, 60) in high  # above the 60 fps max: 60
    assert (360, 30) in high

    pal = {out(s) for s in graph(media(1280, 720, fps=50.0), split_audio=False) if s.type == WEB}
    assert (720, 50) in pal
    assert (480, 25) in pal


def test_odd_portrait_input_keeps_its_even_short_side() -> None:
    specs = graph(media(361, 641), split_audio=False, resolutions=(240, 720))
    assert [out(s)[0] for s in specs if s.type == WEB] == [362, 240]


def test_original_resolution_is_optional() -> None:
    specs = graph(
        media(1920, 1080), split_audio=False, resolutions=(720, 360), always_transcode_original=False
    )
    assert [out(s)[0] for s in specs if s.type == WEB] == [720, 360]


def test_storyboard_and_transcription_hang_off_the_parent() -> None:
    specs = graph(media(duration_s=10.0), resolutions=(720,), transcription=True, storyboard=True)
    parent = specs[0]
    storyboard = next(s for s in specs if s.type == JobType.STORYBOARD)
    transcription = next(s for s in specs if s.type == JobType.TRANSCRIPTION)
    for spec in (storyboard, transcription):
        assert spec.parent_uuid == parent.uuid
        assert spec.private_payload == {"videoUUID": VIDEO_UUID}
        parse_payload(spec.type, spec.payload)
    assert storyboard.priority == PRIORITY_STORYBOARD
    assert storyboard.payload["sprites"] == {
        "size": {"width": 192, "height": 108},
        "count": {"width": 10, "height": 1},  # 10 sprites: 1 row of 10
        "duration": 1,
    }
    assert storyboard.payload["input"]["videoFileUrl"].endswith(f"/videos/{VIDEO_UUID}/max-quality")
    assert transcription.priority == PRIORITY_TRANSCRIPTION
    assert transcription.payload["input"]["videoFileUrl"].endswith(f"/videos/{VIDEO_UUID}/max-quality/audio")
    assert transcription.payload["output"] == {}


def test_no_storyboard_under_three_seconds() -> None:
    specs = graph(media(duration_s=2.4), storyboard=True)
    assert all(s.type != JobType.STORYBOARD for s in specs)


def test_asked_language_is_sent_as_an_extension_and_kept_to_name_the_caption() -> None:
    specs = graph(media(), resolutions=(720,), transcription=True, transcription_language="fr")
    transcription = next(s for s in specs if s.type == JobType.TRANSCRIPTION)
    assert transcription.private_payload == {"videoUUID": VIDEO_UUID, "language": "fr"}
    assert transcription.payload["language"] == "fr"
    detected = next(s for s in graph(media(), transcription=True) if s.type == JobType.TRANSCRIPTION)
    assert "language" not in detected.payload  # PeerTube's own payload shape when nothing is asked
