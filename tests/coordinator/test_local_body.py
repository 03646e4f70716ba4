"""`local_body`: the one-shot mode's input handed to the ingest as an upload would be, by a link."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tuberunner.coordinator.bodies import local_body
from tuberunner.coordinator.problems import PayloadTooLarge

_LIMIT = 1024**3


async def test_a_file_is_linked_into_the_uploads_and_removed_unless_claimed(tmp_path: Path) -> None:
    source = tmp_path / "input.mp4"
    source.write_bytes(b"not media, but bytes" * 100)
    uploads = tmp_path / "uploads"

    async with local_body(uploads, {"name": "x"}, {"videofile": source}, max_upload_bytes=_LIMIT) as body:
        upload = body.files["videofile"]
        assert upload.path.parent == uploads
        assert os.path.samefile(upload.path, source)  # no copy of the bytes
        assert (upload.filename, upload.size) == ("input.mp4", source.stat().st_size)
        assert body.fields == {"name": "x"}

    assert list(uploads.iterdir()) == []
    assert source.read_bytes() == b"not media, but bytes" * 100


async def test_a_claimed_file_stays_for_storage_to_take(tmp_path: Path) -> None:
    source = tmp_path / "input.mp4"
    source.write_bytes(b"x" * 10)
    uploads = tmp_path / "uploads"

    async with local_body(uploads, {}, {"videofile": source}, max_upload_bytes=_LIMIT) as body:
        body.files["videofile"].claimed = True
        kept = body.files["videofile"].path

    assert kept.exists()


async def test_a_file_on_another_file_system_is_copied(tmp_path: Path) -> None:
    elsewhere = Path("/dev/shm")
    if not elsewhere.is_dir() or elsewhere.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second file system to link across")
    with tempfile.TemporaryDirectory(dir=elsewhere) as folder:
        source = Path(folder) / "input.mp4"
        source.write_bytes(b"abc" * 1000)
        uploads = tmp_path / "uploads"

        async with local_body(uploads, {}, {"videofile": source}, max_upload_bytes=_LIMIT) as body:
            upload = body.files["videofile"].path
            assert not os.path.samefile(upload, source)
            assert upload.read_bytes() == source.read_bytes()

        assert list(uploads.iterdir()) == []


async def test_a_file_over_the_upload_limit_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    small, big = tmp_path / "small.png", tmp_path / "big.mp4"
    small.write_bytes(b"s" * 10)
    big.write_bytes(b"b" * 2000)
    uploads = tmp_path / "uploads"

    with pytest.raises(PayloadTooLarge, match="larger than 1000 bytes"):
        async with local_body(uploads, {}, {"watermarkfile": small, "videofile": big}, max_upload_bytes=1000):
            pass

    assert not uploads.exists() or list(uploads.iterdir()) == []
