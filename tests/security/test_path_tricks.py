"""Client-supplied names never become paths: upload file names (`success`, ingest), field names, task-file
and static file names with `..`, absolute paths, encoded slashes or NUL are refused or neutralised, and
nothing is ever written outside the data folder."""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import pytest

from tests.coordinator.test_runner_api import FILES, Env
from tests.security.marks import SQLITE_ONLY
from tests.security.multipart import Part, multipart, text
from tests.support.protocol import admin_headers, store_video_file, video_folder
from tuberunner.protocol.jobs import JobState, JobType

JOBS = "/api/v1/runners/jobs"


def _file_names(root: Path) -> set[str]:
    return {name for _, _, files in os.walk(root) for name in files}


def _tricky_names(outside: Path, tag: str) -> list[bytes]:
    """Names that would land outside the data folder if a path were built from them."""
    return [
        f"../../../{tag}-dots.mp4".encode(),
        f"../../../../../../../../../..{outside}/{tag}-deep.mp4".encode(),
        f"{outside}/{tag}-absolute.mp4".encode(),
        f"..\\..\\{tag}-backslash.mp4".encode(),
        f"{tag}-nul\x00.sqlite3".encode(),
        b"..",
        b"/",
        b"",
    ]


def _nothing_outside(tmp_path: Path, env: Env, tag: str) -> None:
    data_dir = env.c.config.data_dir.resolve()
    assert [p.name for p in tmp_path.iterdir()] == [data_dir.name]
    assert not any(tag in name for name in _file_names(data_dir)), "a client-supplied name became a file"
    assert not any(tag in p.name for p in Path("/tmp").iterdir())
    assert list(env.c.config.uploads_dir.iterdir()) == []


@pytest.mark.parametrize("job_type", [JobType.VOD_WEB_VIDEO, JobType.VOD_HLS])
async def test_success_file_names_never_become_paths(env: Env, tmp_path: Path, job_type: JobType) -> None:
    tag = f"escape-{uuid.uuid4().hex[:8]}"
    token = await env.register("r")
    names = _tricky_names(tmp_path, tag)
    for index, filename in enumerate(names):
        seeded = await env.seed(job_type, children=0)
        job_token = await env.accept(token, seeded.parent)
        parts = [text("runnerToken", token), text("jobToken", job_token)]
        for field, (_, (_, content, mime)) in zip(
            ("videoFile", "resolutionPlaylistFile"), env.results(job_type).items(), strict=False
        ):
            parts.append(Part(f"payload[{field}]".encode(), content, filename, mime.encode()))
        body, headers = multipart(parts)
        r = await env.http.post(f"{JOBS}/{seeded.parent}/success", content=body, headers=headers)
        assert r.status_code == 204, (index, r.text)
        assert await env.state(seeded.parent) == JobState.COMPLETED
    # Every stored name is the coordinator's own: the seeded source, `<video uuid>-…` outputs, the master.
    videos = env.c.config.files_dir / "videos"
    for folder in videos.iterdir():
        outputs = {p.name for p in folder.iterdir()} - {"source.mp4", "master.m3u8"}
        assert all(name.startswith(folder.name + "-") for name in outputs), outputs
    _nothing_outside(tmp_path, env, tag)


@SQLITE_ONLY
@pytest.mark.parametrize(
    "field_name",
    [b"payload[../../../escape]", b"payload[videoFile]/../../x", b"../payload[videoFile]", b"payload[]"],
)
async def test_file_parts_under_unexpected_names_are_refused_and_nothing_is_kept(
    env: Env, tmp_path: Path, field_name: bytes
) -> None:
    token = await env.register("r")
    seeded = await env.seed(children=0)
    job_token = await env.accept(token, seeded.parent)
    body, headers = multipart(
        [
            text("runnerToken", token),
            text("jobToken", job_token),
            Part(field_name, b"x" * 10_000, b"escape.mp4", b"video/mp4"),
        ]
    )
    r = await env.http.post(f"{JOBS}/{seeded.parent}/success", content=body, headers=headers)
    assert r.status_code == 400
    assert r.headers["content-type"].startswith("application/problem+json")
    assert await env.state(seeded.parent) == JobState.PROCESSING
    _nothing_outside(tmp_path, env, "escape")


async def test_ingest_upload_names_never_become_paths(
    env: Env, tmp_path: Path, result_files: dict[str, Path]
) -> None:
    tag = f"escape-{uuid.uuid4().hex[:8]}"
    video = result_files["mp4"].read_bytes()
    image = result_files["jpg"].read_bytes()
    for filename in _tricky_names(tmp_path, tag):
        body, headers = multipart(
            [
                Part(b"videofile", video, filename, b"video/mp4"),
                Part(b"previewfile", image, filename, b"image/jpeg"),
                Part(b"introfile", video, filename, b"video/mp4"),
                text("resolutions", "144"),
                text("hls", "false"),
            ]
        )
        r = await env.http.post("/api/v1/videos", content=body, headers={**headers, **admin_headers()})
        assert r.status_code == 200, (filename, r.text)
        video_uuid = r.json()["video"]["uuid"]
        folder = video_folder(env.c, video_uuid)
        # The coordinator's names; a plain extension of the client's (`.mp4`) is kept as a hint, no more.
        names = sorted(p.name for p in folder.iterdir())
        assert len(names) == 3, names
        assert all(re.fullmatch(r"(source|preview|intro-[0-9a-f]{12})(\.[a-z0-9]{1,8})?", n) for n in names)
        shown = await env.http.get(f"/api/v1/videos/{video_uuid}", headers=admin_headers())
        assert "\x00" not in shown.json()["name"]
        assert "/" not in shown.json()["name"]
    _nothing_outside(tmp_path, env, tag)


async def test_a_video_name_is_a_name_not_a_path(
    env: Env, tmp_path: Path, result_files: dict[str, Path]
) -> None:
    tag = f"escape-{uuid.uuid4().hex[:8]}"
    body, headers = multipart(
        [
            Part(b"videofile", result_files["mp4"].read_bytes(), b"clip.mp4", b"video/mp4"),
            text("name", f"../../../../{tmp_path}/{tag}"),
            text("resolutions", "144"),
            text("hls", "false"),
        ]
    )
    r = await env.http.post("/api/v1/videos", content=body, headers={**headers, **admin_headers()})
    assert r.status_code == 200
    shown = await env.http.get(f"/api/v1/videos/{r.json()['video']['uuid']}", headers=admin_headers())
    assert shown.json()["name"] == f"../../../../{tmp_path}/{tag}"
    _nothing_outside(tmp_path, env, tag)


TASK_FILE_NAMES = [
    "..%2F..%2F..%2Fcoordinator.sqlite3",
    "%2E%2E",
    "%2Fetc%2Fpasswd",
    "intro-1.mp4%00.txt",
    "INTRO-1.MP4",
    "intro-1.mp4%2F",
    "..%5C..%5Ccoordinator.sqlite3",
    "source.mp4",
]


@SQLITE_ONLY
@pytest.mark.parametrize("name", TASK_FILE_NAMES)
async def test_task_file_names_outside_the_task_are_refused(env: Env, name: str) -> None:
    token = await env.register("r")
    seeded = await env.seed(JobType.STUDIO, children=0)
    await store_video_file(env.c, seeded.video_id, seeded.video_uuid, "task-file", "intro-1.mp4", b"intro")
    job_token = await env.accept(token, seeded.parent)
    body = {"runnerToken": token, "jobToken": job_token}
    base = FILES.format(job=seeded.parent, video=seeded.video_uuid) + "/studio/task-files/"
    assert (await env.http.post(base + "intro-1.mp4", json=body)).content == b"intro"
    r = await env.http.post(base + name, json=body)
    assert seeded.source_bytes not in r.content
    if r.status_code == 307:  # `name/`: Starlette's redirect to the same URL without the slash
        assert r.headers["location"].endswith("/studio/task-files/" + name.removesuffix("%2F"))
        return
    assert r.status_code in (400, 404), r.text
    assert r.headers["content-type"].startswith("application/problem+json")


@SQLITE_ONLY
async def test_static_urls_reach_only_recorded_outputs_of_their_kind(env: Env) -> None:
    seeded = await env.seed(children=0)
    v = seeded.video_uuid
    for path in (
        f"/static/web-videos/{v}-..%2F..%2F..%2Fcoordinator.sqlite3",
        "/static/web-videos/..%2F..%2Fcoordinator.sqlite3",
        f"/static/web-videos/{v}-720.mp4",  # not produced yet
        f"/static/streaming-playlists/hls/{v}/source.mp4",  # a file of the video, not of that kind
        f"/static/streaming-playlists/hls/{v}/..%2Fsource.mp4",
        f"/static/previews/{v}/source.mp4",
        f"/static/captions/..%2F..%2F/{v}",
        f"/static/storyboards/{v}/%2Fetc%2Fpasswd",
        f"/static/previews/{v}/source.mp4%00.jpg",
    ):
        r = await env.http.get(path)
        assert r.status_code == 404, (path, r.status_code)
        assert seeded.source_bytes not in r.content
        assert b"SQLite format" not in r.content


@SQLITE_ONLY
@pytest.mark.parametrize(
    "path",
    [
        "/dashboard/..%2F..%2F__init__.py",
        "/dashboard/%2e%2e/%2e%2e/openapi.py",
        "/dashboard/..%5C..%5Copenapi.py",
        "/dashboard/%2Fetc%2Fpasswd",
        "/dashboard/index.html%00.py",
    ],
)
async def test_dashboard_files_stay_inside_the_dashboard(env: Env, path: str) -> None:
    r = await env.http.get(path)
    assert r.status_code == 404, (path, r.status_code)
    assert b"import" not in r.content
    assert b"root:" not in r.content
