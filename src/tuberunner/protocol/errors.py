"""Error codes and the exact messages of the protocol's problem documents (spec §2.3, §3)."""

from __future__ import annotations

from enum import StrEnum
from typing import Final


class ErrorCode(StrEnum):
    JOB_NOT_IN_PROCESSING_STATE = "runner_job_not_in_processing_state"
    JOB_NOT_IN_PENDING_STATE = "runner_job_not_in_pending_state"
    UNKNOWN_RUNNER_TOKEN = "unknown_runner_token"


PROBLEM_TYPE_BASE: Final = "https://docs.joinpeertube.org/api-rest-reference.html#section/Errors/"


class Message:
    """The `detail` strings PeerTube sends; runners of other implementations may log or match them."""

    INCORRECT_PARAMS: Final = "Incorrect request parameters: "
    REGISTRATION_TOKEN_INVALID: Final = "Registration token is invalid"
    RUNNER_NAME_EXISTS: Final = "This runner name already exists on this instance"
    UNKNOWN_RUNNER_TOKEN: Final = "Unknown runner token"
    UNKNOWN_RUNNER_JOB: Final = "Unknown runner job"
    JOB_NOT_PENDING: Final = "This runner job is not in pending state"
    JOB_NOT_PENDING_ANYMORE: Final = "This job is not in pending state anymore"
    JOB_NOT_PROCESSING: Final = 'Job is not in "processing" state'
    PAYLOAD_INVALID: Final = "Payload is invalid"
    VIDEO_NOT_FOUND: Final = "Video not found"
    JOB_NOT_OF_VIDEO: Final = "Job is not associated to this video"
    FILE_NOT_OF_TASK: Final = "File is not associated to this edition task"
    REGISTRATION_TOKEN_NOT_FOUND: Final = "Registration token not found"
    RUNNER_NOT_FOUND: Final = "Runner not found"
    CANNOT_CANCEL: Final = (
        'Cannot cancel this job that is not in "pending", "processing" or "waiting for parent job" state'
    )
    ABORT_NOT_SUPPORTED: Final = "Job has been aborted but it is not supported by this job type"
    STALLED_JOB: Final = "Stalled runner job"
    PARENT_ERROR: Final = "Parent error"
    NO_SOCKET_TOKEN: Final = "No runner token provided"
    SOCKET_TOKEN_NOT_STRING: Final = "Runner token is invalid"
    SOCKET_TOKEN_UNKNOWN: Final = "Invalid runner token."
