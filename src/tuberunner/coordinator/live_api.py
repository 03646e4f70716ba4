"""Live videos through the ingest API (admin token), and their public HLS files.

    POST /api/v1/videos/live          name, resolutions ("480,240"), saveReplay, permanentLive
                                      → {"video": {"id", "uuid"}, "live": {...}}
    GET  /api/v1/videos/live/{id}     the live: state, rtmpUrl, streamKey, hlsUrl, settings, replays

The `live` object uses PeerTube's names where PeerTube has them (`rtmpUrl`, `streamKey`, `saveReplay`,
`permanentLive`). Publishers push to `rtmpUrl` with `streamKey` as the stream name; viewers read
`hlsUrl`, served with `Cache-Control: no-cache` for playlists (they change every segment) and
`public, max-age=31536000, immutable` for segments (a name is never reused with other bytes).
"""

from __future__ import annotations

import re
import uuid as uuidlib
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from tuberunner.coordinator.bodies import read_body
from tuberunner.coordinator.context import Coordinator, base_url_of, coordinator_of
from tuberunner.coordinator.file_responses import media_type_for
from tuberunner.coordinator.live import Live
from tuberunner.coordinator.problems import BadRequest, NotFound, invalid_params
from tuberunner.media.profiles import VOD_RESOLUTIONS
from tuberunner.protocol.errors import Message

_NAME_MAX: Final = 255
_BOOLEANS: Final = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False}
_DIGITS: Final = re.compile(r"^[0-9]{1,9}$")
PLAYLIST_CACHE: Final = "no-cache"
SEGMENT_CACHE: Final = "public, max-age=31536000, immutable"


async def create_live(request: Request) -> Response:
    c = coordinator_of(request)
    c.admin.check(request)
    if not c.live.enabled:
        raise BadRequest("Live is off on this coordinator (started with --rtmp-port 0)")
    async with read_body(
        request,
        uploads_dir=c.config.uploads_dir,
        max_json_bytes=c.config.max_json_body_bytes,
        max_upload_bytes=0,
    ) as body:
        fields = body.fields
    bad: dict[str, str] = {}
    name = fields.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > _NAME_MAX:
        bad["name"] = f"A name of 1 to {_NAME_MAX} characters"
    resolutions = _resolutions(fields.get("resolutions"), bad)
    save_replay = _boolean(fields, "saveReplay", bad)
    permanent = _boolean(fields, "permanentLive", bad)
    if bad:
        raise invalid_params(list(bad), bad)
    assert isinstance(name, str)
    live = await c.live.create(name.strip(), resolutions, save_replay=save_replay, permanent=permanent)
    base_url = base_url_of(request)
    return JSONResponse(
        {"video": {"id": live.video_id, "uuid": live.video_uuid}, "live": c.live.describe(live, base_url)}
    )


async def get_live(request: Request) -> Response:
    c = coordinator_of(request)
    c.admin.check(request)
    live = await _find_live(c, str(request.path_params["video_id"]))
    return JSONResponse(c.live.describe(live, base_url_of(request)))


async def _find_live(c: Coordinator, ident: str) -> Live:
    found: Live | None = None
    if _DIGITS.match(ident):
        found = (await c.live.of_videos([int(ident)])).get(int(ident))
    elif _is_uuid(ident):
        found = await c.live.by_video_uuid(ident)
    if found is None:
        raise NotFound(Message.VIDEO_NOT_FOUND)
    return found


def live_file_response(c: Coordinator, video_uuid: str, filename: str, request: Request) -> Response:
    """A public file of a live's HLS (the caller checked the video is a live)."""
    path = c.live.files.servable(video_uuid, filename)
    if path is None:
        raise NotFound("File not found")
    response: Response
    if path.suffix == ".m3u8":
        # A playlist is renamed over at every segment: read whole (it is small), its length and its body
        # come from one version. A file response would take them from two when a rename falls between.
        try:
            body = path.read_bytes()
        except FileNotFoundError:
            raise NotFound("File not found") from None
        response = Response(body, media_type=media_type_for(path.name))
    else:
        response = FileResponse(path, media_type=media_type_for(path.name))
    response.headers["access-control-allow-origin"] = "*"
    response.headers["cache-control"] = PLAYLIST_CACHE if path.suffix == ".m3u8" else SEGMENT_CACHE
    return response


def _is_uuid(value: str) -> bool:
    try:
        return str(uuidlib.UUID(value)) == value
    except ValueError:
        return False


def _boolean(fields: dict[str, Any], name: str, bad: dict[str, str]) -> bool:
    value = fields.get(name)
    if value is None or value == "":
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _BOOLEANS:
        return _BOOLEANS[value.strip().lower()]
    bad[name] = "true or false"
    return False


def _resolutions(raw: Any, bad: dict[str, str]) -> tuple[int, ...] | None:
    if raw is None or raw == "":
        return None
    allowed = {r for r in VOD_RESOLUTIONS if r > 0}
    parts: list[Any]
    if isinstance(raw, str):
        parts = [p.strip() for p in raw.split(",") if p.strip()]
    elif isinstance(raw, list):
        parts = raw
    else:
        parts = []
    try:
        parsed = tuple(sorted({int(p) for p in parts if not isinstance(p, bool)}, reverse=True))
    except (TypeError, ValueError):
        parsed = ()
    if not parsed or not set(parsed) <= allowed or len(parsed) != len(parts):
        bad["resolutions"] = "comma-separated values among " + ",".join(map(str, sorted(allowed)))
        return None
    return parsed


routes: list[BaseRoute] = [
    Route("/api/v1/videos/live", create_live, methods=["POST"]),
    Route("/api/v1/videos/live/{video_id}", get_live, methods=["GET"]),
]
