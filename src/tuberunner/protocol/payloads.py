"""Public job payloads (spec §7) as pydantic models.

The coordinator builds them; the runner parses what it receives. Unknown fields are kept (`extra="allow"`)
because newer servers add fields that an older peer must carry along, not reject.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from tuberunner.protocol.jobs import JobType


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class CustomUpload(_Model):
    """8.x upload target: the runner sends the file there first, then calls `success` without it."""

    url: str
    method: Literal["PUT", "POST"] = "PUT"


class VideoInput(_Model):
    videoFileUrl: str
    separatedAudioFileUrl: list[str] = Field(default_factory=list)


class WebVideoOutput(_Model):
    resolution: int
    fps: int
    videoFileCustomUpload: CustomUpload | None = None


class HlsOutput(_Model):
    resolution: int
    fps: int
    separatedAudio: bool = False
    videoFileCustomUpload: CustomUpload | None = None
    resolutionPlaylistFileCustomUpload: CustomUpload | None = None


class AudioMergeInput(_Model):
    audioFileUrl: str
    previewFileUrl: str


class LadderRung(_Model):
    resolution: int = Field(gt=0, le=8192)
    fps: int = Field(gt=0, le=1000)


class Ladder(_Model):
    """`tuberunnerLadder`, an extension of a Tuberunner coordinator (other runners ignore it).

    On a video's parent web-video job, `rungs` lists the lower renditions of the video: a runner may
    encode them in the same run, from the same decode, and keep them. On the web-video and HLS jobs of
    those renditions (and the max-resolution HLS job), `id` names that ladder (the parent job's UUID) and
    `rungs` is empty: a runner holding the rung uses it instead of encoding again."""

    id: str = Field(min_length=1, max_length=100)
    rungs: list[LadderRung] = Field(default_factory=list, max_length=16)


class WebVideoPayload(_Model):
    input: VideoInput
    output: WebVideoOutput
    tuberunnerLadder: Ladder | None = None


class HlsPayload(_Model):
    input: VideoInput
    output: HlsOutput
    tuberunnerLadder: Ladder | None = None


class AudioMergePayload(_Model):
    input: AudioMergeInput
    output: WebVideoOutput


class CutOptions(_Model):
    start: float | None = None
    end: float | None = None


class FileOptions(_Model):
    file: str


class WatermarkOptions(_Model):
    file: str
    watermarkSizeRatio: float
    # Upstream spelling, kept on the wire.
    horitonzalMarginRatio: float
    verticalMarginRatio: float


class CutTask(_Model):
    name: Literal["cut"]
    options: CutOptions


class IntroTask(_Model):
    name: Literal["add-intro"]
    options: FileOptions


class OutroTask(_Model):
    name: Literal["add-outro"]
    options: FileOptions


class WatermarkTask(_Model):
    name: Literal["add-watermark"]
    options: WatermarkOptions


StudioTask = Annotated[CutTask | IntroTask | OutroTask | WatermarkTask, Field(discriminator="name")]


class StudioOutput(_Model):
    videoFileCustomUpload: CustomUpload | None = None


class StudioPayload(_Model):
    input: VideoInput
    tasks: list[StudioTask]
    output: StudioOutput = Field(default_factory=StudioOutput)


class TranscriptionInput(_Model):
    videoFileUrl: str


class TranscriptionOutput(_Model):
    vttFileCustomUpload: CustomUpload | None = None


class TranscriptionPayload(_Model):
    input: TranscriptionInput
    output: TranscriptionOutput = Field(default_factory=TranscriptionOutput)


class Size(_Model):
    width: int
    height: int


class Sprites(_Model):
    size: Size
    count: Size
    duration: float


class StoryboardOutput(_Model):
    storyboardFileCustomUpload: CustomUpload | None = None


class StoryboardPayload(_Model):
    input: TranscriptionInput
    sprites: Sprites
    output: StoryboardOutput = Field(default_factory=StoryboardOutput)


class LiveRendition(_Model):
    resolution: int
    fps: int


class LiveInput(_Model):
    rtmpUrl: str


class LiveOutput(_Model):
    toTranscode: list[LiveRendition]
    segmentDuration: float
    segmentListSize: int


class LivePayload(_Model):
    input: LiveInput
    output: LiveOutput


JobPayload = (
    WebVideoPayload
    | HlsPayload
    | AudioMergePayload
    | StudioPayload
    | TranscriptionPayload
    | StoryboardPayload
    | LivePayload
)

PAYLOAD_MODELS: dict[JobType, type[_Model]] = {
    JobType.VOD_WEB_VIDEO: WebVideoPayload,
    JobType.VOD_HLS: HlsPayload,
    JobType.VOD_AUDIO_MERGE: AudioMergePayload,
    JobType.STUDIO: StudioPayload,
    JobType.TRANSCRIPTION: TranscriptionPayload,
    JobType.STORYBOARD: StoryboardPayload,
    JobType.LIVE_RTMP_HLS: LivePayload,
}


def parse_payload(job_type: JobType, raw: object) -> _Model:
    """Validate a public payload of `job_type`; raises pydantic.ValidationError when it does not fit."""
    return TypeAdapter(PAYLOAD_MODELS[job_type]).validate_python(raw)
