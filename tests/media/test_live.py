"""The live side of the media layer on real ffmpeg: PeerTube's live command (run on short generated FLV files,
which ffmpeg reads in place of the RTMP URL), what `ffmpeg -i` tells of a stream, ffmpeg's media playlists
and their cuts, URL redaction, and `probe_live` against a real RTMP source and a silent one.

`make test` runs this file on the bundled ffmpeg and again on the system's (Debian's 5.1)."""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.servers import free_port
from tuberunner.media.errors import FfmpegUnavailable, ProbeError
from tuberunner.media.live import (
    MASTER_PLAYLIST,
    LiveInput,
    LiveRendition,
    MediaPlaylist,
    live_command,
    parse_stream_dump,
    probe_live,
    variant_count,
)
from tuberunner.media.probe import AudioInfo, VideoInfo
from tuberunner.media.process import redact_urls, run_ffmpeg
from tuberunner.media.profiles import target_bitrate, video_aspect_ratio

SECONDS = 3
FPS = 25
KEY = "a-secret-stream-key"
_SEGMENT_NAME = re.compile(r"^[a-z0-9-]+\.ts$")  # what PeerTube accepts (spec §7.4)


# ------------------------------------------------------------------------------------------ sources


@dataclass(frozen=True)
class Sources:
    # 320x240 H.264 (a keyframe every second) + AAC mono 44.1 kHz, as OBS would publish it.
    av: Path
    # The same with stereo AAC at 128k.
    stereo: Path
    # The same picture with MP3 audio (96k stereo): not copied into HLS.
    mp3: Path
    video_only: Path
    audio_only: Path


def _flv(ffmpeg: Path, out: Path, *, video: bool = True, audio: list[str] | None = None) -> Path:
    args = [str(ffmpeg), "-hide_banner", "-loglevel", "error", "-nostdin", "-y"]
    if video:
        args += ["-f", "lavfi", "-i", f"testsrc2=size=320x240:rate={FPS}"]
    if audio is not None:
        args += ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100"]
    args += ["-t", str(SECONDS)]
    if video:
        args += ["-c:v", "libx264", "-preset", "ultrafast", "-g", str(FPS)]
    args += [*(audio or []), "-f", "flv", str(out)]
    subprocess.run(args, check=True, capture_output=True, timeout=60)
    return out


@pytest.fixture(scope="session")
def sources(ffmpeg_path: Path, media_dir: Path) -> Sources:
    return Sources(
        av=_flv(ffmpeg_path, media_dir / "live-av.flv", audio=["-c:a", "aac"]),
        stereo=_flv(
            ffmpeg_path, media_dir / "live-stereo.flv", audio=["-c:a", "aac", "-ac", "2", "-b:a", "128k"]
        ),
        mp3=_flv(
            ffmpeg_path, media_dir / "live-mp3.flv", audio=["-c:a", "libmp3lame", "-ac", "2", "-b:a", "96k"]
        ),
        video_only=_flv(ffmpeg_path, media_dir / "live-video.flv"),
        audio_only=_flv(
            ffmpeg_path, media_dir / "live-audio.flv", video=False, audio=["-c:a", "aac", "-ac", "2"]
        ),
    )


def _dump(ffmpeg: Path, source: Path) -> str:
    """What `ffmpeg -i` prints about `source` (on stderr; it exits 1 for want of an output)."""
    return subprocess.run(
        [str(ffmpeg), "-hide_banner", "-nostdin", "-i", str(source)],
        capture_output=True,
        text=True,
        timeout=30,
    ).stderr


# ------------------------------------------------------------------------------------------ the command


def _option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def _options(args: list[str], name: str) -> list[str]:
    return [args[i + 1] for i, arg in enumerate(args) if arg == name]


async def _run_command(ffmpeg: Path, source: Path, renditions: list[LiveRendition], out: Path) -> LiveInput:
    """`live_command` for `source` (its stream described by `ffmpeg -i`), run to the end of the file."""
    stream = parse_stream_dump(_dump(ffmpeg, source))
    out.mkdir()
    args = live_command(str(source), stream, renditions, out_dir=out, segment_duration_s=1, list_size=10)
    await run_ffmpeg(ffmpeg, args, duration_s=None, stall_timeout_s=30)
    return stream


@dataclass(frozen=True)
class Written:
    """What one media playlist of the command holds: the streams of its first segment, its segments."""

    playlist: MediaPlaylist
    stream: LiveInput


def _outputs(ffmpeg: Path, out: Path, variants: int) -> list[Written]:
    """The playlists `0.m3u8` ... as the processor reads them, checked as it relies on them: only those,
    named in the master, segments `<n>-<sequence>.ts` (names PeerTube accepts) in order from 0, on disk."""
    names = [f"{n}.m3u8" for n in range(variants)]
    assert sorted(p.name for p in out.glob("*.m3u8")) == sorted([*names, MASTER_PLAYLIST])
    master = (out / MASTER_PLAYLIST).read_text()
    written = []
    for number, name in enumerate(names):
        assert name in master
        playlist = MediaPlaylist.parse((out / name).read_text())
        assert playlist.ended  # the file ended: ffmpeg closed its playlists
        assert playlist.names() == [f"{number}-{seq:06d}.ts" for seq in range(len(playlist.segments))]
        assert all(_SEGMENT_NAME.match(segment) for segment in playlist.names())
        assert all((out / segment).is_file() for segment in playlist.names())
        written.append(Written(playlist, parse_stream_dump(_dump(ffmpeg, out / playlist.names()[0]))))
    return written


def _durations(playlist: MediaPlaylist) -> list[float]:
    return [
        float(tag.removeprefix("#EXTINF:").rstrip(","))
        for segment in playlist.segments
        for tag in segment.tags
        if tag.startswith("#EXTINF:")
    ]


def _check_video(written: Written, rendition: LiveRendition) -> None:
    """A video rendition: H.264 alone (audio is a rendition of its own), at its height and frame rate, cut
    every 2 s (a keyframe every 2 s of its rate, however short the asked segments)."""
    video = written.stream.video
    assert video is not None
    assert written.stream.audio is None
    assert (video.codec, video.height, video.fps) == ("h264", rendition.resolution, rendition.fps)
    assert video.width == rendition.resolution * 4 // 3
    *whole, _last = _durations(written.playlist)
    assert whole
    assert all(abs(duration - 2.0) < 0.05 for duration in whole), whole


def _check_audio(written: Written, codec: str = "aac") -> None:
    assert written.stream.video is None
    assert written.stream.audio is not None
    assert written.stream.audio.codec == codec


async def test_two_renditions_with_audio_copied(ffmpeg_path: Path, sources: Sources, tmp_path: Path) -> None:
    renditions = [LiveRendition(240, 25), LiveRendition(144, 25)]
    stream = parse_stream_dump(_dump(ffmpeg_path, sources.av))
    args = live_command(
        "rtmp://127.0.0.1/live/x", stream, renditions, out_dir=tmp_path, segment_duration_s=1, list_size=3
    )
    assert _option(args, "-i") == "rtmp://127.0.0.1/live/x"
    assert _option(args, "-filter_complex") == (
        "[0:v:0]split=2[vtemp240][vtemp144];"
        "[vtemp240]scale=w=-2:h=240[vout240];[vtemp144]scale=w=-2:h=144[vout144]"
    )
    assert (
        _option(args, "-var_stream_map") == "a:0,agroup:Audio,default:yes v:0,agroup:Audio v:1,agroup:Audio"
    )
    assert _options(args, "-map") == ["0:a:0", "[vout240]", "[vout144]"]
    assert _option(args, "-c:a:0") == "copy"
    for number, rendition in enumerate(renditions):
        bitrate = target_bitrate(
            rendition.resolution, 25, video_aspect_ratio(stream.video), stream.input_bitrate
        )
        assert _option(args, f"-c:v:{number}") == "libx264"
        assert _option(args, f"-b:v:{number}") == _option(args, f"-maxrate:v:{number}") == str(bitrate)
        assert _option(args, f"-bufsize:v:{number}") == str(2 * bitrate)
        assert _option(args, f"-r:v:{number}") == "25"
        assert _option(args, f"-g:v:{number}") == "50"
    assert (_option(args, "-hls_time"), _option(args, "-hls_list_size")) == ("1", "3")
    assert "delete_segments" not in _option(args, "-hls_flags")  # the runner deletes what it sent
    assert "-threads" not in args

    await _run_command(ffmpeg_path, sources.av, renditions, tmp_path / "hls")
    audio, *videos = _outputs(ffmpeg_path, tmp_path / "hls", variant_count(stream, renditions))
    assert len(videos) == 2
    _check_audio(audio)
    for video, rendition in zip(videos, renditions, strict=True):
        _check_video(video, rendition)
    master = (tmp_path / "hls" / MASTER_PLAYLIST).read_text()
    assert 'TYPE=AUDIO,GROUP-ID="group_Audio"' in master
    assert master.count('AUDIO="group_Audio"') == 2


async def test_audio_that_cannot_be_copied_is_encoded_at_the_vod_rate(
    ffmpeg_path: Path, sources: Sources, tmp_path: Path
) -> None:
    """MP3 cannot go into HLS as it is: aac at PeerTube's rate for it (96k MP3: 128k)."""
    renditions = [LiveRendition(144, 25)]
    stream = await _run_command(ffmpeg_path, sources.mp3, renditions, tmp_path / "hls")
    assert stream.audio is not None
    assert stream.audio.codec == "mp3"
    args = live_command("u", stream, renditions, out_dir=tmp_path, segment_duration_s=1, list_size=3)
    assert (_option(args, "-c:a:0"), _option(args, "-b:a:0")) == ("aac", "128k")
    audio, video = _outputs(ffmpeg_path, tmp_path / "hls", 2)
    _check_audio(audio, "aac")
    _check_video(video, renditions[0])


def test_libfdk_aac_is_preferred_when_ffmpeg_has_it(
    ffmpeg_path: Path, sources: Sources, tmp_path: Path
) -> None:
    stream = parse_stream_dump(_dump(ffmpeg_path, sources.av))
    args = live_command(
        "u", stream, [LiveRendition(144, 25)], out_dir=tmp_path, segment_duration_s=2, list_size=3,
        threads=2, has_libfdk_aac=True,
    )  # fmt: skip
    assert (_option(args, "-c:a:0"), _option(args, "-q:a")) == ("libfdk_aac", "5")
    assert "copy" not in args
    assert _option(args, "-threads") == "2"
    assert _option(args, "-hls_time") == "2"


async def test_an_audio_only_stream_makes_one_audio_playlist(
    ffmpeg_path: Path, sources: Sources, tmp_path: Path
) -> None:
    renditions = [LiveRendition(240, 25), LiveRendition(144, 25)]
    stream = await _run_command(ffmpeg_path, sources.audio_only, renditions, tmp_path / "hls")
    assert stream.video is None
    args = live_command("u", stream, renditions, out_dir=tmp_path, segment_duration_s=1, list_size=3)
    assert _option(args, "-var_stream_map") == "a:0"
    assert "-filter_complex" not in args
    assert not [arg for arg in args if arg.startswith(("-c:v", "-b:v"))]
    assert variant_count(stream, renditions) == 1
    (audio,) = _outputs(ffmpeg_path, tmp_path / "hls", 1)
    _check_audio(audio)


async def test_a_stream_without_audio_makes_video_playlists_only(
    ffmpeg_path: Path, sources: Sources, tmp_path: Path
) -> None:
    renditions = [LiveRendition(240, 25), LiveRendition(144, 25)]
    stream = await _run_command(ffmpeg_path, sources.video_only, renditions, tmp_path / "hls")
    assert stream.audio is None
    args = live_command("u", stream, renditions, out_dir=tmp_path, segment_duration_s=1, list_size=3)
    assert _option(args, "-var_stream_map") == "v:0 v:1"
    assert _options(args, "-map") == ["[vout240]", "[vout144]"]
    assert not [arg for arg in args if arg.startswith("-c:a")]
    written = _outputs(ffmpeg_path, tmp_path / "hls", variant_count(stream, renditions))
    assert len(written) == 2
    for video, rendition in zip(written, renditions, strict=True):
        _check_video(video, rendition)
    assert "TYPE=AUDIO" not in (tmp_path / "hls" / MASTER_PLAYLIST).read_text()


@pytest.mark.parametrize(
    ("resolutions", "var_stream_map"),
    [
        ([240, 0], "a:0,agroup:Audio,default:yes v:0,agroup:Audio"),
        ([0], "a:0"),
    ],
    ids=["beside-a-video-one", "alone"],
)
async def test_the_audio_only_rendition_is_the_audio_playlist(
    ffmpeg_path: Path, sources: Sources, tmp_path: Path, resolutions: list[int], var_stream_map: str
) -> None:
    """`toTranscode` may hold `{resolution: 0}`: the audio rendition, which the live command always makes
    when there is audio (alone: no video is encoded)."""
    renditions = [LiveRendition(r, 25 if r else 0) for r in resolutions]
    stream = await _run_command(ffmpeg_path, sources.av, renditions, tmp_path / "hls")
    args = live_command("u", stream, renditions, out_dir=tmp_path, segment_duration_s=1, list_size=3)
    assert _option(args, "-var_stream_map") == var_stream_map
    audio, *videos = _outputs(ffmpeg_path, tmp_path / "hls", variant_count(stream, renditions))
    _check_audio(audio)
    assert len(videos) == len([r for r in resolutions if r])
    for video in videos:
        _check_video(video, renditions[0])


def test_impossible_renditions_are_refused(ffmpeg_path: Path, sources: Sources, tmp_path: Path) -> None:
    stream = parse_stream_dump(_dump(ffmpeg_path, sources.av))
    with pytest.raises(ProbeError, match="no rendition"):
        live_command("u", stream, [], out_dir=tmp_path, segment_duration_s=1, list_size=3)
    silent = parse_stream_dump(_dump(ffmpeg_path, sources.video_only))
    with pytest.raises(ProbeError, match="audio-only rendition of a stream without audio"):
        live_command("u", silent, [LiveRendition(0, 0)], out_dir=tmp_path, segment_duration_s=1, list_size=3)


def test_a_low_input_bitrate_caps_the_renditions() -> None:
    """PeerTube's cap: 1.3 x the input bitrate (the container's, else the video stream's), below the
    average for the resolution (360p30 at 16:9: 1,036,800 bit/s)."""
    video = VideoInfo("h264", None, None, 1280, 720, 30.0, None, 500_000, 0)
    for stream, cap in [
        (LiveInput(video, None, 200_000), 260_000),
        (LiveInput(video, None, None), 650_000),
    ]:
        args = live_command(
            "u", stream, [LiveRendition(360, 30)], out_dir=Path("/x"), segment_duration_s=1, list_size=3
        )
        assert _option(args, "-b:v:0") == str(cap)
        assert _option(args, "-bufsize:v:0") == str(2 * cap)


# ------------------------------------------------------------------------------------------ ffmpeg -i


def test_the_dump_of_a_stream_with_audio(ffmpeg_path: Path, sources: Sources) -> None:
    stream = parse_stream_dump(_dump(ffmpeg_path, sources.av))
    assert stream.video is not None
    assert stream.audio is not None
    assert (stream.video.codec, stream.video.width, stream.video.height, stream.video.fps) == (
        "h264", 320, 240, 25.0,
    )  # fmt: skip
    audio = stream.audio
    assert (audio.codec, audio.sample_rate, audio.channels, audio.channel_layout) == ("aac", 44100, 1, "mono")
    assert audio.bit_rate is not None
    assert 30_000 <= audio.bit_rate <= 200_000
    # The bitrate of the Duration line: the file's, within what its size says.
    size_rate = sources.av.stat().st_size * 8 / SECONDS
    assert stream.bit_rate is not None
    assert abs(stream.bit_rate - size_rate) <= 0.1 * size_rate
    assert stream.input_bitrate == stream.bit_rate


def test_the_dump_of_stereo_video_only_and_audio_only_streams(ffmpeg_path: Path, sources: Sources) -> None:
    stereo = parse_stream_dump(_dump(ffmpeg_path, sources.stereo)).audio
    assert stereo is not None
    assert (stereo.channels, stereo.channel_layout, stereo.bit_rate) == (2, "stereo", 128_000)
    video_only = parse_stream_dump(_dump(ffmpeg_path, sources.video_only))
    assert video_only.audio is None
    assert video_only.video is not None
    audio_only = parse_stream_dump(_dump(ffmpeg_path, sources.audio_only))
    assert audio_only.video is None
    assert audio_only.audio is not None


def test_the_dump_of_an_mp4_names_the_video_bitrate(ffmpeg_path: Path, sample_clip: Path) -> None:
    """MP4 stream lines carry ids, languages and codec tags (`[0x1](und)`, `(avc1 / 0x31637661)`)."""
    stream = parse_stream_dump(_dump(ffmpeg_path, sample_clip))
    assert stream.video is not None
    assert stream.audio is not None
    assert (stream.video.width, stream.video.height, stream.video.fps) == (320, 180, 25.0)
    assert stream.video.bit_rate is not None
    assert stream.video.bit_rate > 0
    assert (stream.audio.channels, stream.audio.sample_rate) == (2, 48000)
    without_container_rate = LiveInput(stream.video, stream.audio, None)
    assert without_container_rate.input_bitrate == stream.video.bit_rate


def test_a_dump_without_streams_is_a_probe_error(ffmpeg_path: Path, tmp_path: Path) -> None:
    with pytest.raises(ProbeError, match="neither video nor audio"):
        parse_stream_dump(_dump(ffmpeg_path, tmp_path / "missing.flv"))


# ------------------------------------------------------------------------------------------ playlists

_WINDOW = """#EXTM3U
#EXT-X-VERSION:6
#EXT-X-TARGETDURATION:2
#EXT-X-MEDIA-SEQUENCE:7
#EXT-X-INDEPENDENT-SEGMENTS
#EXTINF:2.000000,
#EXT-X-PROGRAM-DATE-TIME:2026-01-01T10:00:14.000+0000
1-000007.ts
#EXTINF:2.000000,
#EXT-X-PROGRAM-DATE-TIME:2026-01-01T10:00:16.000+0000
1-000008.ts
#EXTINF:2.000000,
#EXT-X-PROGRAM-DATE-TIME:2026-01-01T10:00:18.000+0000
1-000009.ts
#EXT-X-ENDLIST
"""


def test_a_media_playlist_is_its_header_its_window_and_whether_it_ended() -> None:
    playlist = MediaPlaylist.parse(_WINDOW)
    assert playlist.header == (
        "#EXTM3U", "#EXT-X-VERSION:6", "#EXT-X-TARGETDURATION:2", "#EXT-X-INDEPENDENT-SEGMENTS",
    )  # fmt: skip
    assert playlist.names() == ["1-000007.ts", "1-000008.ts", "1-000009.ts"]
    assert [s.sequence for s in playlist.segments] == [7, 8, 9]
    assert playlist.segments[1].tags == (
        "#EXTINF:2.000000,",
        "#EXT-X-PROGRAM-DATE-TIME:2026-01-01T10:00:16.000+0000",
    )
    assert playlist.ended
    assert not MediaPlaylist.parse(_WINDOW.replace("#EXT-X-ENDLIST\n", "")).ended


def test_a_cut_lists_the_window_up_to_a_segment_without_the_end_tag() -> None:
    playlist = MediaPlaylist.parse(_WINDOW)
    cut = playlist.up_to("1-000008.ts")
    assert cut == (
        "#EXTM3U\n#EXT-X-VERSION:6\n#EXT-X-TARGETDURATION:2\n#EXT-X-INDEPENDENT-SEGMENTS\n"
        "#EXT-X-MEDIA-SEQUENCE:7\n"
        "#EXTINF:2.000000,\n#EXT-X-PROGRAM-DATE-TIME:2026-01-01T10:00:14.000+0000\n1-000007.ts\n"
        "#EXTINF:2.000000,\n#EXT-X-PROGRAM-DATE-TIME:2026-01-01T10:00:16.000+0000\n1-000008.ts\n"
    )
    reread = MediaPlaylist.parse(cut)
    assert reread.segments == playlist.segments[:2]
    assert not reread.ended
    assert "#EXT-X-ENDLIST" not in playlist.up_to("1-000009.ts")


def test_a_cut_after_a_skipped_segment_starts_after_it() -> None:
    """8 could not be sent (ffmpeg wrote it incomplete on a full disk) and is still in the window: the
    playlists sent from then on start at 9, and say so."""
    cut = MediaPlaylist.parse(_WINDOW).up_to("1-000009.ts", first_sequence=9)
    reread = MediaPlaylist.parse(cut)
    assert reread.names() == ["1-000009.ts"]
    assert [s.sequence for s in reread.segments] == [9]
    assert "#EXT-X-MEDIA-SEQUENCE:9\n" in cut
    assert reread.segments[0].tags[-1] == "#EXT-X-PROGRAM-DATE-TIME:2026-01-01T10:00:18.000+0000"
    # A first sequence below the window changes nothing.
    assert MediaPlaylist.parse(_WINDOW).up_to("1-000009.ts", first_sequence=3).count(".ts") == 3


def test_a_discontinuity_belongs_to_the_segment_after_it() -> None:
    first_tags = "#EXTINF:2.000000,\n#EXT-X-PROGRAM-DATE-TIME:2026-01-01T10:00:14"
    text = _WINDOW.replace(first_tags, f"#EXT-X-DISCONTINUITY\n{first_tags}")
    playlist = MediaPlaylist.parse(text)
    assert "#EXT-X-DISCONTINUITY" not in playlist.header
    assert playlist.segments[0].tags[0] == "#EXT-X-DISCONTINUITY"
    assert playlist.up_to("1-000007.ts").endswith(
        "#EXT-X-DISCONTINUITY\n#EXTINF:2.000000,\n"
        "#EXT-X-PROGRAM-DATE-TIME:2026-01-01T10:00:14.000+0000\n1-000007.ts\n"
    )


async def test_ffmpegs_own_playlists_parse_and_cut(
    ffmpeg_path: Path, sources: Sources, tmp_path: Path
) -> None:
    """A window that moved (list size 2 over 3 s of 1 s audio segments), program date-times kept by a cut."""
    stream = parse_stream_dump(_dump(ffmpeg_path, sources.audio_only))
    out = tmp_path / "hls"
    out.mkdir()
    args = live_command(
        str(sources.audio_only), stream, [LiveRendition(0, 0)], out_dir=out, segment_duration_s=1, list_size=2
    )
    await run_ffmpeg(ffmpeg_path, args, duration_s=None, stall_timeout_s=30)
    playlist = MediaPlaylist.parse((out / "0.m3u8").read_text())
    assert len(playlist.segments) == 2
    first = playlist.segments[0]
    assert first.sequence > 0
    assert first.name == f"0-{first.sequence:06d}.ts"
    assert [tag.split(":", 1)[0] for tag in first.tags] == ["#EXTINF", "#EXT-X-PROGRAM-DATE-TIME"]
    cut = MediaPlaylist.parse(playlist.up_to(first.name))
    assert cut.segments == (first,)


# ------------------------------------------------------------------------------------------ redaction


def test_redaction_hides_the_path_of_every_rtmp_url() -> None:
    text = (
        f"Input #0, flv, from 'rtmp://127.0.0.1:1935/live/{KEY}':\n"
        f"rtmps://live.example.org/live/{KEY}?x=1: Connection refused and RTMPE://h/app/{KEY}"
    )
    redacted = redact_urls(text)
    assert KEY not in redacted
    assert redacted == (
        "Input #0, flv, from 'rtmp://127.0.0.1:1935/…':\n"
        "rtmps://live.example.org/… Connection refused and RTMPE://h/…"
    )
    plain = "rtmp://host-only and https://peertube.example/live/abc stay as they are"
    assert redact_urls(plain) == plain


# ------------------------------------------------------------------------------------------ probe_live


async def _listening(port: int) -> None:
    """Until something listens on 127.0.0.1:`port` (read from /proc: a test connection would be the one
    client ffmpeg's listen mode serves)."""
    wanted = f"0100007F:{port:04X}"
    async with asyncio.timeout(10):
        while True:
            rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
            if any(row.split()[1] == wanted and row.split()[3] == "0A" for row in rows):
                return
            await asyncio.sleep(0.02)


async def test_probe_live_reads_a_real_rtmp_stream(ffmpeg_path: Path, sources: Sources) -> None:
    port = free_port()
    url = f"rtmp://127.0.0.1:{port}/live/{KEY}"
    server = await asyncio.create_subprocess_exec(
        str(ffmpeg_path), "-hide_banner", "-loglevel", "quiet", "-nostdin", "-re", "-i", str(sources.av),
        "-c", "copy", "-f", "flv", "-listen", "1", url,
    )  # fmt: skip
    try:
        await _listening(port)
        stream = await probe_live(ffmpeg_path, url, timeout_s=15)
    finally:
        if server.returncode is None:
            server.kill()
        await server.wait()
    assert stream.video is not None
    assert stream.audio is not None
    assert (stream.video.width, stream.video.height, stream.video.fps) == (320, 240, 25.0)
    assert (stream.audio.codec, stream.audio.channels) == ("aac", 1)
    assert stream.bit_rate is None  # a live has no Duration bitrate ("bitrate: N/A")


@asynccontextmanager
async def _silent_server() -> AsyncIterator[tuple[int, asyncio.Event]]:
    """Accepts connections and never answers; the event is set when a client goes away."""
    gone = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass
        gone.set()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], gone
    finally:
        server.close()
        await server.wait_closed()


async def test_probe_live_gives_up_on_a_stream_that_sends_nothing(ffmpeg_path: Path) -> None:
    async with _silent_server() as (port, gone):
        started = asyncio.get_running_loop().time()
        with pytest.raises(ProbeError) as caught:
            await probe_live(ffmpeg_path, f"rtmp://127.0.0.1:{port}/live/{KEY}", timeout_s=1)
        assert asyncio.get_running_loop().time() - started < 5
        await asyncio.wait_for(gone.wait(), 5)  # ffmpeg was killed: its connection closed
    message = str(caught.value)
    assert message == f"the stream rtmp://127.0.0.1:{port}/… sent nothing readable within 1 s"


async def test_probe_live_failures_name_the_url_without_its_key(ffmpeg_path: Path, tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(ProbeError) as caught:
        await probe_live(ffmpeg_path, f"rtmp://127.0.0.1:{port}/live/{KEY}", timeout_s=15)
    message = str(caught.value)
    assert message.startswith(f"cannot read the stream rtmp://127.0.0.1:{port}/…: ")
    assert KEY not in message
    with pytest.raises(FfmpegUnavailable):
        await probe_live(tmp_path / "no-ffmpeg", "rtmp://127.0.0.1/live/x", timeout_s=1)


def test_probe_dump_of_an_audio_stream_needs_no_video() -> None:
    dump = "  Stream #0:0: Audio: aac (LC), 48000 Hz, 5.1(side), fltp, 384 kb/s\n"
    stream = parse_stream_dump(dump)
    assert stream.audio == AudioInfo("aac", None, 48000, 6, "5.1(side)", 384_000)
    assert stream.video is None
    assert stream.input_bitrate is None
