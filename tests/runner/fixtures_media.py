"""Helpers for the transfer, input-cache and processor tests.

* `CoordinatorInputs`: a tiny `InputSource` over httpx (POST + tokens + Range), the same contract as
  `InstanceClient.open_input` in client.py, recording the offsets it was asked for.
* `Seeder`: seeds a video, its source file and jobs into the real coordinator through its in-process objects,
  registers a runner and accepts jobs through the real HTTP API.
* `proxied_env`: all of it behind a `TcpProxy`, plus `FAST` download limits for tests.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from sqlalchemy import insert

from tests.support.protocol import store_video_file, video_folder
from tests.support.servers import RunningCoordinator
from tests.support.tcp_proxy import TcpProxy
from tuberunner.coordinator.models import JobSpec
from tuberunner.coordinator.schema import videos
from tuberunner.protocol.jobs import JobType
from tuberunner.runner.errors import error_from_response, translated
from tuberunner.runner.job import AcceptedJob
from tuberunner.runner.retry import Deadlines, RetryPolicy
from tuberunner.runner.transfers import DownloadLimits

FILES = "/api/v1/runners/jobs/{job}/files/videos/{video}"


@dataclass
class CoordinatorInputs:
    """`InputSource` for tests: POST {runnerToken, jobToken}, `Range: bytes=<offset>-` when offset > 0."""

    http: httpx.AsyncClient
    runner_token: str
    # False: never send Range (plays a server that ignores it: it answers 200 with the whole file).
    send_range: bool = True
    offsets: list[int] = field(default_factory=list)

    @asynccontextmanager
    async def open_input(self, url: str, job: AcceptedJob, offset: int) -> AsyncIterator[httpx.Response]:
        self.offsets.append(offset)
        headers = {"range": f"bytes={offset}-"} if offset > 0 and self.send_range else {}
        body = {"runnerToken": self.runner_token, "jobToken": job.job_token}
        with translated("input download"):
            async with self.http.stream("POST", url, json=body, headers=headers) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise error_from_response(response, context="input download")
                yield response


@dataclass
class SeededVideo:
    uuid: str
    id: int
    jobs: list[str]


class Seeder:
    """Seeds the coordinator; jobs are created PENDING (no parents) and accepted over HTTP."""

    def __init__(self, running: RunningCoordinator, http: httpx.AsyncClient) -> None:
        self.running = running
        self.http = http
        self.c = running.coordinator
        self.runner_token = ""

    async def register(self, name: str = "transfer-tests") -> str:
        reg = await self.c.runners.create_registration_token()
        r = await self.http.post("/api/v1/runners/register", json={"registrationToken": reg, "name": name})
        assert r.status_code == 200, r.text
        self.runner_token = str(r.json()["runnerToken"])
        return self.runner_token

    async def video(self, data: bytes, *, name: str = "source.mp4", jobs: int = 1) -> SeededVideo:
        video_uuid = str(uuid.uuid4())
        async with self.c.db.write() as conn:
            result = await conn.execute(
                insert(videos).values(
                    uuid=video_uuid, name="v", state="processing", options={}, created_at=0.0, updated_at=0.0
                )
            )
            video_id = int(result.inserted_primary_key[0])  # type: ignore[index]
        await self.put(video_id, video_uuid, "source", name, data, resolution=240)
        job_uuids = [str(uuid.uuid4()) for _ in range(jobs)]
        specs = [
            JobSpec(
                job_uuid,
                JobType.VOD_WEB_VIDEO,
                100,
                {
                    "input": {"videoFileUrl": FILES.format(job=job_uuid, video=video_uuid) + "/max-quality"},
                    "output": {"resolution": 240, "fps": 25},
                },
                {"videoUUID": video_uuid, "isNewVideo": True},
            )
            for job_uuid in job_uuids
        ]
        await self.c.jobs.create(video_id, specs)
        return SeededVideo(video_uuid, video_id, job_uuids)

    async def put(
        self,
        video_id: int,
        video_uuid: str,
        kind: str,
        name: str,
        data: bytes,
        *,
        resolution: int | None = None,
    ) -> Path:
        await store_video_file(self.c, video_id, video_uuid, kind, name, data, resolution=resolution, fps=25)
        return video_folder(self.c, video_uuid) / name

    async def accept(self, job_uuid: str, http: httpx.AsyncClient | None = None) -> AcceptedJob:
        client = http or self.http
        r = await client.post(
            f"/api/v1/runners/jobs/{job_uuid}/accept", json={"runnerToken": self.runner_token}
        )
        assert r.status_code == 200, r.text
        job = r.json()["job"]
        return AcceptedJob(
            uuid=job["uuid"],
            type=JobType(job["type"]),
            payload=job["payload"],
            job_token=job["jobToken"],
            instance_url=str(client.base_url).rstrip("/"),
        )


def video_url(job: AcceptedJob) -> str:
    return str(job.payload["input"]["videoFileUrl"])


# ---------------------------------------------------------------------------------------------- env

FAST = DownloadLimits(
    deadlines=Deadlines(connect_s=2, read_s=1, write_s=2, pool_s=2),
    retry=RetryPolicy(attempts=5, base_delay_s=0.01, max_delay_s=0.05),
    base_s=30,
)


@dataclass
class Env:
    """A registered runner on the real coordinator, reached through a `TcpProxy`."""

    seeder: Seeder
    proxy: TcpProxy
    http: httpx.AsyncClient  # through the proxy, one connection per request
    inputs: CoordinatorInputs

    async def job(self, data: bytes) -> AcceptedJob:
        video = await self.seeder.video(data)
        # Accepted through the proxy, so the payload's URLs point at it.
        return await self.seeder.accept(video.jobs[0], http=self.http)


@asynccontextmanager
async def proxied_env(coordinator: RunningCoordinator) -> AsyncIterator[Env]:
    port = urlsplit(coordinator.url).port
    assert port is not None
    async with (
        httpx.AsyncClient(base_url=coordinator.url) as direct,
        TcpProxy("127.0.0.1", port) as proxy,
        # No keep-alive: each request is a new connection, so it takes the next plan of the proxy.
        httpx.AsyncClient(
            base_url=proxy.url,
            timeout=FAST.deadlines.timeout(),
            limits=httpx.Limits(max_keepalive_connections=0),
        ) as http,
    ):
        seeder = Seeder(coordinator, direct)
        token = await seeder.register()
        yield Env(seeder, proxy, http, CoordinatorInputs(http, token))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []
