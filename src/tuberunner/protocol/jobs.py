"""Job types, job states and the numbers of the state machine (protocol spec §6, §7)."""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import Final


class JobType(StrEnum):
    VOD_WEB_VIDEO = "vod-web-video-transcoding"
    VOD_HLS = "vod-hls-transcoding"
    VOD_AUDIO_MERGE = "vod-audio-merge-transcoding"
    LIVE_RTMP_HLS = "live-rtmp-hls-transcoding"
    STUDIO = "video-studio-transcoding"
    TRANSCRIPTION = "video-transcription"
    STORYBOARD = "generate-video-storyboard"


class JobState(IntEnum):
    PENDING = 1
    PROCESSING = 2
    COMPLETED = 3
    ERRORED = 4
    WAITING_FOR_PARENT_JOB = 5
    CANCELLED = 6
    PARENT_ERRORED = 7
    PARENT_CANCELLED = 8
    COMPLETING = 9

    @property
    def label(self) -> str:
        return _STATE_LABELS[self]

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES

    def as_json(self) -> dict[str, int | str]:
        return {"id": int(self), "label": self.label}


_STATE_LABELS: Final = {
    JobState.PENDING: "Pending",
    JobState.PROCESSING: "Processing",
    JobState.COMPLETED: "Completed",
    JobState.ERRORED: "Errored",
    JobState.WAITING_FOR_PARENT_JOB: "Waiting for parent job to finish",
    JobState.CANCELLED: "Cancelled",
    JobState.PARENT_ERRORED: "Parent job failed",
    JobState.PARENT_CANCELLED: "Parent job cancelled",
    JobState.COMPLETING: "Completing",
}

FINAL_STATES: Final = frozenset(
    {
        JobState.COMPLETED,
        JobState.ERRORED,
        JobState.CANCELLED,
        JobState.PARENT_ERRORED,
        JobState.PARENT_CANCELLED,
    }
)

# States an admin may cancel (spec §4, cancel endpoint).
CANCELLABLE_STATES: Final = frozenset(
    {JobState.PENDING, JobState.PROCESSING, JobState.WAITING_FOR_PARENT_JOB}
)

# Errors 1-4 send the job back to pending, the 5th makes it errored (spec §6.4).
MAX_FAILURES: Final = 5

# At most this many pending jobs are offered by one `jobs/request` (spec §3.3).
MAX_AVAILABLE_JOBS: Final = 10

# Job types whose abort is turned into an error (spec §6.3).
NON_ABORTABLE_TYPES: Final = frozenset({JobType.LIVE_RTMP_HLS})

REGISTRATION_TOKEN_PREFIX: Final = "ptrrt-"
RUNNER_TOKEN_PREFIX: Final = "ptrt-"
JOB_TOKEN_PREFIX: Final = "ptrjt-"

# Studio task kinds a runner can execute (spec §7.5).
STUDIO_TASK_NAMES: Final = frozenset({"cut", "add-intro", "add-outro", "add-watermark"})

# Multipart file fields accepted on `/success` and `/update` (spec §3.10).
SUCCESS_FILE_FIELDS: Final = frozenset(
    {"payload[videoFile]", "payload[resolutionPlaylistFile]", "payload[vttFile]", "payload[storyboardFile]"}
)
UPDATE_FILE_FIELDS: Final = frozenset(
    {"payload[videoChunkFile]", "payload[resolutionPlaylistFile]", "payload[masterPlaylistFile]"}
)

# Result files each job type must send with `/success` (spec §7, "success" rows).
REQUIRED_SUCCESS_FILES: Final[dict[JobType, tuple[str, ...]]] = {
    JobType.VOD_WEB_VIDEO: ("videoFile",),
    JobType.VOD_HLS: ("videoFile", "resolutionPlaylistFile"),
    JobType.VOD_AUDIO_MERGE: ("videoFile",),
    JobType.LIVE_RTMP_HLS: (),
    JobType.STUDIO: ("videoFile",),
    JobType.TRANSCRIPTION: ("vttFile",),
    JobType.STORYBOARD: ("storyboardFile",),
}

# socket.io events of the `/runners` namespace. `available-jobs` is PeerTube's; the other is a Tuberunner
# extension (no payload) sent to the sockets of a runner when a job it held was taken back (cancelled,
# deleted, lease expired): it re-checks its jobs at once instead of at its next heartbeat. Clients that do not
# know it (the official runner) ignore it.
AVAILABLE_JOBS_EVENT: Final = "available-jobs"
JOBS_TAKEN_BACK_EVENT: Final = "tuberunner-jobs-taken-back"

# Custom upload targets with a raw body (a Tuberunner extension of 8.x's `output.<field>CustomUpload`): a
# runner that sends `FEATURES_HEADER: raw-upload` on its calls PUTs a result file itself as the body of a
# target marked `body: raw` (a presigned object-storage URL). The official runner sends one multipart `file`
# part to every target, which object storage would keep as is: a coordinator offers such targets only to
# runners that announce the feature.
FEATURES_HEADER: Final = "X-Tuberunner-Features"
RAW_UPLOAD_FEATURE: Final = "raw-upload"
RAW_UPLOAD_BODY: Final = "raw"
# A coordinator that sends `tuberunner-jobs-taken-back` says so on its `jobs/request` and `accept` answers
# with this header (value: the event's name). PeerTube never sends it, the official runner ignores it; our
# runner checks its jobs less often on such a server while its socket is connected.
PUSHES_HEADER: Final = "X-Tuberunner-Pushes"
