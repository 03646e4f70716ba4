"""The CLI's client helpers: against a real coordinator (run in a thread: they are blocking) and against
`httpx.MockTransport` for the error paths."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.coordinator.test_ingest_support import RUNNERS, Clips, make_clips
from tests.support.servers import ADMIN_TOKEN, RunningCoordinator, free_port
from tuberunner.coordinator.ingest_client import (
    ADMIN_TOKEN_ENV,
    ClientError,
    create_registration_token,
    format_status,
    resolve_admin_token,
    submit,
    video_status,
)

sqlite_only = pytest.mark.parametrize("database_url", [None], ids=["sqlite"])


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Clips:
    return make_clips(tmp_path_factory.mktemp("clips"))


@sqlite_only
async def test_submit_then_status(coordinator: RunningCoordinator, clips: Clips) -> None:
    video = await asyncio.to_thread(
        submit, coordinator.url, ADMIN_TOKEN, clips.short, name="from the CLI", resolutions=[240], hls=False
    )
    assert set(video) == {"id", "uuid"}

    status = await asyncio.to_thread(video_status, coordinator.url, ADMIN_TOKEN, video["uuid"])
    assert status["name"] == "from the CLI"
    assert status["state"] == "processing"
    assert status["options"]["hls"] is False
    assert status["options"]["resolutions"] == [240]
    text = format_status(status)
    assert video["uuid"] in text
    assert "1 pending" in text

    by_id = await asyncio.to_thread(video_status, coordinator.url + "/", ADMIN_TOKEN, str(video["id"]))
    assert by_id["uuid"] == video["uuid"]


@sqlite_only
async def test_http_errors_carry_the_coordinator_detail(
    coordinator: RunningCoordinator, clips: Clips
) -> None:
    with pytest.raises(ClientError, match="failed with 401: Invalid admin token") as caught:
        await asyncio.to_thread(submit, coordinator.url, "wrong", clips.short)
    assert caught.value.status == 401

    with pytest.raises(ClientError, match="not a usable video or audio file") as caught:
        await asyncio.to_thread(submit, coordinator.url, ADMIN_TOKEN, clips.text)
    assert caught.value.status == 400

    with pytest.raises(ClientError, match="failed with 404: Video not found"):
        await asyncio.to_thread(video_status, coordinator.url, ADMIN_TOKEN, "42424242")


@sqlite_only
async def test_registration_token_create_returns_the_new_token(coordinator: RunningCoordinator) -> None:
    first = await asyncio.to_thread(create_registration_token, coordinator.url, ADMIN_TOKEN)
    second = await asyncio.to_thread(create_registration_token, coordinator.url, ADMIN_TOKEN)
    assert first.startswith("ptrrt-")
    assert second.startswith("ptrrt-")
    assert first != second
    async with httpx.AsyncClient(base_url=coordinator.url) as client:
        response = await client.post(f"{RUNNERS}/register", json={"registrationToken": second, "name": "cli"})
    assert response.status_code == 200


def test_unreachable_coordinator_is_a_clear_error(tmp_path: Path) -> None:
    file = tmp_path / "a.mp4"
    file.write_bytes(b"x")
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ClientError, match=f"cannot reach the coordinator at {url}") as caught:
        submit(url, ADMIN_TOKEN, file)
    assert caught.value.status is None
    with pytest.raises(ClientError, match="cannot read"):
        submit(url, ADMIN_TOKEN, tmp_path / "missing.mp4")
    with pytest.raises(ClientError, match="must start with http"):
        video_status("127.0.0.1:9000", ADMIN_TOKEN, "1")


def test_non_json_errors_and_timeouts_are_reported() -> None:
    def proxy_page(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, text="<html>Bad Gateway</html>")

    with pytest.raises(ClientError, match="failed with 502: <html>Bad Gateway</html>"):
        video_status("http://coordinator", ADMIN_TOKEN, "1", transport=httpx.MockTransport(proxy_page))

    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with pytest.raises(ClientError, match="did not answer in time"):
        create_registration_token("http://coordinator", ADMIN_TOKEN, transport=httpx.MockTransport(slow))

    def empty_list(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(204)
        return httpx.Response(200, json={"total": 0, "data": []})

    with pytest.raises(ClientError, match="unexpected answer"):
        create_registration_token(
            "http://coordinator", ADMIN_TOKEN, transport=httpx.MockTransport(empty_list)
        )


def test_the_admin_token_comes_from_the_option_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    with pytest.raises(ClientError, match=ADMIN_TOKEN_ENV):
        resolve_admin_token(None)
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "tra-env")
    assert resolve_admin_token(None) == "tra-env"
    assert resolve_admin_token("tra-option") == "tra-option"


def test_submit_sends_only_the_options_given(tmp_path: Path) -> None:
    seen: list[bytes] = []

    def record(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == f"Bearer {ADMIN_TOKEN}"
        seen.append(request.read())
        return httpx.Response(200, json={"video": {"id": 1, "uuid": "u"}})

    file = tmp_path / "talk.m4a"
    file.write_bytes(b"audio bytes")
    video = submit(
        "http://coordinator",
        ADMIN_TOKEN,
        file,
        split_audio=False,
        transcription="fr",
        transport=httpx.MockTransport(record),
    )
    assert video == {"id": 1, "uuid": "u"}
    [body] = seen
    assert b'name="splitAudio"\r\n\r\nfalse' in body
    assert b'name="transcription"\r\n\r\nfr' in body
    assert b'name="hls"' not in body
    assert b'filename="talk.m4a"' in body
    assert b"audio bytes" in body
