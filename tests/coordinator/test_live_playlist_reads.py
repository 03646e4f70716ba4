"""A live playlist read while the coordinator replaces it (at every segment): whole, old or new, never a
broken answer."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from tests.support.servers import RunningCoordinator
from tuberunner.coordinator.live_files import write_atomically


@pytest.fixture
def database_url() -> None:
    """Files only: SQLite is enough."""
    return None


async def test_a_playlist_replaced_while_it_is_read_is_served_whole(coordinator: RunningCoordinator) -> None:
    live = await coordinator.coordinator.live.create("replaced", None, save_replay=False, permanent=False)
    folder = coordinator.coordinator.live.files.folder(live.video_uuid)
    folder.mkdir(parents=True, exist_ok=True)
    versions = [b"#EXTM3U\n" + b"#EXTINF:2.0,\n0-000001.ts\n" * size for size in (1, 40)]
    playlist = folder / "0.m3u8"
    write_atomically(playlist, versions[0])
    stop = threading.Event()

    def replace_again_and_again() -> None:
        count = 0
        while not stop.is_set():
            count += 1
            write_atomically(playlist, versions[count % 2])
            time.sleep(0.001)  # leave the event loop's thread some time

    writer = threading.Thread(target=replace_again_and_again)
    writer.start()
    try:
        async with httpx.AsyncClient(base_url=coordinator.url, timeout=10) as http:
            url = f"/static/streaming-playlists/hls/{live.video_uuid}/0.m3u8"
            for _ in range(40):
                answer = await http.get(url)
                assert answer.status_code == 200
                assert answer.content in versions
                assert answer.headers["cache-control"] == "no-cache"
    finally:
        stop.set()
        await asyncio.to_thread(writer.join)
