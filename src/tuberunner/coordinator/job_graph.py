"""The jobs of a new video (spec §6.5, §7.1-§7.3, §7.6, §7.7), as a pure function of its probe.

    parent           vod-web-video-transcoding at the max resolution ("optimize"),
                     or vod-audio-merge-transcoding (480p, 25 fps) for an audio-only upload
    ├── chain        [HLS max resolution, then HLS audio-only (resolution 0) with split audio]
    ├── chain        [web video 480p, HLS 480p]       one chain per lower ladder resolution
    ├── chain        [web video 360p, HLS 360p]       (a chain element depends on the previous one)
    ├── ...
    ├── storyboard   generate-video-storyboard (8.x), when the video lasts 3 s or more
    └── transcription video-transcription, when asked for and the input has audio

Priorities (lower runs first) follow PeerTube 8.x constants (spec §6.5, §12): storyboard 95, *required*
transcoding 100, transcription 200, *optional* transcoding 10000. What makes a video watchable — the parent
and the max-resolution HLS chain (its audio rendition included) — is required; the lower resolutions are
optional, so every video in the queue becomes playable before any lower rendition is made. There is no
per-uploader bonus (PeerTube adds the owner's uploads of the last week): the coordinator has one owner.

With web videos disabled and HLS enabled, PeerTube still runs the max-resolution web-video parent (the
lower chains lose their web-video element) and HLS jobs carry `deleteWebVideoFiles`: completion removes the
web videos once every HLS rendition exists. The uploaded original is kept (kind `source`), so
`deleteInputFileId` is always null.

A video submitted with studio edits (`StudioEdits`) first gets one `video-studio-transcoding` job (priority
150, PeerTube's studio priority) on its original; the graph above is built on that job's completion from the
probe of the edited video, as PeerTube's `onVideoStudioEnded` builds its transcoding jobs
(`studio_job`, `graph_options_from_json`).

Payload URLs are paths; they are made absolute when served (`models.absolutize`).

Encode once (the `tuberunnerLadder` payload extension). The graph keeps PeerTube's shape whoever runs it,
so every runner, official or ours, can take every job, and leases, retries, abort, cancel, delete and
restart work job by job as they always did. On top of it, a video (not an audio upload) gets:

* on its parent web-video job: `tuberunnerLadder: {"id": <parent uuid>, "rungs": [{resolution, fps}...]}`,
  every lower rendition of the graph. A Tuberunner runner encodes them in the same run, from one decode of
  the source, and keeps them (an official runner ignores the field and encodes the parent alone);
* on the max-resolution HLS job and on each lower rendition's web-video and HLS jobs:
  `tuberunnerLadder: {"id": <parent uuid>}`. A runner that kept that rung uploads it (web video) or
  packages it with `-c copy` (HLS) instead of encoding; any other runner encodes as PeerTube would.

So the coordinator never needs to know which runners will come: with only official runners the jobs run
exactly as PeerTube's; in a mixed fleet, a rung job taken by a runner that does not hold the rung is
encoded by it; nothing waits for a capable runner. Our runners take offers of a video whose encodes they
hold first, so the rung jobs go back to the runner that made the ladder whenever it has a free slot.
A lower rendition made this way comes from the source rather than from the max-quality file (one
generation of encoding less); everything else (bit rate cap, fps, x264 options) is the job's own.
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from tuberunner.coordinator.models import JobSpec
from tuberunner.media.probe import MediaInfo
from tuberunner.media.profiles import (
    AUDIO_ONLY_RESOLUTION,
    JOB_PRIORITY_ORDER,
    compute_output_fps,
    resolution_ladder,
    storyboard_sprites,
)
from tuberunner.protocol.jobs import JobType

PRIORITY_STORYBOARD: Final = 95
PRIORITY_REQUIRED_TRANSCODING: Final = 100
PRIORITY_STUDIO: Final = 150
PRIORITY_TRANSCRIPTION: Final = 200
PRIORITY_OPTIONAL_TRANSCODING: Final = 10000

# PeerTube's DEFAULT_AUDIO_RESOLUTION and VIDEO_TRANSCODING_FPS.AUDIO_MERGE.
AUDIO_MERGE_RESOLUTION: Final = 480
AUDIO_MERGE_FPS: Final = 25

# Codecs of a "video" stream that is really cover art: such a file is an audio upload (PeerTube's
# `isAudioFile` uses the same idea).
_IMAGE_CODECS: Final = frozenset({"mjpeg", "png", "bmp", "gif", "webp", "tiff", "jpeg2000", "apng"})


@dataclass(frozen=True)
class GraphOptions:
    """What the uploader asked for (defaults come from the coordinator configuration)."""

    resolutions: tuple[int, ...]
    hls: bool = True
    web_video: bool = True
    split_audio: bool = True
    transcription: bool = False
    transcription_language: str | None = None
    storyboard: bool = True
    # PeerTube's `transcoding.always_transcode_original_resolution` (default on): the parent keeps the
    # input's own resolution (made even) even when it is not in the enabled list.
    always_transcode_original: bool = True
    max_fps: int = 60


def is_audio_upload(info: MediaInfo) -> bool:
    """No picture, or only cover art next to an audio stream."""
    if info.audio is None:
        return False
    return info.video is None or info.video.codec in _IMAGE_CODECS


def runner_file_url(job_uuid: str, video_uuid: str, suffix: str) -> str:
    """A runner input file path (spec §3.9): suffix `max-quality`, `max-quality/audio`, ..."""
    return f"/api/v1/runners/jobs/{job_uuid}/files/videos/{video_uuid}/{suffix}"


def build_job_graph(
    video_uuid: str,
    info: MediaInfo,
    options: GraphOptions,
    *,
    new_uuid: Callable[[], str] = lambda: str(uuidlib.uuid4()),
) -> list[JobSpec]:
    """Every job of a newly uploaded video, parents before children.

    Raises ValueError when the input cannot be transcoded (no stream, unknown frame rate) or the options
    ask for nothing (neither web videos nor HLS).
    """
    if not (options.hls or options.web_video):
        raise ValueError("at least one of HLS and web videos must be enabled")
    audio_upload = is_audio_upload(info)
    has_audio = info.audio is not None
    if audio_upload:
        max_resolution, input_fps = AUDIO_MERGE_RESOLUTION, float(AUDIO_MERGE_FPS)
    elif info.video is not None:
        max_resolution, input_fps = _max_resolution(info.video.short_side, options), info.video.fps
    else:
        raise ValueError("the file has neither a video nor an audio stream")
    max_fps = compute_output_fps(input_fps, max_resolution, True, options.max_fps)

    builder = _Builder(video_uuid, new_uuid)
    if audio_upload:
        parent = builder.audio_merge(max_resolution, max_fps)
    else:
        parent = builder.web_video(max_resolution, max_fps, PRIORITY_REQUIRED_TRANSCODING, None)

    split_audio = options.hls and options.split_audio and has_audio
    delete_web_videos = not options.web_video
    if options.hls:
        hls_max = builder.hls(
            max_resolution, max_fps, split_audio, delete_web_videos, PRIORITY_REQUIRED_TRANSCODING, parent
        )
        if split_audio:
            builder.hls(
                AUDIO_ONLY_RESOLUTION, 0, True, delete_web_videos, PRIORITY_REQUIRED_TRANSCODING, hls_max
            )

    ladder = resolution_ladder(max_resolution, options.resolutions, has_audio=has_audio)
    lower = [r for r in ladder if AUDIO_ONLY_RESOLUTION < r < max_resolution]
    for resolution in sorted(lower, key=_creation_rank):
        fps = compute_output_fps(input_fps, resolution, False, options.max_fps)
        previous = parent
        if options.web_video:
            previous = builder.web_video(resolution, fps, PRIORITY_OPTIONAL_TRANSCODING, previous)
        if options.hls:
            builder.hls(
                resolution, fps, split_audio, delete_web_videos, PRIORITY_OPTIONAL_TRANSCODING, previous
            )

    if options.storyboard and not audio_upload and info.video is not None:
        sprites = storyboard_sprites(info.video.display_width, info.video.display_height, info.duration_s)
        if sprites is not None:
            builder.storyboard(
                {
                    "size": {"width": sprites.width, "height": sprites.height},
                    "count": {"width": sprites.columns, "height": sprites.rows},
                    "duration": sprites.duration_s,
                },
                parent,
            )
    if options.transcription and has_audio:
        builder.transcription(options.transcription_language, parent)
    if not audio_upload:
        _mark_ladder(builder.specs, parent, max_resolution)
    return builder.specs


def _mark_ladder(specs: list[JobSpec], parent: str, max_resolution: int) -> None:
    """Add the `tuberunnerLadder` extension (module docstring) to the parent and its rung jobs."""
    rungs: list[dict[str, int]] = []
    for spec in specs:
        if spec.type not in (JobType.VOD_WEB_VIDEO, JobType.VOD_HLS):
            continue
        output = spec.payload["output"]
        if output["resolution"] == AUDIO_ONLY_RESOLUTION:
            continue
        rung = {"resolution": output["resolution"], "fps": output["fps"]}
        if spec.uuid != parent:
            spec.payload["tuberunnerLadder"] = {"id": parent}
            if output["resolution"] < max_resolution and rung not in rungs:
                rungs.append(rung)
    for spec in specs:
        if spec.uuid == parent:
            spec.payload["tuberunnerLadder"] = {"id": parent, "rungs": rungs}


def _max_resolution(short_side: int, options: GraphOptions) -> int:
    ladder = resolution_ladder(
        short_side,
        [r for r in options.resolutions if r != AUDIO_ONLY_RESOLUTION],
        always_include_input=options.always_transcode_original,
    )
    return ladder[0]


def _creation_rank(resolution: int) -> int:
    """PeerTube creates lower resolutions in its priority order (480 and 360 first)."""
    try:
        return JOB_PRIORITY_ORDER.index(resolution)
    except ValueError:
        return len(JOB_PRIORITY_ORDER) + resolution


class _Builder:
    def __init__(self, video_uuid: str, new_uuid: Callable[[], str]) -> None:
        self.video_uuid = video_uuid
        self.new_uuid = new_uuid
        self.specs: list[JobSpec] = []

    def _add(
        self,
        job_type: JobType,
        priority: int,
        parent: str | None,
        payload: Callable[[str], dict[str, Any]],
        private: dict[str, Any],
    ) -> str:
        job_uuid = self.new_uuid()
        self.specs.append(
            JobSpec(
                uuid=job_uuid,
                type=job_type,
                priority=priority,
                payload=payload(job_uuid),
                private_payload={"videoUUID": self.video_uuid, **private},
                parent_uuid=parent,
            )
        )
        return job_uuid

    def _video_input(self, job_uuid: str) -> dict[str, Any]:
        # A new upload has no separated audio file yet, so the list is empty (it is always a list).
        return {
            "videoFileUrl": runner_file_url(job_uuid, self.video_uuid, "max-quality"),
            "separatedAudioFileUrl": [],
        }

    def web_video(self, resolution: int, fps: int, priority: int, parent: str | None) -> str:
        return self._add(
            JobType.VOD_WEB_VIDEO,
            priority,
            parent,
            lambda u: {"input": self._video_input(u), "output": {"resolution": resolution, "fps": fps}},
            {"isNewVideo": True, "deleteInputFileId": None},
        )

    def audio_merge(self, resolution: int, fps: int) -> str:
        return self._add(
            JobType.VOD_AUDIO_MERGE,
            PRIORITY_REQUIRED_TRANSCODING,
            None,
            lambda u: {
                "input": {
                    "audioFileUrl": runner_file_url(u, self.video_uuid, "max-quality"),
                    "previewFileUrl": runner_file_url(u, self.video_uuid, "previews/max-quality"),
                },
                "output": {"resolution": resolution, "fps": fps},
            },
            {"isNewVideo": True, "deleteInputFileId": None},
        )

    def hls(
        self,
        resolution: int,
        fps: int,
        separated_audio: bool,
        delete_web_videos: bool,
        priority: int,
        parent: str,
    ) -> str:
        return self._add(
            JobType.VOD_HLS,
            priority,
            parent,
            lambda u: {
                "input": self._video_input(u),
                "output": {"resolution": resolution, "fps": fps, "separatedAudio": separated_audio},
            },
            {"isNewVideo": True, "deleteWebVideoFiles": delete_web_videos},
        )

    def storyboard(self, sprites: dict[str, Any], parent: str) -> str:
        return self._add(
            JobType.STORYBOARD,
            PRIORITY_STORYBOARD,
            parent,
            lambda u: {
                "input": {"videoFileUrl": runner_file_url(u, self.video_uuid, "max-quality")},
                "sprites": sprites,
                "output": {},
            },
            {},
        )

    def transcription(self, language: str | None, parent: str) -> str:
        # PeerTube's runners detect the language themselves; an asked-for language is our extension
        # (`language`: the official runner ignores it, ours transcribes in it) and also names the
        # caption when the runner reports none (private payload).
        extension = {"language": language} if language else {}
        return self._add(
            JobType.TRANSCRIPTION,
            PRIORITY_TRANSCRIPTION,
            parent,
            lambda u: {
                "input": {"videoFileUrl": runner_file_url(u, self.video_uuid, "max-quality/audio")},
                "output": {},
                **extension,
            },
            extension,
        )


# ------------------------------------------------------------------------------------------ studio

# PeerTube's VIDEO_FILTERS.WATERMARK: the watermark is 1/10 of the video's height, 1/20 of it from the
# right and top edges.
WATERMARK_SIZE_RATIO: Final = 0.1
WATERMARK_HORIZONTAL_MARGIN_RATIO: Final = 0.05
WATERMARK_VERTICAL_MARGIN_RATIO: Final = 0.05


@dataclass(frozen=True)
class StudioEdits:
    """Edits asked for at upload; files are task-file names of the video (served under
    `studio/task-files/<name>`). Tasks run in PeerTube's editor order: cut, intro, outro, watermark."""

    cut_start_s: float | None = None
    cut_end_s: float | None = None
    intro: str | None = None
    outro: str | None = None
    watermark: str | None = None

    @property
    def any(self) -> bool:
        return self.has_cut or any((self.intro, self.outro, self.watermark))

    @property
    def has_cut(self) -> bool:
        return self.cut_start_s is not None or self.cut_end_s is not None

    def as_json(self) -> dict[str, Any]:
        return {
            "cutStart": self.cut_start_s,
            "cutEnd": self.cut_end_s,
            "intro": self.intro,
            "outro": self.outro,
            "watermark": self.watermark,
        }


def studio_tasks(job_uuid: str, video_uuid: str, edits: StudioEdits) -> list[dict[str, Any]]:
    """The payload's task list (spec §7.5)."""

    def file(name: str) -> str:
        return runner_file_url(job_uuid, video_uuid, f"studio/task-files/{name}")

    tasks: list[dict[str, Any]] = []
    if edits.has_cut:
        cut: dict[str, Any] = {}
        if edits.cut_start_s is not None:
            cut["start"] = edits.cut_start_s
        if edits.cut_end_s is not None:
            cut["end"] = edits.cut_end_s
        tasks.append({"name": "cut", "options": cut})
    if edits.intro:
        tasks.append({"name": "add-intro", "options": {"file": file(edits.intro)}})
    if edits.outro:
        tasks.append({"name": "add-outro", "options": {"file": file(edits.outro)}})
    if edits.watermark:
        tasks.append(
            {
                "name": "add-watermark",
                "options": {
                    "file": file(edits.watermark),
                    "watermarkSizeRatio": WATERMARK_SIZE_RATIO,
                    "horitonzalMarginRatio": WATERMARK_HORIZONTAL_MARGIN_RATIO,
                    "verticalMarginRatio": WATERMARK_VERTICAL_MARGIN_RATIO,
                },
            }
        )
    return tasks


def studio_job(
    video_uuid: str, edits: StudioEdits, *, new_uuid: Callable[[], str] = lambda: str(uuidlib.uuid4())
) -> JobSpec:
    """The studio job of a video: its tasks on the max-quality file (ValueError when there is none)."""
    if not edits.any:
        raise ValueError("no studio edit asked for")
    job_uuid = new_uuid()
    return JobSpec(
        uuid=job_uuid,
        type=JobType.STUDIO,
        priority=PRIORITY_STUDIO,
        payload={
            "input": {
                "videoFileUrl": runner_file_url(job_uuid, video_uuid, "max-quality"),
                "separatedAudioFileUrl": [],
            },
            "tasks": studio_tasks(job_uuid, video_uuid, edits),
            "output": {},
        },
        private_payload={"videoUUID": video_uuid, "studio": edits.as_json()},
    )


def graph_options_from_json(stored: dict[str, Any], defaults: GraphOptions) -> GraphOptions:
    """The options recorded with a video (the ingest API's `options` JSON) back as GraphOptions."""

    def flag(key: str, default: bool) -> bool:
        value = stored.get(key)
        return value if isinstance(value, bool) else default

    resolutions = stored.get("resolutions")
    language = stored.get("transcriptionLanguage")
    return GraphOptions(
        resolutions=(
            tuple(int(r) for r in resolutions)
            if isinstance(resolutions, list) and all(isinstance(r, int) for r in resolutions)
            else defaults.resolutions
        ),
        hls=flag("hls", defaults.hls),
        web_video=flag("webVideo", defaults.web_video),
        split_audio=flag("splitAudio", defaults.split_audio),
        transcription=flag("transcription", defaults.transcription),
        transcription_language=language if isinstance(language, str) else None,
        storyboard=flag("storyboard", defaults.storyboard),
    )
