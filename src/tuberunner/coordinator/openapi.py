"""The OpenAPI 3.1 description of every HTTP endpoint of the coordinator, served at
`GET /api/v1/openapi.json` (no token).

    runner API   /api/v1/runners/...    credentials in the body (`runnerToken`, `jobToken`), never a header
    admin API    /api/v1/runners/...    `Authorization: Bearer <admin token>`
    ingest API   /api/v1/videos...      `Authorization: Bearer <admin token>`
    static       /static/...            public output files, no token
    dashboard    /, /dashboard/...      the web page (its data comes from the admin API)
    ops          /healthz /readyz /metrics

Bodies are described in every encoding the coordinator parses (spec §2.1): JSON and flat urlencoded
everywhere, multipart with `payload[...]` field names on `update` and `success`, multipart on the video
upload. Every refusal is a problem document (spec §2.3) whose `code` is one of the three protocol codes
when one is set. The document is made from the same enums the handlers use and serialised once per
process. tests/fuzz/test_openapi.py checks that every route the app registers is described here (and
nothing else), so a new route needs its description; tests/fuzz/test_api_fuzz.py fuzzes every operation.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from tuberunner.protocol.errors import ErrorCode
from tuberunner.protocol.jobs import JobState, JobType

OPENAPI_PATH: Final = "/api/v1/openapi.json"
_TOKEN_MAX: Final = 1000
_UUID_PATTERN: Final = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
_ADMIN: Final[list[dict[str, list[str]]]] = [{"adminBearer": []}]
_PUBLIC: Final[list[dict[str, list[str]]]] = []

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _string(min_len: int = 1, max_len: int = _TOKEN_MAX, **extra: Any) -> Schema:
    return {"type": "string", "minLength": min_len, "maxLength": max_len, **extra}


def _nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def _object(properties: dict[str, Schema], required: tuple[str, ...] = (), **extra: Any) -> Schema:
    schema: Schema = {"type": "object", "properties": properties, **extra}
    if required:
        schema["required"] = list(required)
    return schema


# ------------------------------------------------------------------------------------------ components

_RUNNER_TOKEN: Final = _string(
    description="The runner token returned by `register` (`ptrt-…`): the runner's credential, in the body."
)
_JOB_TOKEN: Final = _string(
    description="The job token returned by `accept` (`ptrjt-…`): valid while this acceptance lasts."
)
_TIMESTAMP: Final = {"type": "string", "format": "date-time"}


def _schemas() -> dict[str, Schema]:
    state_ids = [int(s) for s in JobState]
    return {
        "Problem": _object(
            {
                "status": {"type": "integer", "minimum": 400, "maximum": 599},
                "detail": {"type": "string"},
                "error": {"type": "string", "description": "Same as `detail` (legacy field)."},
                "code": {"type": "string", "enum": [str(c) for c in ErrorCode]},
                "type": {"type": "string"},
                "title": {"type": "string"},
                "instance": {"type": "string"},
                "docs": {"type": "string"},
                "invalid-params": {
                    "type": "object",
                    "additionalProperties": _object(
                        {
                            "msg": {"type": "string"},
                            "path": {"type": "string"},
                            "location": {"type": "string"},
                        },
                        ("msg", "path", "location"),
                    ),
                },
            },
            ("status", "detail", "error", "type"),
            description="Spec §2.3. `code` is set only for the three protocol codes; runners branch on it.",
        ),
        "JobType": {"type": "string", "enum": [str(t) for t in JobType]},
        "JobState": _object(
            {
                "id": {"type": "integer", "enum": state_ids},
                "label": {"type": "string", "enum": [s.label for s in JobState]},
            },
            ("id", "label"),
        ),
        "RunnerRef": _object(
            {
                "id": {"type": "integer"},
                "name": {"type": "string"},
                "description": _nullable({"type": "string"}),
            },
            ("id", "name", "description"),
        ),
        "RunnerJob": _object(
            {
                "uuid": {"type": "string", "format": "uuid"},
                "type": _ref("JobType"),
                "state": _ref("JobState"),
                "payload": {"type": "object", "description": "Public payload (spec §7), URLs absolute."},
                "failures": {"type": "integer", "minimum": 0},
                "error": _nullable({"type": "string"}),
                "progress": _nullable({"type": "integer", "minimum": 0, "maximum": 100}),
                "priority": {"type": "integer"},
                "createdAt": _TIMESTAMP,
                "updatedAt": _TIMESTAMP,
                "startedAt": _TIMESTAMP,
                "finishedAt": _TIMESTAMP,
                "runner": _nullable(_ref("RunnerRef")),
            },
            (
                "uuid",
                "type",
                "state",
                "payload",
                "failures",
                "error",
                "progress",
                "priority",
                "createdAt",
                "updatedAt",
                "runner",
            ),
            description="Spec §5.1, runner view.",
        ),
        "AcceptedJob": {
            "allOf": [
                _ref("RunnerJob"),
                _object(
                    {"jobToken": _string(description="Send it with every call about this job.")},
                    ("jobToken",),
                ),
            ]
        },
        "RunnerJobAdmin": {
            "allOf": [
                _ref("RunnerJob"),
                _object(
                    {
                        "privatePayload": {"type": "object"},
                        "parent": _object(
                            {
                                "id": {"type": "integer"},
                                "uuid": {"type": "string", "format": "uuid"},
                                "type": _ref("JobType"),
                                "state": _ref("JobState"),
                            },
                            ("uuid", "type", "state"),
                        ),
                        "unclaimedSince": _nullable(
                            {
                                **_TIMESTAMP,
                                "description": "Set while the job is unclaimed: pending, and no connected"
                                " runner has taken its type since then (for at least the unclaimed wait,"
                                " `--unclaimed-after`). A Tuberunner extension.",
                            }
                        ),
                    },
                    ("privatePayload", "unclaimedSince"),
                ),
            ],
            "description": "Spec §5.1, admin view: never the job token.",
        },
        "UnclaimedJob": _object(
            {
                "uuid": {"type": "string", "format": "uuid"},
                "type": _ref("JobType"),
                "videoUUID": _nullable({"type": "string"}),
                "pendingSince": _TIMESTAMP,
                "unclaimedSince": {
                    **_TIMESTAMP,
                    "description": "Since when no connected runner has taken this job type (at least the"
                    " unclaimed wait ago).",
                },
                "fallback": _nullable(
                    {
                        "type": "string",
                        "enum": ["coordinator"],
                        "description": "`coordinator`: the coordinator makes it itself (storyboards);"
                        " null: it waits for a runner that takes its type.",
                    }
                ),
            },
            ("uuid", "type", "videoUUID", "pendingSince", "unclaimedSince", "fallback"),
            description="A pending job that no connected runner takes (a Tuberunner extension).",
        ),
        "AvailableJob": _object(
            {
                "uuid": {"type": "string", "format": "uuid"},
                "type": _ref("JobType"),
                "payload": {"type": "object"},
            },
            ("uuid", "type", "payload"),
        ),
        "Runner": _object(
            {
                "id": {"type": "integer"},
                "name": {"type": "string"},
                "description": _nullable({"type": "string"}),
                "ip": _nullable({"type": "string"}),
                "lastContact": _TIMESTAMP,
                "createdAt": _TIMESTAMP,
                "updatedAt": _TIMESTAMP,
                "version": _nullable({"type": "string"}),
            },
            ("id", "name", "description", "ip", "lastContact", "createdAt", "updatedAt", "version"),
            description="Spec §5.2: the runner token never leaves the database.",
        ),
        "RegistrationToken": _object(
            {
                "id": {"type": "integer"},
                "registrationToken": {"type": "string"},
                "createdAt": _TIMESTAMP,
                "updatedAt": _TIMESTAMP,
                "registeredRunnersCount": {"type": "integer", "minimum": 0},
            },
            ("id", "registrationToken", "createdAt", "updatedAt", "registeredRunnersCount"),
        ),
        "VideoOutputs": _object(
            {
                "webVideos": {
                    "type": "array",
                    "items": _object(
                        {
                            "resolution": _nullable({"type": "integer"}),
                            "fps": _nullable({"type": "integer"}),
                            "size": {"type": "integer"},
                            "url": {"type": "string"},
                        },
                        ("resolution", "fps", "size", "url"),
                    ),
                },
                "hls": _nullable(
                    _object(
                        {
                            "masterPlaylistUrl": _nullable({"type": "string"}),
                            "renditions": {"type": "array", "items": {"type": "object"}},
                        },
                        ("masterPlaylistUrl", "renditions"),
                    )
                ),
                "captions": {"type": "array", "items": {"type": "object"}},
                "storyboards": {"type": "array", "items": {"type": "object"}},
                "previewUrl": _nullable({"type": "string"}),
            },
            ("webVideos", "hls", "captions", "storyboards", "previewUrl"),
        ),
        "Live": _object(
            {
                "state": {"type": "string", "enum": ["waiting", "live", "ended"]},
                "rtmpUrl": {
                    "type": "string",
                    "description": "Where publishers push (`rtmp://host:port/live`).",
                },
                "streamKey": {"type": "string", "description": "The stream name publishers use: a secret."},
                "permanentLive": {"type": "boolean"},
                "saveReplay": {"type": "boolean"},
                "resolutions": {"type": "array", "items": {"type": "integer"}},
                "hlsUrl": {"type": "string", "description": "The master playlist viewers read."},
                "session": {"type": "integer", "minimum": 0},
                "jobUuid": _nullable({"type": "string"}),
                "publisherConnected": {"type": "boolean"},
                "viewersPulling": {"type": "integer", "minimum": 0},
                "lagSeconds": _nullable({"type": "number"}),
                "replays": {"type": "array", "items": {"type": "string", "format": "uuid"}},
                "error": _nullable({"type": "string"}),
                "startedAt": _nullable({"type": "number"}),
                "endedAt": _nullable({"type": "number"}),
            },
            ("state", "rtmpUrl", "streamKey", "permanentLive", "saveReplay", "hlsUrl", "session", "replays"),
        ),
        "Video": _object(
            {
                "id": {"type": "integer"},
                "uuid": {"type": "string", "format": "uuid"},
                "name": {"type": "string"},
                "state": {
                    "type": "string",
                    "enum": ["processing", "failed", "cancelled", "published", "waiting", "live", "ended"],
                    "description": "A live video's state is its live's: waiting, live or ended.",
                },
                "live": _ref("Live"),
                "error": _nullable({"type": "string"}),
                "errors": {
                    "type": "array",
                    "items": _object(
                        {
                            "job": {"type": "string"},
                            "type": {"type": "string"},
                            "message": {"type": "string"},
                        },
                        ("job", "type", "message"),
                    ),
                },
                "createdAt": _TIMESTAMP,
                "updatedAt": _TIMESTAMP,
                "options": {"type": "object"},
                "source": _nullable({"type": "object"}),
                "jobs": _object(
                    {
                        "total": {"type": "integer", "minimum": 0},
                        "byState": {"type": "object", "additionalProperties": {"type": "integer"}},
                        "list": {
                            "type": "array",
                            "items": {"type": "object"},
                            "description": "With `details`: each job's uuid, type, state, priority,"
                            " progress, failures, error, resolution, fps, parentUuid, startedAt, finishedAt"
                            " and unclaimedSince (set while no connected runner takes its type).",
                        },
                    },
                    ("total", "byState"),
                ),
                "attachments": {
                    "type": "array",
                    "description": "Storyboard and caption jobs: they never hold the video back (its"
                    " `state` follows the web video and HLS jobs only); their files join `outputs` when"
                    " done.",
                    "items": _object(
                        {
                            "kind": {"type": "string", "enum": ["storyboard", "captions"]},
                            "job": {"type": "string", "format": "uuid"},
                            "state": {"type": "string", "enum": ["pending", "done", "failed", "cancelled"]},
                            "unclaimedSince": _nullable(
                                {
                                    **_TIMESTAMP,
                                    "description": "Set while no connected runner takes the job's type.",
                                }
                            ),
                        },
                        ("kind", "job", "state", "unclaimedSince"),
                    ),
                },
                "outputs": _ref("VideoOutputs"),
            },
            (
                "id",
                "uuid",
                "name",
                "state",
                "error",
                "errors",
                "createdAt",
                "updatedAt",
                "jobs",
                "attachments",
                "outputs",
            ),
        ),
    }


_PROBLEM_CONTENT: Final = {"application/problem+json": {"schema": _ref("Problem")}}

_ERRORS: Final = {
    400: "Incorrect parameters, malformed body, or a state refusal (see `code`)",
    401: "Missing or wrong admin bearer token",
    403: "The job is not associated to this video",
    404: "Unknown runner, job, video, file or token (see `code`), or no such path",
    405: "Method not allowed on this path",
    409: "Lost an accept race (`code` runner_job_not_in_pending_state)",
    413: "Body, field or upload larger than the configured limit",
    415: "Unsupported request content type",
    416: "Range not satisfiable",
}


def _problems(*statuses: int) -> dict[str, Any]:
    # 404 and 405 can answer any path: a path parameter holding `/` routes elsewhere.
    return {
        str(status): {"description": _ERRORS[status], "content": _PROBLEM_CONTENT}
        for status in sorted({*statuses, 404, 405})
    }


def _json_response(schema: Schema, description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_NO_CONTENT: Final = {"204": {"description": "Done, no body"}}
_BODY_ERRORS: Final = (400, 413, 415)


def _body(
    properties: dict[str, Schema],
    required: tuple[str, ...],
    *,
    flat_properties: dict[str, Schema] | None = None,
    multipart: Schema | None = None,
) -> dict[str, Any]:
    """A request body in JSON and flat urlencoded (spec §2.1), optionally multipart too."""
    flat = flat_properties if flat_properties is not None else properties
    content: dict[str, Any] = {
        "application/json": {"schema": _object(properties, required)},
        "application/x-www-form-urlencoded": {"schema": _object(flat, required)},
    }
    if multipart is not None:
        content["multipart/form-data"] = {"schema": multipart}
    return {"required": True, "content": content}


def _path_param(name: str, schema: Schema, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema, "description": description}


def _query_param(name: str, schema: Schema, description: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
        **extra,
    }


_JOB_UUID_PARAM: Final = _path_param(
    "jobUUID", {"type": "string", "pattern": _UUID_PATTERN}, "Job UUID, lower-case canonical form."
)
_ADMIN_JOB_UUID_PARAM: Final = _path_param(
    "jobUUID",
    {
        "type": "string",
        "pattern": "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
    },
    "Job UUID (any case).",
)
_PAGE_PARAMS: Final = [
    _query_param("start", {"type": "integer", "minimum": 0, "maximum": 2**62}, "Offset of the first row."),
    _query_param("count", {"type": "integer", "minimum": 0, "maximum": 100, "default": 15}, "Rows per page."),
]


def _sort_param(fields: list[str]) -> dict[str, Any]:
    values = [prefix + f for f in fields for prefix in ("", "-")]
    return _query_param("sort", {"type": "string", "enum": values, "default": "-createdAt"}, "Sort order.")


def _op(
    summary: str,
    tag: str,
    responses: dict[str, Any],
    *,
    security: list[dict[str, list[str]]],
    parameters: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
    body_credentials: tuple[str, ...] = (),
    operation_id: str,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": operation_id,
        "summary": summary,
        "tags": [tag],
        "security": security,
        "responses": responses,
    }
    if parameters:
        op["parameters"] = parameters
    if body is not None:
        op["requestBody"] = body
    if body_credentials:
        # OpenAPI security schemes cannot live in a body; this says which body fields are credentials.
        op["x-body-credentials"] = list(body_credentials)
        op["description"] = (
            "Authenticated by " + " and ".join(f"`{c}`" for c in body_credentials) + " in the request body."
        )
    return op


# ------------------------------------------------------------------------------------------ runner API

_RUNNERS: Final = "/api/v1/runners"
_FILES: Final = _RUNNERS + "/jobs/{jobUUID}/files/videos/{videoId}"
_VIDEO_ID_PATTERN: Final = (
    "^([+-]?[0-9]+"
    "|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-4[0-9a-fA-F]{3}-[89abAB][0-9a-fA-F]{3}-[0-9a-fA-F]{12}"
    "|[1-9a-km-zA-HJ-NP-Z]{22})$"
)
_BINARY: Final = {"type": "string", "format": "binary"}


def _runner_paths() -> dict[str, Any]:
    tokens = {"runnerToken": _RUNNER_TOKEN, "jobToken": _JOB_TOKEN}
    both = ("runnerToken", "jobToken")
    download_responses: dict[str, Any] = {
        "200": {
            "description": "The file's bytes",
            "headers": {
                "Accept-Ranges": {"schema": {"type": "string"}},
                "ETag": {"schema": {"type": "string"}},
            },
            "content": {"*/*": {"schema": _BINARY}},
        },
        "206": {
            "description": "The requested range (`Range: bytes=…`, honoured on POST)",
            "headers": {"Content-Range": {"required": True, "schema": {"type": "string"}}},
            "content": {"*/*": {"schema": _BINARY}},
        },
        **_problems(*_BODY_ERRORS, 403, 416),
    }
    download_params = [
        _JOB_UUID_PARAM,
        _path_param(
            "videoId",
            {"type": "string", "pattern": _VIDEO_ID_PATTERN},
            "The video: an integer id, a UUID (version 4) or a 22-character short UUID, as PeerTube takes"
            " them; anything else answers 400 `Incorrect request parameters: videoId` (after the job"
            " checks).",
        ),
        {
            "name": "Range",
            "in": "header",
            "required": False,
            "schema": {"type": "string", "pattern": "^bytes=[0-9]{0,15}-[0-9]{0,15}$"},
            "description": "Resume a download.",
        },
    ]

    def download(
        summary: str, operation_id: str, extra: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        return {
            "post": _op(
                summary,
                "runner",
                download_responses,
                security=_PUBLIC,
                parameters=download_params + (extra or []),
                body=_body(tokens, both),
                body_credentials=both,
                operation_id=operation_id,
            )
        }

    update_multipart = _object(
        {
            **tokens,
            "progress": {"type": "integer", "minimum": 0, "maximum": 100},
            "payload[type]": {"type": "string", "enum": ["add-chunk", "remove-chunk"]},
            "payload[videoChunkFilename]": {"type": "string", "pattern": "^[a-z0-9-]+\\.ts$"},
            "payload[resolutionPlaylistFilename]": {"type": "string", "pattern": "^[a-z0-9-]+\\.m3u8$"},
            "payload[videoChunkFile]": _BINARY,
            "payload[resolutionPlaylistFile]": _BINARY,
            "payload[masterPlaylistFile]": _BINARY,
        },
        both,
        description="Live chunks and playlists (live jobs only); other jobs send tokens and `progress`.",
    )
    success_multipart = _object(
        {
            **tokens,
            "payload[inputLanguage]": _string(max_len=100),
            "payload[videoFile]": _BINARY,
            "payload[resolutionPlaylistFile]": _BINARY,
            "payload[vttFile]": _BINARY,
            "payload[storyboardFile]": _BINARY,
        },
        both,
        description="The result files of the job's type (spec §7), each in its `payload[<field>]` part.",
    )
    progress = {"type": "integer", "minimum": 0, "maximum": 100}
    return {
        _RUNNERS + "/register": {
            "post": _op(
                "Register a runner with a registration token",
                "runner",
                {
                    "200": _json_response(
                        _object(
                            {"id": {"type": "integer"}, "runnerToken": {"type": "string"}},
                            ("id", "runnerToken"),
                        )
                    ),
                    **_problems(*_BODY_ERRORS),
                },
                security=_PUBLIC,
                body=_body(
                    {
                        "registrationToken": _string(),
                        "name": _string(max_len=100),
                        "description": _string(),
                        "version": {
                            "type": "string",
                            "maxLength": 100,
                            "pattern": "^[0-9]+\\.[0-9]+\\.[0-9]+(-[0-9A-Za-z.-]+)?(\\+[0-9A-Za-z.-]+)?$",
                        },
                    },
                    ("registrationToken", "name"),
                ),
                body_credentials=("registrationToken",),
                operation_id="registerRunner",
            )
        },
        _RUNNERS + "/unregister": {
            "post": _op(
                "Unregister this runner; its processing jobs are re-queued",
                "runner",
                {**_NO_CONTENT, **_problems(*_BODY_ERRORS)},
                security=_PUBLIC,
                body=_body({"runnerToken": _RUNNER_TOKEN}, ("runnerToken",)),
                body_credentials=("runnerToken",),
                operation_id="unregisterRunner",
            )
        },
        _RUNNERS + "/jobs/request": {
            "post": _op(
                "Up to 10 pending jobs, by priority",
                "runner",
                {
                    "200": _json_response(
                        _object(
                            {
                                "availableJobs": {
                                    "type": "array",
                                    "maxItems": 10,
                                    "items": _ref("AvailableJob"),
                                }
                            },
                            ("availableJobs",),
                        )
                    ),
                    **_problems(*_BODY_ERRORS),
                },
                security=_PUBLIC,
                body=_body(
                    {
                        "runnerToken": _RUNNER_TOKEN,
                        "jobTypes": {"type": "array", "items": {"type": "string"}},
                        "version": _string(max_len=100),
                    },
                    ("runnerToken",),
                    # urlencoded bodies are flat: a list cannot be sent that way.
                    flat_properties={"runnerToken": _RUNNER_TOKEN, "version": _string(max_len=100)},
                ),
                body_credentials=("runnerToken",),
                operation_id="requestJobs",
            )
        },
        _RUNNERS + "/jobs/{jobUUID}/accept": {
            "post": _op(
                "Take a pending job: it becomes processing with a new job token",
                "runner",
                {
                    "200": _json_response(_object({"job": _ref("AcceptedJob")}, ("job",))),
                    **_problems(*_BODY_ERRORS, 409),
                },
                security=_PUBLIC,
                parameters=[_JOB_UUID_PARAM],
                body=_body({"runnerToken": _RUNNER_TOKEN}, ("runnerToken",)),
                body_credentials=("runnerToken",),
                operation_id="acceptJob",
            )
        },
        _RUNNERS + "/jobs/{jobUUID}/abort": {
            "post": _op(
                "Give a processing job back (pending again, no failure counted)",
                "runner",
                {**_NO_CONTENT, **_problems(*_BODY_ERRORS)},
                security=_PUBLIC,
                parameters=[_JOB_UUID_PARAM],
                body=_body({**tokens, "reason": _string(max_len=5000)}, (*both, "reason")),
                body_credentials=both,
                operation_id="abortJob",
            )
        },
        _RUNNERS + "/jobs/{jobUUID}/update": {
            "post": _op(
                "Heartbeat and progress: renews the job's lease",
                "runner",
                {**_NO_CONTENT, **_problems(*_BODY_ERRORS)},
                security=_PUBLIC,
                parameters=[_JOB_UUID_PARAM],
                body=_body(
                    {**tokens, "progress": progress, "payload": {"type": "object", "maxProperties": 0}},
                    both,
                    flat_properties={**tokens, "progress": progress},
                    multipart=update_multipart,
                ),
                body_credentials=both,
                operation_id="updateJob",
            )
        },
        _RUNNERS + "/jobs/{jobUUID}/error": {
            "post": _op(
                "Report a failure: pending again after errors 1–4, errored at the 5th",
                "runner",
                {**_NO_CONTENT, **_problems(*_BODY_ERRORS)},
                security=_PUBLIC,
                parameters=[_JOB_UUID_PARAM],
                body=_body({**tokens, "message": _string(max_len=5000)}, (*both, "message")),
                body_credentials=both,
                operation_id="errorJob",
            )
        },
        _RUNNERS + "/jobs/{jobUUID}/success": {
            "post": _op(
                "Hand in the results; a retry with the same job token answers 204 and changes nothing",
                "runner",
                {**_NO_CONTENT, **_problems(*_BODY_ERRORS)},
                security=_PUBLIC,
                parameters=[_JOB_UUID_PARAM],
                body={
                    "required": True,
                    "content": {
                        "multipart/form-data": {"schema": success_multipart},
                        "application/json": {
                            "schema": _object(
                                {**tokens, "payload": _object({"inputLanguage": _string(max_len=100)})}, both
                            )
                        },
                    },
                },
                body_credentials=both,
                operation_id="succeedJob",
            )
        },
        _FILES + "/max-quality": download("Input: the best video file", "downloadMaxQuality"),
        _FILES + "/max-quality/audio": download("Input: the best audio file", "downloadMaxQualityAudio"),
        _FILES + "/previews/max-quality": download("Input: the preview image", "downloadPreview"),
        _FILES + "/studio/task-files/{filename}": download(
            "Input: a studio task file (intro, outro, watermark)",
            "downloadStudioTaskFile",
            [
                _path_param(
                    "filename",
                    {"type": "string", "pattern": "^[a-z0-9-]+\\.[a-z0-9]{1,8}$"},
                    "Task file name.",
                )
            ],
        ),
    }


# ------------------------------------------------------------------------------------------ admin API


def _admin_paths() -> dict[str, Any]:
    def listing(item: str) -> dict[str, Any]:
        return _json_response(
            _object(
                {"total": {"type": "integer", "minimum": 0}, "data": {"type": "array", "items": _ref(item)}},
                ("total", "data"),
            )
        )

    row_id = {"type": "integer", "minimum": 1, "maximum": 2**31 - 1}
    admin = (401, 400)
    job_sort = ["updatedAt", "createdAt", "priority", "state", "progress"]
    return {
        _RUNNERS + "/registration-tokens/generate": {
            "post": _op(
                "Create a registration token (read it with the list)",
                "admin",
                {**_NO_CONTENT, **_problems(401)},
                security=_ADMIN,
                operation_id="generateRegistrationToken",
            )
        },
        _RUNNERS + "/registration-tokens": {
            "get": _op(
                "List registration tokens",
                "admin",
                {"200": listing("RegistrationToken"), **_problems(*admin)},
                security=_ADMIN,
                parameters=[*_PAGE_PARAMS, _sort_param(["createdAt"])],
                operation_id="listRegistrationTokens",
            )
        },
        _RUNNERS + "/registration-tokens/{id}": {
            "delete": _op(
                "Delete a registration token and the runners registered with it",
                "admin",
                {**_NO_CONTENT, **_problems(*admin)},
                security=_ADMIN,
                parameters=[_path_param("id", row_id, "Registration token id.")],
                operation_id="deleteRegistrationToken",
            )
        },
        _RUNNERS: {
            "get": _op(
                "List runners",
                "admin",
                {"200": listing("Runner"), **_problems(*admin)},
                security=_ADMIN,
                parameters=[*_PAGE_PARAMS, _sort_param(["createdAt"])],
                operation_id="listRunners",
            )
        },
        _RUNNERS + "/{runnerId}": {
            "delete": _op(
                "Delete a runner; its processing jobs are re-queued",
                "admin",
                {**_NO_CONTENT, **_problems(*admin)},
                security=_ADMIN,
                parameters=[_path_param("runnerId", row_id, "Runner id.")],
                operation_id="deleteRunner",
            )
        },
        _RUNNERS + "/jobs": {
            "get": _op(
                "List jobs",
                "admin",
                {"200": listing("RunnerJobAdmin"), **_problems(*admin)},
                security=_ADMIN,
                parameters=[
                    *_PAGE_PARAMS,
                    _sort_param(job_sort),
                    _query_param(
                        "search",
                        {"type": "string", "pattern": "^[^\\x00]*$"},
                        "A job UUID (exact), else a substring of the job type or runner name.",
                    ),
                    _query_param(
                        "stateOneOf",
                        {"type": "array", "items": {"type": "integer", "enum": [int(s) for s in JobState]}},
                        "Only jobs in these states.",
                        style="form",
                        explode=True,
                    ),
                    _query_param(
                        "typeOneOf",
                        {"type": "array", "items": _ref("JobType")},
                        "Only jobs of these types.",
                        style="form",
                        explode=True,
                    ),
                ],
                operation_id="listJobs",
            )
        },
        _RUNNERS + "/jobs/unclaimed": {
            "get": _op(
                "List the pending jobs no connected runner takes (a Tuberunner extension)",
                "admin",
                {"200": listing("UnclaimedJob"), **_problems(*admin)},
                security=_ADMIN,
                parameters=list(_PAGE_PARAMS),
                operation_id="listUnclaimedJobs",
            )
        },
        _RUNNERS + "/jobs/{jobUUID}/cancel": {
            "post": _op(
                "Cancel a pending, processing or waiting job; descendants become parent-cancelled",
                "admin",
                {**_NO_CONTENT, **_problems(*admin)},
                security=_ADMIN,
                parameters=[_ADMIN_JOB_UUID_PARAM],
                operation_id="cancelJob",
            )
        },
        _RUNNERS + "/jobs/{jobUUID}": {
            "delete": _op(
                "Delete a job (cancelled first) and its descendants",
                "admin",
                {**_NO_CONTENT, **_problems(*admin)},
                security=_ADMIN,
                parameters=[_ADMIN_JOB_UUID_PARAM],
                operation_id="deleteJob",
            )
        },
    }


# ------------------------------------------------------------------------------------------ ingest API


def _ingest_paths() -> dict[str, Any]:
    video_id = _path_param(
        "videoId", {"type": "string", "minLength": 1, "maxLength": 64}, "Video id (integer) or UUID."
    )
    boolean = {"type": "string", "enum": ["true", "false", "1", "0", "yes", "no", "on"]}
    upload = _object(
        {
            "videofile": _BINARY,
            "previewfile": _BINARY,
            "name": _string(max_len=255),
            "resolutions": {"type": "string", "pattern": "^[0-9]{3,4}(,[0-9]{3,4})*$"},
            "hls": boolean,
            "webVideo": boolean,
            "splitAudio": boolean,
            "storyboard": boolean,
            "transcription": {"type": "string", "pattern": "^(true|false|[a-z]{2,3})$"},
            # Studio edits, applied before transcoding (one studio job first).
            "cutStart": {
                "type": "string",
                "pattern": "^[0-9]{1,6}(\\.[0-9]{1,3})?$",
                "description": "Seconds.",
            },
            "cutEnd": {
                "type": "string",
                "pattern": "^[0-9]{1,6}(\\.[0-9]{1,3})?$",
                "description": "Seconds.",
            },
            "introfile": _BINARY,
            "outrofile": _BINARY,
            "watermarkfile": _BINARY,
        },
        ("videofile",),
    )
    static_file = {
        "200": {"description": "The file", "content": {"*/*": {"schema": _BINARY}}},
        "206": {"description": "The requested range", "content": {"*/*": {"schema": _BINARY}}},
        **_problems(416),
    }
    static_params = [
        _path_param("videoUUID", {"type": "string", "format": "uuid"}, "Video UUID."),
        _path_param("filename", {"type": "string", "minLength": 1, "maxLength": 200}, "File name."),
    ]

    def static(summary: str, operation_id: str, params: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "get": _op(
                summary, "static", static_file, security=_PUBLIC, parameters=params, operation_id=operation_id
            )
        }

    return {
        "/api/v1/videos": {
            "post": _op(
                "Submit a video (multipart upload); its transcoding jobs are created",
                "ingest",
                {
                    "200": _json_response(
                        _object(
                            {
                                "video": _object(
                                    {"id": {"type": "integer"}, "uuid": {"type": "string", "format": "uuid"}},
                                    ("id", "uuid"),
                                )
                            },
                            ("video",),
                        )
                    ),
                    **_problems(401, *_BODY_ERRORS),
                },
                security=_ADMIN,
                body={"required": True, "content": {"multipart/form-data": {"schema": upload}}},
                operation_id="uploadVideo",
            ),
            "get": _op(
                "List videos",
                "ingest",
                {
                    "200": _json_response(
                        _object(
                            {
                                "total": {"type": "integer", "minimum": 0},
                                "data": {"type": "array", "items": _ref("Video")},
                            },
                            ("total", "data"),
                        )
                    ),
                    **_problems(401, 400),
                },
                security=_ADMIN,
                parameters=[*_PAGE_PARAMS, _sort_param(["createdAt"])],
                operation_id="listVideos",
            ),
        },
        "/api/v1/videos/live": {
            "post": _op(
                "Create a live video: publishers push RTMP to `live.rtmpUrl` with `live.streamKey`",
                "ingest",
                {
                    "200": _json_response(
                        _object(
                            {
                                "video": _object(
                                    {"id": {"type": "integer"}, "uuid": {"type": "string", "format": "uuid"}},
                                    ("id", "uuid"),
                                ),
                                "live": _ref("Live"),
                            },
                            ("video", "live"),
                        )
                    ),
                    **_problems(401, *_BODY_ERRORS),
                },
                security=_ADMIN,
                body=_body(
                    {
                        "name": _string(max_len=255),
                        "resolutions": {"type": "string", "pattern": "^[0-9]{3,4}(,[0-9]{3,4})*$"},
                        "saveReplay": {"type": "boolean"},
                        "permanentLive": {"type": "boolean"},
                    },
                    ("name",),
                    flat_properties={
                        "name": _string(max_len=255),
                        "resolutions": {"type": "string", "pattern": "^[0-9]{3,4}(,[0-9]{3,4})*$"},
                        "saveReplay": boolean,
                        "permanentLive": boolean,
                    },
                ),
                operation_id="createLive",
            )
        },
        "/api/v1/videos/live/{videoId}": {
            "get": _op(
                "A live video's live: state, RTMP URL and stream key, HLS URL, replays",
                "ingest",
                {"200": _json_response(_ref("Live")), **_problems(401)},
                security=_ADMIN,
                parameters=[video_id],
                operation_id="getLive",
            )
        },
        "/api/v1/videos/{videoId}": {
            "get": _op(
                "A video: state, jobs, source and outputs",
                "ingest",
                {"200": _json_response(_ref("Video")), **_problems(401)},
                security=_ADMIN,
                parameters=[video_id],
                operation_id="getVideo",
            ),
            "delete": _op(
                "Delete a video, its jobs and files",
                "ingest",
                {**_NO_CONTENT, **_problems(401)},
                security=_ADMIN,
                parameters=[video_id],
                operation_id="deleteVideo",
            ),
        },
        "/static/web-videos/{filename}": static(
            "A web video (`<video uuid>-<resolution>.mp4`)",
            "getWebVideo",
            [_path_param("filename", {"type": "string", "minLength": 1, "maxLength": 200}, "File name.")],
        ),
        "/static/streaming-playlists/hls/{videoUUID}/{filename}": static(
            "An HLS file: master or media playlist, fragmented MP4; of a live: playlists (no-cache) and"
            " MPEG-TS segments (immutable)",
            "getHlsFile",
            static_params,
        ),
        "/static/captions/{videoUUID}/{filename}": static("A caption (WebVTT)", "getCaption", static_params),
        "/static/storyboards/{videoUUID}/{filename}": static(
            "A storyboard sprite sheet", "getStoryboard", static_params
        ),
        "/static/previews/{videoUUID}/{filename}": static(
            "The still of an audio upload", "getPreview", static_params
        ),
    }


# ------------------------------------------------------------------------------------------ dashboard


def _dashboard_paths() -> dict[str, Any]:
    page = {
        "200": {
            "description": "A file of the page (HTML, JavaScript, CSS)",
            "content": {"*/*": {"schema": _BINARY}},
        },
        "304": {"description": "Not modified (ETag)"},
        **_problems(),
    }
    return {
        "/": {
            "get": _op(
                "Redirects to the dashboard",
                "dashboard",
                {
                    "307": {
                        "description": "To `/dashboard/`",
                        "headers": {"Location": {"required": True, "schema": {"type": "string"}}},
                    }
                },
                security=_PUBLIC,
                operation_id="getRoot",
            )
        },
        "/dashboard/": {
            "get": _op(
                "The dashboard page (it asks for the admin token and calls the admin API)",
                "dashboard",
                page,
                security=_PUBLIC,
                operation_id="getDashboard",
            )
        },
        "/dashboard/{path}": {
            "get": _op(
                "A static file of the dashboard",
                "dashboard",
                page,
                security=_PUBLIC,
                parameters=[
                    _path_param("path", {"type": "string", "minLength": 1, "maxLength": 200}, "File path.")
                ],
                operation_id="getDashboardFile",
            )
        },
    }


# ------------------------------------------------------------------------------------------ operations


def _ops_paths() -> dict[str, Any]:
    report = _object(
        {
            "status": {"type": "string", "enum": ["ok", "fail"]},
            "checks": {
                "type": "object",
                "additionalProperties": _object(
                    {"ok": {"type": "boolean"}, "detail": {"type": "string"}}, ("ok", "detail")
                ),
            },
        },
        ("status", "checks"),
    )

    def health(summary: str, operation_id: str) -> dict[str, Any]:
        return {
            "get": _op(
                summary,
                "ops",
                {
                    "200": _json_response(report, "Every check passed"),
                    "503": _json_response(report, "A check failed (the report says which)"),
                },
                security=_PUBLIC,
                operation_id=operation_id,
            )
        }

    return {
        "/healthz": health("Liveness: the event loop turns", "getLiveness"),
        "/readyz": health("Readiness: database, files folder, sockets and loop", "getReadiness"),
        "/metrics": {
            "get": _op(
                "Prometheus metrics (text exposition format)",
                "ops",
                {
                    "200": {
                        "description": "Metrics",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
                security=_PUBLIC,
                operation_id="getMetrics",
            )
        },
    }


# ------------------------------------------------------------------------------------------ document


def openapi_document() -> dict[str, Any]:
    """A fresh copy of the document (callers may change it)."""
    paths = {**_runner_paths(), **_admin_paths(), **_ingest_paths(), **_dashboard_paths(), **_ops_paths()}
    paths[OPENAPI_PATH] = {
        "get": _op(
            "This document",
            "meta",
            {"200": _json_response({"type": "object", "required": ["openapi", "paths"]})},
            security=_PUBLIC,
            operation_id="getOpenApi",
        )
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Tuberunner coordinator",
            "version": "1",
            "description": (
                "PeerTube-compatible remote-runner coordinator. Runner endpoints take their credentials "
                "(`registrationToken`, `runnerToken`, `jobToken`) in the request body, as PeerTube's do; "
                "admin and ingest endpoints take the admin token as a bearer token. Runners are also "
                "pinged through socket.io (namespace `/runners`, path `/socket.io`, `auth.runnerToken`), "
                "which OpenAPI does not describe."
            ),
        },
        "tags": [
            {"name": "runner", "description": "Spec §3: what runners call; tokens in the body."},
            {"name": "admin", "description": "Spec §4: registration tokens, runners, jobs."},
            {"name": "ingest", "description": "Submit videos and follow them."},
            {"name": "static", "description": "Public output files."},
            {"name": "dashboard", "description": "The web page; its data comes from the admin API."},
            {"name": "ops", "description": "Health checks and metrics for operators."},
            {"name": "meta", "description": "This description."},
        ],
        "security": _ADMIN,
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "adminBearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The admin token (`tra-…`), printed once at first start or set by "
                    "TUBERUNNER_ADMIN_TOKEN; only its SHA-256 is stored.",
                }
            },
        },
    }


@cache
def _document_bytes() -> bytes:
    return json.dumps(openapi_document(), separators=(",", ":")).encode()


async def openapi_json(request: Request) -> Response:
    return Response(_document_bytes(), media_type="application/json")


routes: list[BaseRoute] = [Route(OPENAPI_PATH, openapi_json, methods=["GET"])]
