"""InstanceClient: every kind of answer classified (httpx.MockTransport), deadlines, streamed multipart,
custom uploads, input downloads; then real calls against the real coordinator."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from python_multipart.multipart import parse_options_header

from tests.runner.conftest import job_of, register, seed_job
from tests.support.protocol import create_video
from tests.support.servers import RunningCoordinator
from tuberunner.protocol.jobs import FEATURES_HEADER, RAW_UPLOAD_FEATURE, JobState, JobType
from tuberunner.runner.client import (
    MAX_MESSAGE_CHARS,
    UPLOAD_CHUNK_BYTES,
    InstanceClient,
    clip_message,
)
from tuberunner.runner.errors import (
    JobFailed,
    JobGone,
    RequestRejected,
    RunnerError,
    RunnerUnknown,
    TransientError,
)
from tuberunner.runner.job import AcceptedJob, JobOutput
from tuberunner.runner.retry import Deadlines

URL = "http://instance.test"
JOB = AcceptedJob("0b6e1a5e-5f5e-4f53-9b8e-3b1b1c2f0a11", JobType.VOD_WEB_VIDEO, {}, "ptrjt-1", URL)
Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


def mock_client(handler: Handler, **kwargs: Any) -> InstanceClient:
    return InstanceClient(URL, "ptrt-1", transport=httpx.MockTransport(handler), **kwargs)


def problem(status: int, detail: str, code: str | None = None, **headers: str) -> httpx.Response:
    body: dict[str, Any] = {"status": status, "detail": detail, "error": detail}
    if code:
        body["code"] = code
    return httpx.Response(status, json=body, headers={"content-type": "application/problem+json", **headers})


def answer(response: httpx.Response) -> Handler:
    async def handler(request: httpx.Request) -> httpx.Response:
        return response

    return handler


# ------------------------------------------------------------------------------------------ classification

CASES: list[tuple[str, httpx.Response, type[RunnerError] | None]] = [
    ("204", httpx.Response(204), None),
    ("404 unknown job", problem(404, "Unknown runner job"), JobGone),
    (
        "400 not processing",
        problem(400, 'Job is not in "processing" state', "runner_job_not_in_processing_state"),
        JobGone,
    ),
    ("409 with code", problem(409, "not pending", "runner_job_not_in_pending_state"), JobGone),
    ("409 without code", problem(409, "This job is not in processing state anymore"), JobGone),
    ("404 unknown token", problem(404, "Unknown runner token", "unknown_runner_token"), RunnerUnknown),
    ("400 bad params", problem(400, "Incorrect request parameters: progress"), RequestRejected),
    ("413 proxy page", httpx.Response(413, text="<html>Request Entity Too Large</html>"), RequestRejected),
    ("429", httpx.Response(429, text="Too many requests"), TransientError),
    ("500", problem(500, "Internal error"), TransientError),
    ("502 proxy page", httpx.Response(502, text="<html>Bad gateway</html>"), TransientError),
    ("503", httpx.Response(503), TransientError),
    ("301", httpx.Response(301, headers={"location": "https://instance.test/x"}), RequestRejected),
]


@pytest.mark.parametrize(("name", "response", "expected"), CASES, ids=[c[0] for c in CASES])
async def test_each_answer_of_update_is_classified(
    name: str, response: httpx.Response, expected: type[RunnerError] | None
) -> None:
    async with mock_client(answer(response)) as client:
        if expected is None:
            await client.update(JOB, 10)
        else:
            with pytest.raises(expected) as caught:
                await client.update(JOB, 10)
            assert type(caught.value) is expected
            assert JOB.uuid in caught.value.message


@pytest.mark.parametrize(
    ("response", "answered"),
    [
        (problem(500, "Cannot read properties of undefined"), True),
        (httpx.Response(429, text="Too many requests"), True),
        (httpx.Response(502, text="<html>Bad gateway</html>"), False),
        (httpx.Response(503), False),
        (httpx.Response(504), False),
    ],
    ids=["500", "429", "502", "503", "504"],
)
async def test_a_server_that_answers_an_error_is_told_from_one_behind_a_proxy_that_is_down(
    response: httpx.Response, answered: bool
) -> None:
    async with mock_client(answer(response)) as client:
        with pytest.raises(TransientError) as caught:
            await client.update(JOB, 10)
    assert caught.value.server_answered is answered


async def test_no_answer_at_all_is_an_outage() -> None:
    async def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    async with mock_client(refuse) as client:
        with pytest.raises(TransientError) as caught:
            await client.update(JOB, 10)
    assert not caught.value.server_answered


@pytest.mark.parametrize("progress", [37, None])
async def test_update_is_multipart_text_fields_like_the_official_runner_without_a_payload_part(
    progress: int | None,
) -> None:
    seen: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    async with mock_client(handler) as client:
        await client.update(JOB, progress)
    (request,) = seen
    content_type, options = parse_options_header(request.headers["content-type"])
    assert content_type == b"multipart/form-data"
    body = request.content
    assert int(request.headers["content-length"]) == len(body)
    boundary = options[b"boundary"]
    parts = [p for p in body.split(b"--" + boundary) if p.strip(b"-\r\n")]
    names = []
    for part in parts:
        head, _, value = part.strip(b"\r\n").partition(b"\r\n\r\n")
        assert b"filename=" not in head  # text fields only: no file, no payload
        names.append((head.split(b'name="')[1].split(b'"')[0].decode(), value.decode()))
    expected = [("jobToken", "ptrjt-1"), ("runnerToken", "ptrt-1")]
    if progress is not None:
        expected.insert(0, ("progress", "37"))
    assert names == expected


@pytest.mark.parametrize(
    ("headers", "pushes"),
    [
        ({"X-Tuberunner-Pushes": "tuberunner-jobs-taken-back"}, True),
        ({}, False),
        ({"X-Tuberunner-Pushes": "x"}, False),
    ],
    ids=["advertised", "peertube", "other-events"],
)
async def test_the_server_says_on_request_whether_it_pushes_taken_back_jobs(
    headers: dict[str, str], pushes: bool
) -> None:
    async with mock_client(
        answer(httpx.Response(200, json={"availableJobs": []}, headers=headers))
    ) as client:
        client.pushes_taken_back = not pushes
        await client.request_jobs(frozenset({"vod-hls-transcoding"}), None)
        assert client.pushes_taken_back is pushes


async def test_a_429_carries_its_retry_after() -> None:
    async with mock_client(answer(httpx.Response(429, headers={"retry-after": "7"}))) as client:
        with pytest.raises(TransientError) as caught:
            await client.request_jobs(frozenset({"vod-hls-transcoding"}), "1.0.0")
    assert caught.value.retry_after_s == 7


async def test_a_redirect_names_its_target_instead_of_being_followed() -> None:
    response = httpx.Response(302, headers={"location": "https://sso.example/login?next=secret"})
    async with mock_client(answer(response)) as client:
        with pytest.raises(RequestRejected) as caught:
            await client.request_jobs(frozenset(), None)
    assert "https://sso.example/login" in caught.value.message
    assert "secret" not in caught.value.message


async def test_a_2xx_that_is_not_json_is_rejected_not_crashed_on() -> None:
    response = httpx.Response(200, text="<html>login</html>", headers={"content-type": "text/html"})
    async with mock_client(answer(response)) as client:
        with pytest.raises(RequestRejected, match="not a JSON object"):
            await client.request_jobs(frozenset(), None)


@pytest.mark.parametrize(
    "failure", [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("cut")]
)
async def test_transport_failures_are_transient(failure: httpx.HTTPError) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        raise failure

    async with mock_client(handler) as client:
        with pytest.raises(TransientError):
            await client.accept(JOB.uuid)


async def test_a_call_that_never_ends_hits_the_whole_call_deadline() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async with mock_client(handler, call_timeout_s=0.05) as client:
        with pytest.raises(TransientError, match=r"within 0\.05 s"):
            await client.abort(JOB, "Runner stopped")


async def test_request_jobs_sends_types_and_version_and_skips_malformed_entries() -> None:
    seen: list[dict[str, Any]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/v1/runners/jobs/request"
        seen.append(json.loads(request.content))
        jobs = [
            {"uuid": "a", "type": "vod-hls-transcoding", "payload": {"input": {}}},
            {"uuid": "b", "type": 3},
            {"uuid": "c", "type": "strange-new-type", "payload": {}},
        ]
        return httpx.Response(200, json={"availableJobs": jobs})

    async with mock_client(handler) as client:
        offers = await client.request_jobs(frozenset({"vod-hls-transcoding", "video-transcription"}), "1.2.3")
    assert seen == [
        {
            "runnerToken": "ptrt-1",
            "jobTypes": ["video-transcription", "vod-hls-transcoding"],
            "version": "1.2.3",
        }
    ]
    assert [(o.uuid, o.type) for o in offers] == [("a", "vod-hls-transcoding"), ("c", "strange-new-type")]


@pytest.mark.parametrize("length", [0, 12, 6000, 100_000])
async def test_error_messages_are_clipped_to_1_to_5000_characters(length: int) -> None:
    sent: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content)["message"])
        return httpx.Response(204)

    message = ("head " + "x" * length + " tail")[: max(length, 0)] if length else "  "
    async with mock_client(handler) as client:
        await client.error(JOB, message)
    assert 1 <= len(sent[0]) <= MAX_MESSAGE_CHARS
    if length > MAX_MESSAGE_CHARS:
        assert sent[0].startswith("head ")
        assert sent[0].endswith(message[-100:])


def test_clip_keeps_short_messages_whole() -> None:
    assert clip_message("ffmpeg exited with code 1") == "ffmpeg exited with code 1"


# ------------------------------------------------------------------------------------------ uploads


def multipart_parts(request: httpx.Request, body: bytes) -> dict[str, tuple[dict[str, str], bytes]]:
    """name → (headers, content) of a multipart body, parsed by hand (what a server sees)."""
    _, params = parse_options_header(request.headers["content-type"])
    boundary = params[b"boundary"]
    parts: dict[str, tuple[dict[str, str], bytes]] = {}
    for chunk in body.split(b"--" + boundary)[1:-1]:
        head, _, content = chunk[2:].partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        _, disposition = parse_options_header(headers["Content-Disposition"])
        parts[disposition[b"name"].decode()] = (
            {"filename": disposition.get(b"filename", b"").decode(), **headers},
            content[:-2],
        )
    assert body.endswith(b"--" + boundary + b"--\r\n")
    return parts


async def test_success_streams_files_in_bounded_chunks_with_an_exact_length(tmp_path: Path) -> None:
    video = tmp_path / "out.mp4"
    video.write_bytes(bytes(range(256)) * (3 * UPLOAD_CHUNK_BYTES // 256 + 7))
    vtt = tmp_path / "captions"  # no suffix: the field's default one is used
    vtt.write_text("WEBVTT\n")
    seen: dict[str, Any] = {}

    class ChunkRecorder(httpx.AsyncBaseTransport):
        """Reads the body as a server would, chunk by chunk (MockTransport reads it whole first)."""

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            chunks = [chunk async for chunk in request.stream]  # type: ignore[union-attr]
            seen.update(request=request, body=b"".join(chunks), largest=max(len(c) for c in chunks))
            return httpx.Response(204)

    output = JobOutput(files={"videoFile": video, "vttFile": vtt}, fields={"inputLanguage": "fr"})
    async with InstanceClient(URL, "ptrt-1", transport=ChunkRecorder()) as client:
        await client.success(JOB, output)
    request, body = seen["request"], seen["body"]
    assert request.url.path == f"/api/v1/runners/jobs/{JOB.uuid}/success"
    assert int(request.headers["content-length"]) == len(body)
    assert seen["largest"] <= UPLOAD_CHUNK_BYTES
    parts = multipart_parts(request, body)
    assert parts["runnerToken"][1] == b"ptrt-1"
    assert parts["jobToken"][1] == b"ptrjt-1"
    assert parts["payload[inputLanguage]"][1] == b"fr"
    headers, content = parts["payload[videoFile]"]
    assert (headers["filename"], headers["Content-Type"]) == ("out.mp4", "video/mp4")
    assert content == video.read_bytes()
    headers, content = parts["payload[vttFile]"]
    assert (headers["filename"], headers["Content-Type"]) == ("captions.vtt", "text/vtt")


async def test_a_missing_result_file_is_a_job_failure(tmp_path: Path) -> None:
    async with mock_client(answer(httpx.Response(204))) as client:
        with pytest.raises(JobFailed, match="missing"):
            await client.success(JOB, JobOutput(files={"videoFile": tmp_path / "nothing.mp4"}))


async def test_custom_upload_targets_get_their_file_first_and_success_goes_without_it(tmp_path: Path) -> None:
    video, playlist = tmp_path / "v.mp4", tmp_path / "v.m3u8"
    video.write_bytes(b"video bytes")
    playlist.write_text("#EXTM3U\n")
    job = AcceptedJob(
        JOB.uuid,
        JobType.VOD_HLS,
        {"output": {"videoFileCustomUpload": {"url": "http://storage.test/put?sig=abc", "method": "PUT"}}},
        "ptrjt-1",
        URL,
    )
    calls: list[tuple[str, str, dict[str, tuple[dict[str, str], bytes]]]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        body = b"".join([chunk async for chunk in request.stream])  # type: ignore[union-attr]
        calls.append((request.method, str(request.url), multipart_parts(request, body)))
        return httpx.Response(200 if request.url.host == "storage.test" else 204)

    output = JobOutput(files={"videoFile": video, "resolutionPlaylistFile": playlist})
    async with mock_client(handler) as client:
        await client.success(job, output)
    (method, url, parts), (_, success_url, success_parts) = calls
    assert (method, url) == ("PUT", "http://storage.test/put?sig=abc")
    assert list(parts) == ["file"]
    assert parts["file"][1] == b"video bytes"
    assert success_url.endswith("/success")
    assert "payload[videoFile]" not in success_parts
    assert success_parts["payload[resolutionPlaylistFile]"][1] == b"#EXTM3U\n"


async def test_a_target_marked_raw_gets_the_file_itself_as_the_body(tmp_path: Path) -> None:
    """A Tuberunner coordinator's presigned object-storage URL: the bytes as they are, sized, typed; the
    feature that earns such targets is announced on every call."""
    video = tmp_path / "v.mp4"
    video.write_bytes(b"raw video bytes" * 1000)
    target = {"url": "http://storage.test/bucket/key?X-Amz-Signature=abc", "method": "PUT", "body": "raw"}
    job = AcceptedJob(
        JOB.uuid, JobType.VOD_WEB_VIDEO, {"output": {"videoFileCustomUpload": target}}, "ptrjt-1", URL
    )
    calls: list[tuple[httpx.Request, bytes]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        body = b"".join([chunk async for chunk in request.stream])  # type: ignore[union-attr]
        calls.append((request, body))
        return httpx.Response(200 if request.url.host == "storage.test" else 204)

    async with mock_client(handler) as client:
        await client.success(job, JobOutput(files={"videoFile": video}))
    (put, put_body), (success, success_body) = calls
    assert (put.method, str(put.url)) == ("PUT", target["url"])
    assert put_body == video.read_bytes()
    assert put.headers["content-length"] == str(video.stat().st_size)
    assert put.headers["content-type"] == "video/mp4"
    assert success.url.path.endswith("/success")
    assert "payload[videoFile]" not in multipart_parts(success, success_body)
    assert success.headers[FEATURES_HEADER] == RAW_UPLOAD_FEATURE


async def test_a_rejected_custom_upload_stops_before_success(tmp_path: Path) -> None:
    video = tmp_path / "v.mp4"
    video.write_bytes(b"v")
    job = AcceptedJob(
        JOB.uuid,
        JobType.VOD_WEB_VIDEO,
        {"output": {"videoFileCustomUpload": {"url": "http://storage.test/p", "method": "POST"}}},
        "ptrjt-1",
        URL,
    )
    urls: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        urls.append(f"{request.method} {request.url}")
        return httpx.Response(403, text="<Error>AccessDenied</Error>")

    async with mock_client(handler) as client:
        with pytest.raises(RequestRejected, match=r"storage\.test"):
            await client.success(job, JobOutput(files={"videoFile": video}))
    assert urls == ["POST http://storage.test/p"]


# ------------------------------------------------------------------------------------------ downloads


async def test_open_input_posts_tokens_asks_a_range_and_follows_redirects() -> None:
    seen: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "instance.test":
            return httpx.Response(302, headers={"location": "http://objects.test/file.mp4"})
        return httpx.Response(206, content=b"world", headers={"content-range": "bytes 6-10/11"})

    url = f"{URL}/api/v1/runners/jobs/{JOB.uuid}/files/videos/v1/max-quality"
    async with mock_client(handler) as client, client.open_input(url, JOB, 6) as response:
        assert response.status_code == 206
        assert await response.aread() == b"world"
    first, second = seen
    assert (first.method, json.loads(first.content)) == (
        "POST",
        {"runnerToken": "ptrt-1", "jobToken": "ptrjt-1"},
    )
    assert first.headers["range"] == "bytes=6-"
    assert (second.method, second.headers["range"]) == ("GET", "bytes=6-")


async def test_open_input_classifies_error_answers_before_yielding() -> None:
    async with mock_client(answer(problem(404, "Unknown runner job"))) as client:
        with pytest.raises(JobGone):
            async with client.open_input(f"{URL}/x", JOB, 0):
                raise AssertionError("must not be reached")


# ------------------------------------------------------------------------------------------ real coordinator


async def test_register_twice_with_one_name_is_refused_and_a_bad_token_too(
    coordinator: RunningCoordinator,
) -> None:
    await register(coordinator, "twin")
    token = await coordinator.coordinator.runners.create_registration_token()
    async with InstanceClient(coordinator.url) as client:
        with pytest.raises(RequestRejected, match="already exists"):
            await client.register(token, "twin")
        with pytest.raises(RequestRejected, match="Registration token is invalid"):
            await client.register("ptrrt-unknown", "other")


async def test_full_job_cycle_against_the_coordinator(coordinator: RunningCoordinator, clip: Path) -> None:
    instance = await register(coordinator, "cycle")
    done, aborted, failed = [await seed_job(coordinator) for _ in range(3)]
    async with InstanceClient(coordinator.url, instance.runner_token) as client:
        offers = await client.request_jobs(frozenset({str(JobType.VOD_WEB_VIDEO)}), "1.0.0")
        assert {o.uuid for o in offers} == {done, aborted, failed}
        assert await client.request_jobs(frozenset({str(JobType.STORYBOARD)}), None) == []

        job = await client.accept(done)
        assert job.type == JobType.VOD_WEB_VIDEO
        assert job.job_token.startswith("ptrjt-")
        assert job.payload["input"]["videoFileUrl"].startswith(coordinator.url)
        with pytest.raises(JobGone):
            await client.accept(done)  # already ours: a lost race for anyone else
        await client.update(job, 37)
        assert (await job_of(coordinator, done)).progress == 37  # type: ignore[union-attr]
        await client.success(job, JobOutput(files={"videoFile": clip}))
        assert (await job_of(coordinator, done)).state == JobState.COMPLETED  # type: ignore[union-attr]

        second = await client.accept(aborted)
        await client.abort(second, "Runner stopped")
        assert (await job_of(coordinator, aborted)).state == JobState.PENDING  # type: ignore[union-attr]
        with pytest.raises(JobGone):
            await client.update(second, 50)  # its token is void now

        third = await client.accept(failed)
        await client.error(third, "x" * 9000)  # clipped, so accepted
        after = await job_of(coordinator, failed)
        assert after is not None
        assert (after.state, after.failures) == (JobState.PENDING, 1)

        await client.unregister()
        with pytest.raises(RunnerUnknown):
            await client.request_jobs(frozenset(), None)


async def test_open_input_resumes_with_range_on_the_coordinator(coordinator: RunningCoordinator) -> None:
    instance = await register(coordinator, "reader")
    job_uuid = await seed_job(coordinator)
    async with InstanceClient(
        coordinator.url, instance.runner_token, deadlines=Deadlines(read_s=5)
    ) as client:
        job = await client.accept(job_uuid)
        url = job.payload["input"]["videoFileUrl"]
        async with client.open_input(url, job, 0) as whole:
            content = await whole.aread()
        async with client.open_input(url, job, 10) as rest:
            assert rest.status_code == 206
            assert await rest.aread() == content[10:]
    assert content  # the seeded source file


async def test_success_on_a_deleted_job_is_job_gone(coordinator: RunningCoordinator, tmp_path: Path) -> None:
    instance = await register(coordinator, "late")
    job_uuid = await seed_job(coordinator)
    await create_video(coordinator)  # unrelated rows do not matter
    async with InstanceClient(coordinator.url, instance.runner_token) as client:
        job = await client.accept(job_uuid)
        row = await job_of(coordinator, job_uuid)
        assert row is not None
        await coordinator.coordinator.jobs.delete(row)
        result = tmp_path / "r.mp4"
        result.write_bytes(b"r")
        with pytest.raises(JobGone):
            await client.success(job, JobOutput(files={"videoFile": result}))
