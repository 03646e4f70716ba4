"""`tuberunner transcode` as a user runs it: a real subprocess, real ffmpeg, outputs checked by probing."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tuberunner.media.binaries import find_ffmpeg
from tuberunner.media.probe import probe
from tuberunner.media.samples import make_sample_clip

pytestmark = pytest.mark.slow


def _cli(*args: str, cwd: Path) -> list[str]:
    return [sys.executable, "-m", "tuberunner", "--log-level", "warning", *args]


def _run(*args: str, cwd: Path, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_cli(*args, cwd=cwd), cwd=cwd, capture_output=True, text=True, timeout=timeout_s)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    asyncio.run(make_sample_clip(find_ffmpeg(), path, duration_s=4.0, width=320, height=180, fps=25))
    return path


def _ffmpeg_children_of(pid: int) -> list[int]:
    """ffmpeg processes descended from `pid` (they run in their own sessions, so walk /proc)."""
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        parents[int(entry.name)] = ppid
        names[int(entry.name)] = name
    found = []
    for child, name in names.items():
        ancestor = parents.get(child)
        while ancestor and ancestor != pid:
            ancestor = parents.get(ancestor)
        if ancestor == pid and name.startswith("ffmpeg"):
            found.append(child)
    return found


def test_transcode_writes_mp4s_hls_storyboard_and_summary(tmp_path: Path, clip: Path) -> None:
    out = tmp_path / "out"
    # A relative output folder, as `make demo` gives: the runners' job folders and inputs live below it.
    result = _run("transcode", str(clip), "-o", "out", "--resolutions", "144", "--storyboard", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # Progress lines only: the daemons' info log stays out of the one-shot mode's terminal by default.
    assert " INFO " not in result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["video"]["state"] == "published"
    # The source's own resolution (180p) is the top of the ladder, then the asked 144p.
    assert [w["resolution"] for w in summary["webVideos"]] == [180, 144]
    for web in summary["webVideos"]:
        info = asyncio.run(probe(out / web["file"]))
        assert info.video is not None
        assert info.audio is not None
        assert info.video.codec == "h264"
        assert info.audio.codec == "aac"
        assert info.video.height == web["resolution"]
        assert abs(info.duration_s - 4.0) <= 0.2
    master = (out / "hls" / "master.m3u8").read_text()
    variants = [line for line in master.splitlines() if line and not line.startswith("#")]
    assert len(variants) == 2
    for variant in variants:
        playlist = (out / "hls" / variant).read_text()
        assert "#EXT-X-ENDLIST" in playlist
        media = {
            line.split('URI="')[1].split('"')[0] for line in playlist.splitlines() if "EXT-X-MAP" in line
        }
        assert media
        assert all((out / "hls" / name).is_file() for name in media)
    assert "TYPE=AUDIO" in master  # split audio rendition
    assert (out / "storyboard.jpg").stat().st_size > 0
    assert summary["storyboards"][0]["file"] == "storyboard.jpg"
    assert all(job["state"] == "Completed" for job in summary["jobs"])


def test_on_one_disk_the_input_and_outputs_are_linked_not_sent_over_http(tmp_path: Path, clip: Path) -> None:
    # Same machine, same disk: the input is linked into the embedded coordinator's storage, from there
    # into the runners' inputs, the runners' results into storage and the outputs out of it, never
    # copied through HTTP; the master playlist, which the export rewrites, is a file of its own, so
    # exporting never writes the coordinator's files.
    source = tmp_path / "input.mp4"
    shutil.copyfile(clip, source)  # on the output's disk, wherever the clip is
    out = tmp_path / "out"
    result = _run("transcode", str(source), "-o", str(out), "--resolutions", "144", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    video_uuid = summary["video"]["uuid"]
    stored = out / ".tuberunner" / "coordinator" / "files" / "videos" / video_uuid
    assert os.path.samefile(stored / "source.mp4", source)
    runners = out / ".tuberunner" / "runners"
    # What the runners still hold of `max-quality` (the source, then the top web video once made).
    taken = list(runners.glob("one-shot-*/inputs/ci-*max-quality*"))
    assert taken
    for path in taken:
        assert any(os.path.samefile(path, file) for file in stored.iterdir()), path
    # The ladder's rungs, kept by the runner that made them, are what storage holds.
    kept = list((runners / "encodes").glob("ce-*"))
    for web in summary["webVideos"]:
        made = stored / f"{video_uuid}-{web['resolution']}.mp4"
        assert any(os.path.samefile(made, path) for path in kept), made
    # Web videos are named after the input here, after the video in storage; HLS files keep their names.
    pairs = [(out / w["file"], stored / f"{video_uuid}-{w['resolution']}.mp4") for w in summary["webVideos"]]
    pairs += [(out / r["file"], stored / Path(r["file"]).name) for r in summary["hls"]["renditions"]]
    assert len(pairs) == 5  # 180p and 144p, as web videos and HLS renditions, and the audio rendition
    for exported, kept in pairs:
        assert os.path.samefile(exported, kept), exported
    master = out / "hls" / "master.m3u8"
    assert not os.path.samefile(master, stored / "master.m3u8")
    assert (stored / "master.m3u8").read_text().startswith("#EXTM3U")


def test_an_audio_only_input_gives_outputs_as_long_as_the_audio(tmp_path: Path) -> None:
    # The audio merge makes the top web video; every HLS rendition, the audio-only one included, is made
    # from it and must be as long as the audio (ffmpeg 5.1's -shortest once added 1.5 s of picture to 6 s).
    tone = tmp_path / "tone.m4a"
    asyncio.run(make_sample_clip(find_ffmpeg(), tone, duration_s=3.0, audio_only=True))
    out = tmp_path / "out"

    result = _run("transcode", str(tone), "-o", str(out), "--resolutions", "480", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["video"]["state"] == "published"
    assert summary["jobs"][0]["type"] == "vod-audio-merge-transcoding"
    outputs = [*summary["webVideos"], *summary["hls"]["renditions"]]
    assert {output["resolution"] for output in outputs} == {480, 0}
    for output in outputs:
        assert output["durationS"] == pytest.approx(3.0, abs=0.1), output


def test_missing_input_unwritable_output_and_non_video_fail_clearly(tmp_path: Path) -> None:
    missing = _run("transcode", str(tmp_path / "nope.mp4"), "-o", str(tmp_path / "o1"), cwd=tmp_path)
    assert missing.returncode == 2
    assert "input not found" in missing.stderr

    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 20)
    not_video = _run("transcode", str(text), "-o", str(tmp_path / "o2"), cwd=tmp_path)
    assert not_video.returncode == 1
    assert "not a usable video or audio file" in not_video.stderr

    blocked = tmp_path / "file-not-folder"
    blocked.write_text("x")
    unwritable = _run("transcode", str(text), "-o", str(blocked / "out"), cwd=tmp_path)
    assert unwritable.returncode == 2
    assert "cannot write to" in unwritable.stderr


def test_a_corrupt_input_fails_with_ffmpegs_reason(tmp_path: Path, clip: Path) -> None:
    # A faststart MP4 cut short: its header (read by the probe) promises media that is not there.
    whole = tmp_path / "whole.mp4"
    subprocess.run(
        [
            str(find_ffmpeg()),
            "-loglevel",
            "error",
            "-i",
            str(clip),
            "-c",
            "copy",
            "-movflags",
            "faststart",
            str(whole),
        ],
        check=True,
    )
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 5])
    result = _run(
        "transcode", str(corrupt), "-o", str(tmp_path / "out"), "--resolutions", "144", cwd=tmp_path
    )
    assert result.returncode == 1, result.stderr
    assert "vod-web-video-transcoding failed:" in result.stderr
    assert "ffmpeg" in result.stderr.lower()
    assert _ffmpeg_children_of(os.getpid()) == []


def _completed_jobs(out: Path) -> dict[str, float]:
    db = out / ".tuberunner" / "coordinator" / "coordinator.sqlite3"
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT uuid, finished_at FROM jobs WHERE state = 3").fetchall()
    return {uuid: finished for uuid, finished in rows}


def test_interrupt_then_resume_redoes_no_completed_job(tmp_path: Path) -> None:
    clip = tmp_path / "long.mp4"
    asyncio.run(make_sample_clip(find_ffmpeg(), clip, duration_s=12.0, width=320, height=180, fps=25))
    out = tmp_path / "out"
    proc = subprocess.Popen(
        _cli("transcode", str(clip), "-o", str(out), "--resolutions", "144", cwd=tmp_path),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Plain progress lines (not a terminal): wait for the first completed job, then a running one.
        assert proc.stderr is not None
        seen_completed = False
        deadline = time.monotonic() + 90
        for line in proc.stderr:
            if "Completed" in line:
                seen_completed = True
            if seen_completed and "Processing" in line:
                break
            assert time.monotonic() < deadline
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, rest
    assert "resume" in rest
    assert _ffmpeg_children_of(proc.pid) == []
    done_before = _completed_jobs(out)
    assert done_before

    again = _run("transcode", str(clip), "-o", str(out), "--resolutions", "144", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "resumed" in again.stderr
    done_after = _completed_jobs(out)
    # The jobs completed before the interruption kept their completion time: none was redone.
    assert {uuid: done_after[uuid] for uuid in done_before} == done_before
    assert len(done_after) > len(done_before)
    assert json.loads((out / "summary.json").read_text())["video"]["state"] == "published"
