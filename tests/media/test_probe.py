from __future__ import annotations

import asyncio
import os
import signal
import textwrap
from pathlib import Path

import pytest

from tests.media.conftest import CLIP_DURATION_S, CLIP_FPS, CLIP_HEIGHT, CLIP_WIDTH
from tuberunner.media import probe as probe_module
from tuberunner.media.errors import ProbeError
from tuberunner.media.probe import AudioInfo, MediaInfo, VideoInfo, hls_codecs_string, probe


async def test_video_with_audio(sample_clip: Path) -> None:
    info = await probe(sample_clip)

    assert info.path == sample_clip
    assert "mp4" in info.format_name
    assert info.duration_s == pytest.approx(CLIP_DURATION_S, abs=0.05)
    assert info.size_bytes == sample_clip.stat().st_size
    assert info.bit_rate is not None
    assert info.bit_rate > 0
    assert info.video is not None
    assert (info.video.codec, info.video.profile) == ("h264", "High")
    assert (info.video.width, info.video.height) == (CLIP_WIDTH, CLIP_HEIGHT)
    assert info.video.fps == CLIP_FPS
    assert info.video.pix_fmt == "yuv420p"
    assert info.video.level is not None
    assert info.video.rotation == 0
    assert not info.video.is_portrait
    assert info.video.short_side == CLIP_HEIGHT
    assert info.audio is not None
    assert (info.audio.codec, info.audio.channels, info.audio.channel_layout) == ("aac", 2, "stereo")
    assert info.audio.sample_rate == 48_000
    assert info.audio.bit_rate is not None
    assert 100_000 < info.audio.bit_rate < 160_000


async def test_audio_only(audio_only_clip: Path) -> None:
    info = await probe(audio_only_clip)

    assert info.video is None
    assert info.audio is not None
    assert info.audio.codec == "aac"
    assert info.duration_s == pytest.approx(2.0, abs=0.05)


async def test_still_image_is_a_video_stream_without_duration(still_image: Path) -> None:
    info = await probe(still_image)

    assert info.video is not None
    assert (info.video.codec, info.video.width, info.video.height) == ("mjpeg", 321, 181)
    assert info.audio is None
    assert info.duration_s == 0.0
    assert info.bit_rate is None


async def test_rotation_swaps_the_display_dimensions(rotated_clip: Path) -> None:
    info = await probe(rotated_clip)

    assert info.video is not None
    assert (info.video.width, info.video.height) == (CLIP_WIDTH, CLIP_HEIGHT)
    assert info.video.rotation in (90, 270)
    assert (info.video.display_width, info.video.display_height) == (CLIP_HEIGHT, CLIP_WIDTH)
    assert info.video.is_portrait
    assert info.video.short_side == CLIP_HEIGHT


async def test_text_file_is_not_media(tmp_path: Path) -> None:
    # Named .txt, libavformat would read it as ANSI art (the "tty" demuxer): that must not count as video.
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a video\n" * 20)

    with pytest.raises(ProbeError, match=r"notes\.txt: not a video or audio file: it is text"):
        await probe(text)


async def test_text_with_a_video_name_is_not_media(tmp_path: Path) -> None:
    text = tmp_path / "upload.mp4"
    text.write_text("hello, this is not a video\n" * 20)

    with pytest.raises(ProbeError, match=r"upload\.mp4: not a video or audio file: Invalid data"):
        await probe(text)


async def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ProbeError, match="No such file or directory"):
        await probe(tmp_path / "missing.mp4")


async def test_truncated_mp4_without_its_index_is_refused_with_the_reason(
    sample_clip: Path, tmp_path: Path
) -> None:
    # Our sample is written without faststart: the index (moov) is at the end, so a cut file has none.
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(sample_clip.read_bytes()[: sample_clip.stat().st_size // 2])

    with pytest.raises(ProbeError, match="moov atom not found"):
        await probe(cut)


async def test_truncated_faststart_mp4_probes_with_the_duration_its_header_announces(
    ffmpeg_path: Path, sample_clip: Path, tmp_path: Path
) -> None:
    # Documented behaviour: with the index up front, a cut file still opens; the transcode fails later.
    faststart = tmp_path / "faststart.mp4"
    proc = await _run(
        ffmpeg_path, "-y", "-i", str(sample_clip), "-c", "copy", "-movflags", "faststart", str(faststart)
    )
    assert proc == 0
    cut = tmp_path / "cut-faststart.mp4"
    cut.write_bytes(faststart.read_bytes()[: faststart.stat().st_size // 2])

    info = await probe(cut)

    assert info.duration_s == pytest.approx(CLIP_DURATION_S, abs=0.05)
    assert info.size_bytes == cut.stat().st_size
    assert info.video is not None
    assert info.audio is not None


async def _run(ffmpeg: Path, *args: str) -> int:
    import asyncio

    process = await asyncio.create_subprocess_exec(
        str(ffmpeg),
        "-hide_banner",
        "-nostdin",
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await process.wait()


def _fake_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, main_body: str) -> None:
    """A worker module whose `main(argv)` runs `main_body` (what the fork server's children call; run as
    `python -m` too, as a probe without the server does)."""
    body = "import os, signal, sys, time\n\n\ndef main(argv):\n" + textwrap.indent(
        textwrap.dedent(main_body), "    "
    )
    body += "\n\nif __name__ == '__main__':\n    sys.exit(main(sys.argv))\n"
    (tmp_path / "fake_probe_worker.py").write_text(body)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(probe_module, "_WORKER_MODULE", "fake_probe_worker")


async def test_a_crashing_probe_is_a_probe_error(
    sample_clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_worker(tmp_path, monkeypatch, "os.kill(os.getpid(), signal.SIGSEGV)")

    with pytest.raises(ProbeError, match="killed by SIGSEGV"):
        await probe(sample_clip)


async def test_a_probe_that_raises_is_a_probe_error_naming_the_cause(
    sample_clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_worker(tmp_path, monkeypatch, "raise RuntimeError('libav went wrong')")

    with pytest.raises(ProbeError, match=r"\(exit code 1\): RuntimeError: libav went wrong"):
        await probe(sample_clip)


async def test_a_hanging_probe_is_killed_after_the_timeout(
    sample_clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid_file = tmp_path / "pid"
    _fake_worker(
        tmp_path,
        monkeypatch,
        f"""
        open({str(pid_file)!r}, "w").write(str(os.getpid()))
        time.sleep(60)
        """,
    )

    with pytest.raises(ProbeError, match=r"took longer than 0\.5 s"):
        await probe(sample_clip, timeout_s=0.5)

    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_a_cancelled_probe_leaves_no_process(
    sample_clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid_file = tmp_path / "pid"
    _fake_worker(
        tmp_path,
        monkeypatch,
        f"""
        open({str(pid_file)!r} + ".part", "w").write(str(os.getpid()))
        os.replace({str(pid_file)!r} + ".part", {str(pid_file)!r})
        time.sleep(60)
        """,
    )
    task = asyncio.create_task(probe(sample_clip))
    while not pid_file.exists():
        await asyncio.sleep(0.01)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    pid = int(pid_file.read_text())
    await _until_gone(pid)


async def test_probes_are_forked_by_one_server_not_by_the_caller(
    sample_clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each probe has a process of its own, forked by the server: none is a child of the caller.
    _fake_worker(
        tmp_path,
        monkeypatch,
        """
        import json
        print(json.dumps({"ok": False, "error": f"{os.getpid()} {os.getppid()}"}))
        return 0
        """,
    )

    seen = []
    for _ in range(2):
        with pytest.raises(ProbeError) as raised:
            await probe(sample_clip)
        pid, parent = map(int, str(raised.value).split(": ", 1)[1].split())
        seen.append((pid, parent))

    (first, server), (second, same_server) = seen
    assert first != second
    assert server == same_server != os.getpid()


async def test_a_killed_server_is_replaced_and_probing_goes_on(
    sample_clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_worker(
        tmp_path,
        monkeypatch,
        """
        import json
        print(json.dumps({"ok": False, "error": str(os.getppid())}))
        return 0
        """,
    )
    with pytest.raises(ProbeError) as raised:
        await probe(sample_clip)
    server = int(str(raised.value).rsplit(" ", 1)[1])
    assert server != os.getpid()

    os.kill(server, signal.SIGKILL)
    await _until_gone(server, reap=False)
    with pytest.raises(ProbeError) as raised:
        await probe(sample_clip)

    replacement = int(str(raised.value).rsplit(" ", 1)[1])
    assert replacement not in (server, os.getpid())


async def test_without_a_server_each_probe_runs_in_a_process_of_its_own(
    sample_clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker module that the server cannot import (here: on purpose) still probes, one process each.
    _fake_worker(
        tmp_path,
        monkeypatch,
        """
        import json
        print(json.dumps({"ok": False, "error": str(os.getppid())}))
        return 0
        """,
    )
    module = tmp_path / "fake_probe_worker.py"
    module.write_text("if __name__ != '__main__':\n    raise ImportError('not here')\n" + module.read_text())

    with pytest.raises(ProbeError) as raised:
        await probe(sample_clip)

    assert int(str(raised.value).rsplit(" ", 1)[1]) == os.getpid()


async def _until_gone(pid: int, *, reap: bool = True) -> None:
    """Wait until `pid` no longer exists (a killed process disappears once its parent reaped it)."""
    async with asyncio.timeout(5):
        while True:
            try:
                if not reap and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    return
                os.kill(pid, 0)
            except (ProcessLookupError, FileNotFoundError):
                return
            await asyncio.sleep(0.01)


def _info(video: VideoInfo | None, audio: AudioInfo | None) -> MediaInfo:
    return MediaInfo(
        path=Path("x.mp4"),
        format_name="mp4",
        duration_s=1,
        size_bytes=1,
        bit_rate=None,
        video=video,
        audio=audio,
    )


def _video(codec: str = "h264", profile: str | None = "High", level: int | None = 31) -> VideoInfo:
    return VideoInfo(
        codec=codec,
        profile=profile,
        level=level,
        width=1280,
        height=720,
        fps=30,
        pix_fmt="yuv420p",
        bit_rate=None,
        rotation=0,
    )


def _aac(profile: str = "LC", codec: str = "aac") -> AudioInfo:
    return AudioInfo(
        codec=codec, profile=profile, sample_rate=48_000, channels=2, channel_layout="stereo", bit_rate=1
    )


@pytest.mark.parametrize(
    ("info", "expected"),
    [
        (_info(_video(), _aac()), "avc1.64001f,mp4a.40.2"),
        (_info(_video(profile="Main", level=40), None), "avc1.4D4028"),
        (_info(_video(profile="Constrained Baseline", level=13), None), "avc1.42E00d"),
        (_info(_video(profile="High 10", level=51), None), "avc1.640033"),
        (_info(None, _aac()), "mp4a.40.2"),
        (_info(None, _aac(profile="HE-AAC")), "mp4a.40.5"),
        (_info(None, _aac(codec="mp3")), "mp4a.40.34"),
        (_info(_video(codec="hevc", profile="Main 10", level=120), None), "hvc1.2.4.L120.B0"),
    ],
)
def test_hls_codecs_string(info: MediaInfo, expected: str) -> None:
    assert hls_codecs_string(info) == expected


async def test_hls_codecs_string_of_a_real_file(sample_clip: Path) -> None:
    info = await probe(sample_clip)
    assert info.video is not None
    assert info.video.level is not None

    assert hls_codecs_string(info) == f"avc1.6400{info.video.level:02x},mp4a.40.2"
