"""Several coordinator processes on one PostgreSQL, one Redis and one bucket: any process serves any request.

Each coordinator has its own data folder, as on separate machines: a file reaches another process only
through object storage. The S3 server is moto's, over HTTP; the coordinator reaches it through the usual
AWS variables and does not know which server it is.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.coordinator.test_ingest_support import Clips, make_clips, run_all_jobs, upload_ok, video_json
from tests.e2e.conftest import StartRunner, register
from tests.scaleout.conftest import scale_out_config
from tests.support.protocol import admin_headers
from tests.support.s3_server import S3Server
from tests.support.servers import RunningCoordinator, serve_coordinator
from tests.support.tcp_proxy import Plan, TcpProxy
from tuberunner.protocol.jobs import JobState

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

PUBLISH_S = 60.0


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Clips:
    return make_clips(tmp_path_factory.mktemp("scaleout-clips"))


def client_of(running: RunningCoordinator, **options: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=running.url, headers=admin_headers(), timeout=30, **options)


async def published(client: httpx.AsyncClient, video_uuid: str) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + PUBLISH_S
    while True:
        video = await video_json(client, video_uuid)
        if video["state"] != "processing":
            return video
        assert asyncio.get_running_loop().time() < deadline, f"not published in {PUBLISH_S:g} s: {video}"
        await asyncio.sleep(0.2)


async def fetch(url: str, *, follow: bool = True, **headers: str) -> httpx.Response:
    """As a browser or player would: redirects followed."""
    async with httpx.AsyncClient(follow_redirects=follow, timeout=30) as http:
        return await http.get(url, headers=headers)


async def test_upload_on_one_process_runner_on_another_outputs_served_by_both(
    tmp_path: Path, pg_url: str, redis_url: str, bucket: str, clips: Clips, start_runner: StartRunner
) -> None:
    config_a = scale_out_config(tmp_path / "a", pg_url, redis_url, bucket)
    config_b = scale_out_config(tmp_path / "b", pg_url, redis_url, bucket)
    async with serve_coordinator(config_a) as a, serve_coordinator(config_b) as b:
        async with client_of(a) as http_a, client_of(b) as http_b:
            video_uuid = await upload_ok(http_a, clips.short, resolutions="240", storyboard="false")
            # Our runner, registered on B only: downloads are 302s to presigned URLs, results PUT to the
            # bucket directly.
            runner = await start_runner([await register(b.url, "runner-on-b")])
            video = await published(http_a, video_uuid)
            assert video["state"] == "published", video
            assert video["jobs"]["byState"] == {"completed": video["jobs"]["total"]}
            outcomes = [run.outcome for run in runner.supervisor.finished]
            assert outcomes
            assert set(outcomes) == {"succeeded"}, outcomes

            jobs = [await a.coordinator.jobs.get(j["uuid"]) for j in video["jobs"]["list"]]
            keys = [key for job in jobs if job and job.result for key in job.result["files"].values()]
            assert keys
            assert all("/direct-" in key for key in keys), keys  # none went through a coordinator

            # Every output, through either process: a redirect to the bucket (playlists streamed).
            for http in (http_a, http_b):
                outputs = (await video_json(http, video_uuid))["outputs"]
                web = outputs["webVideos"][0]["url"]
                redirect = await fetch(web, follow=False)
                assert redirect.status_code == 302
                assert redirect.headers["location"].startswith(os.environ["AWS_ENDPOINT_URL"])
                answer = await fetch(web)
                assert answer.status_code == 200
                assert answer.content[4:8] == b"ftyp"
                master = await fetch(outputs["hls"]["masterPlaylistUrl"])
                assert master.status_code == 200
                assert master.text.startswith("#EXTM3U")
                rendition = outputs["hls"]["renditions"][0]
                ranged = await fetch(rendition["videoUrl"], Range="bytes=0-99")
                assert ranged.status_code == 206
                assert len(ranged.content) == 100
        # Neither process kept a file of its own: everything is in the bucket.
        for data_dir in (tmp_path / "a", tmp_path / "b"):
            assert not (data_dir / "files").exists()
            assert list((data_dir / "uploads").iterdir()) == []


async def test_two_data_folders_official_runner_way_publishes_without_a_500(
    tmp_path: Path, pg_url: str, redis_url: str, bucket: str, clips: Clips
) -> None:
    """The operator's report: submitted to one process, a runner on the other. The runner here is the
    official runner's way: downloads follow the 302 (POST becomes GET), results are multipart through
    the coordinator, which streams them into the bucket."""
    config_a = scale_out_config(tmp_path / "a", pg_url, redis_url, bucket)
    config_b = scale_out_config(tmp_path / "b", pg_url, redis_url, bucket)
    async with (
        serve_coordinator(config_a) as a,
        serve_coordinator(config_b) as b,
        client_of(a) as http_a,
        client_of(b, follow_redirects=True) as http_b,
    ):
        video_uuid = await upload_ok(http_a, clips.short, resolutions="240", storyboard="false")
        token = await _register(http_b)
        finished = await run_all_jobs(http_b, token, tmp_path / "work")
        assert finished
        video = await video_json(http_a, video_uuid)
        assert video["state"] == "published", video
        jobs = [await b.coordinator.jobs.get(j["uuid"]) for j in finished]
        keys = [key for job in jobs if job and job.result for key in job.result["files"].values()]
        assert keys
        assert not any("/direct-" in key for key in keys)
        assert (await fetch(video["outputs"]["webVideos"][0]["url"])).status_code == 200


async def _register(http: httpx.AsyncClient) -> str:
    (await http.post("/api/v1/runners/registration-tokens/generate")).raise_for_status()
    tokens = (await http.get("/api/v1/runners/registration-tokens")).json()["data"]
    answer = await http.post(
        "/api/v1/runners/register", json={"registrationToken": tokens[0]["registrationToken"], "name": "r"}
    )
    answer.raise_for_status()
    token: str = answer.json()["runnerToken"]
    return token


async def test_unreachable_storage_answers_503_loses_nothing_and_recovers(
    tmp_path: Path, pg_url: str, redis_url: str, bucket: str, clips: Clips, s3_server: S3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    host, port = s3_server.url.removeprefix("http://").split(":")
    async with TcpProxy(host, int(port)) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        config = scale_out_config(tmp_path / "a", pg_url, redis_url, bucket, serve_outputs="stream")
        async with serve_coordinator(config) as a, client_of(a, follow_redirects=True) as http:
            video_uuid = await upload_ok(
                http, clips.short, resolutions="240", storyboard="false", hls="false"
            )
            token = await _register(http)

            def storage_down() -> None:
                proxy.default = Plan.reset_after(0)
                proxy.reset_all()

            # An upload while storage is down: 503 with the cause, nothing recorded, nothing left.
            storage_down()
            refused = await http.post(
                "/api/v1/videos", files={"videofile": ("clip.mp4", clips.short.read_bytes(), "video/mp4")}
            )
            assert refused.status_code == 503, refused.text
            assert refused.headers["content-type"] == "application/problem+json"
            assert refused.headers["retry-after"]
            assert "Storage is unavailable" in refused.json()["detail"]
            assert (await http.get("/api/v1/videos")).json()["total"] == 1
            # An output while storage is down: 503, not a 500.
            assert (await http.get(f"/static/web-videos/{video_uuid}-240.mp4")).status_code in (404, 503)

            # A runner's success while storage is down: 503, the job stays its own; once storage is
            # back the same success lands and the video is published.
            proxy.default = Plan.forward()
            job = await _accept(http, token)
            tokens = {"runnerToken": token, "jobToken": job["jobToken"]}
            download = await http.post(job["payload"]["input"]["videoFileUrl"], json=tokens)
            assert download.status_code == 200
            storage_down()
            result = {"payload[videoFile]": ("web.mp4", clips.short.read_bytes(), "video/mp4")}
            success = f"/api/v1/runners/jobs/{job['uuid']}/success"
            answer = await http.post(success, data=tokens, files=result)
            assert answer.status_code == 503, answer.text
            held = await a.coordinator.jobs.get(job["uuid"])
            assert held is not None
            assert held.state == JobState.PROCESSING
            proxy.default = Plan.forward()
            assert (await http.post(success, data=tokens, files=result)).status_code == 204
            assert (await video_json(http, video_uuid))["state"] == "published"
            served = await http.get(f"/static/web-videos/{video_uuid}-240.mp4")
            assert served.status_code == 200
            assert served.content == clips.short.read_bytes()
            assert list((tmp_path / "a" / "uploads").iterdir()) == []


async def _accept(http: httpx.AsyncClient, token: str) -> dict[str, Any]:
    offers = (await http.post("/api/v1/runners/jobs/request", json={"runnerToken": token})).json()
    uuid = offers["availableJobs"][0]["uuid"]
    accepted = await http.post(f"/api/v1/runners/jobs/{uuid}/accept", json={"runnerToken": token})
    accepted.raise_for_status()
    job: dict[str, Any] = accepted.json()["job"]
    return job


@pytest.mark.parametrize("serve_outputs", ["redirect", "stream"])
async def test_a_file_missing_from_the_bucket_answers_a_404_problem(
    tmp_path: Path, pg_url: str, redis_url: str, bucket: str, clips: Clips, serve_outputs: str
) -> None:
    config = scale_out_config(tmp_path / "a", pg_url, redis_url, bucket, serve_outputs=serve_outputs)
    async with serve_coordinator(config) as a, client_of(a, follow_redirects=True) as http:
        video_uuid = await upload_ok(http, clips.short, resolutions="240", storyboard="false", hls="false")
        token = await _register(http)
        job = await _accept(http, token)
        tokens = {"runnerToken": token, "jobToken": job["jobToken"]}
        video = await a.coordinator.videos.by_uuid(video_uuid)
        assert video is not None
        [source] = [f for f in await a.coordinator.videos.files(video.id) if f.kind == "source"]
        await a.coordinator.storage.delete(source.path)

        missing = await http.post(job["payload"]["input"]["videoFileUrl"], json=tokens)
        assert_missing_problem(missing, source.path)

        result = {"payload[videoFile]": ("web.mp4", clips.short.read_bytes(), "video/mp4")}
        success = await http.post(f"/api/v1/runners/jobs/{job['uuid']}/success", data=tokens, files=result)
        assert success.status_code == 204, success.text
        [web] = [f for f in await a.coordinator.videos.files(video.id) if f.kind == "web-video"]
        await a.coordinator.storage.delete(web.path)
        assert_missing_problem(await http.get(f"/static/web-videos/{web.name}"), web.path)


def assert_missing_problem(answer: httpx.Response, key: str) -> None:
    assert answer.status_code == 404, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    assert "File missing from storage" in answer.json()["detail"]
    assert key in answer.json()["detail"]
