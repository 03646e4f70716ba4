"""The outbox on a real disk: results moved in durably, read back after a restart, damaged entries dropped."""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path

import pytest

from tuberunner.protocol.jobs import JobType
from tuberunner.runner import outbox as outbox_module
from tuberunner.runner.config import InstanceConfig
from tuberunner.runner.job import AcceptedJob, JobOutput
from tuberunner.runner.outbox import MANIFEST, Outbox, token_digest

INSTANCE = InstanceConfig("https://peertube.example", "ptrt-secret", "box")
PAYLOAD = {"output": {"videoFileCustomUpload": {"url": "https://s3.example/up?sig=1", "method": "PUT"}}}


def accepted(uuid: str = "0d7d7a8e-5a5c-4f4e-9d6c-1d2f3e4a5b6c") -> AcceptedJob:
    return AcceptedJob(uuid, JobType.VOD_HLS, PAYLOAD, "ptrjt-token", INSTANCE.url)


def result(work_dir: Path) -> JobOutput:
    work_dir.mkdir(parents=True, exist_ok=True)
    video = work_dir / "720-fragmented.mp4"
    video.write_bytes(b"\x00video" * 1000)
    playlist = work_dir / "720.m3u8"
    playlist.write_text("#EXTM3U\n")
    return JobOutput(files={"videoFile": video, "resolutionPlaylistFile": playlist}, fields={"x": "y"})


def test_a_result_is_moved_in_with_a_private_manifest_and_read_back_whole(tmp_path: Path) -> None:
    work_dir = tmp_path / "jobs" / "job"
    output = result(work_dir)
    box = Outbox(tmp_path / "outbox")
    entry = box.put(accepted(), INSTANCE, output, work_dir)
    # Moved, not copied: the job folder no longer has them, the entry does, byte for byte.
    assert not output.files["videoFile"].exists()
    assert entry.output.files["videoFile"].read_bytes() == b"\x00video" * 1000
    assert entry.output.files["videoFile"].name == "720-fragmented.mp4"  # the name goes to the server
    manifest = entry.folder / MANIFEST
    assert stat.S_IMODE(manifest.stat().st_mode) == 0o600  # it holds the job token
    text = manifest.read_text()
    assert "ptrt-secret" not in text  # the runner token is only hashed
    assert json.loads(text)["instance"]["runnerTokenSha256"] == token_digest("ptrt-secret")
    (loaded,) = Outbox(tmp_path / "outbox").load()
    assert loaded == entry
    assert loaded.job.payload == PAYLOAD  # the custom upload targets survive
    assert loaded.output.fields == {"x": "y"}
    assert loaded.belongs_to(INSTANCE)
    assert not loaded.belongs_to(InstanceConfig(INSTANCE.url, "ptrt-new-token", "box"))  # registered again
    assert not loaded.belongs_to(InstanceConfig(INSTANCE.url, "ptrt-secret", "other-name"))


def test_a_file_outside_the_job_folder_is_copied_not_taken(tmp_path: Path) -> None:
    shared = tmp_path / "inputs" / "source.mp4"
    shared.parent.mkdir()
    shared.write_bytes(b"shared")
    box = Outbox(tmp_path / "outbox")
    entry = box.put(accepted(), INSTANCE, JobOutput(files={"videoFile": shared}), tmp_path / "jobs" / "job")
    assert shared.read_bytes() == b"shared"
    assert entry.output.files["videoFile"].read_bytes() == b"shared"


def test_an_attempt_is_recorded_durably_before_a_restart(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox")
    entry = box.put(accepted(), INSTANCE, result(tmp_path / "job"), tmp_path / "job")
    assert not entry.attempted
    marked = box.mark_attempted(entry)
    assert marked.attempted
    assert box.mark_attempted(marked) is marked  # once is enough
    (loaded,) = Outbox(box.root).load()
    assert loaded.attempted


def test_entries_of_two_registrations_with_the_same_job_uuid_do_not_collide(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox")
    other = InstanceConfig("https://other.example", "ptrt-2", "box")
    first = box.put(accepted(), INSTANCE, result(tmp_path / "a"), tmp_path / "a")
    second = box.put(accepted(), other, result(tmp_path / "b"), tmp_path / "b")
    assert first.folder != second.folder
    assert {e.instance_key for e in box.load()} == {INSTANCE.key, other.key}


def test_a_put_that_fails_or_is_cut_short_before_its_manifest_leaves_nothing_to_deliver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    box = Outbox(tmp_path / "outbox")

    def power_cut(*_: object, **__: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outbox_module, "atomic_write", power_cut)
    with pytest.raises(OSError, match="No space"):
        box.put(accepted(), INSTANCE, result(tmp_path / "job"), tmp_path / "job")
    monkeypatch.undo()
    assert list(box.root.iterdir()) == []  # a failed put leaves nothing behind
    # A process killed in the middle of a put leaves a folder without a manifest: removed at start.
    entry = box.put(accepted(), INSTANCE, result(tmp_path / "job"), tmp_path / "job")
    (entry.folder / MANIFEST).unlink()
    with caplog.at_level(logging.WARNING):
        assert box.load() == []
    assert not entry.folder.exists()
    assert "being stored when the runner stopped" in caplog.text


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda e: (e.folder / MANIFEST).write_text("{not json"), "Expecting property name"),
        (lambda e: e.output.files["videoFile"].write_bytes(b"short"), "has 5 bytes, not 6000"),
        (lambda e: e.output.files["resolutionPlaylistFile"].unlink(), "No such file"),
        (
            lambda e: (e.folder / MANIFEST).write_text(
                (e.folder / MANIFEST).read_text().replace('"version": 1', '"version": 99')
            ),
            "manifest version 99",
        ),
        (
            lambda e: (e.folder / MANIFEST).write_text(
                (e.folder / MANIFEST).read_text().replace("files/videoFile/", "../../../")
            ),
            "outside the entry",
        ),
    ],
    ids=["bad-json", "truncated-file", "missing-file", "unknown-version", "path-escape"],
)
def test_an_entry_that_cannot_be_delivered_as_it_was_is_dropped_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: object, reason: str
) -> None:
    box = Outbox(tmp_path / "outbox")
    entry = box.put(accepted(), INSTANCE, result(tmp_path / "job"), tmp_path / "job")
    kept = box.put(accepted("other-job"), INSTANCE, result(tmp_path / "job2"), tmp_path / "job2")
    damage(entry)  # type: ignore[operator]
    with caplog.at_level(logging.WARNING):
        assert box.load() == [kept]  # the other entry is untouched
    assert not entry.folder.exists()
    assert reason in caplog.text


def test_remove_takes_the_manifest_first_and_the_files_with_it(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox")
    entry = box.put(accepted(), INSTANCE, result(tmp_path / "job"), tmp_path / "job")
    box.remove(entry)
    assert not entry.folder.exists()
    box.remove(entry)  # twice is harmless
    assert box.load() == []
