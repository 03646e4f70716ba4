"""Command builders: the exact options (pure), then each command run for real and its output probed."""

from __future__ import annotations

import struct
from dataclasses import replace
from pathlib import Path

import pytest

from tests.media.conftest import CLIP_DURATION_S, CLIP_HEIGHT, CLIP_WIDTH
from tuberunner.media.commands import (
    EncodeSettings,
    audio_merge_command,
    fix_hls_playlist,
    hls_command,
    storyboard_command,
    thumbnail_command,
    web_video_command,
)
from tuberunner.media.errors import NoAudioStream, NoVideoStream
from tuberunner.media.probe import AudioInfo, MediaInfo, VideoInfo, probe
from tuberunner.media.process import run_ffmpeg
from tuberunner.media.profiles import StoryboardSprites, storyboard_sprites, target_bitrate

SETTINGS = EncodeSettings(threads=2)


def _video_info(
    *, width: int = 1920, height: int = 1080, rotation: int = 0, bit_rate: int | None = 8_000_000
) -> MediaInfo:
    return MediaInfo(
        path=Path("/in/video.mp4"),
        format_name="mov,mp4,m4a,3gp,3g2,mj2",
        duration_s=10,
        size_bytes=10_000_000,
        bit_rate=bit_rate,
        video=VideoInfo(
            codec="h264",
            profile="High",
            level=40,
            width=width,
            height=height,
            fps=30,
            pix_fmt="yuv420p",
            bit_rate=None,
            rotation=rotation,
        ),
        audio=AudioInfo(
            codec="aac",
            profile="LC",
            sample_rate=48_000,
            channels=2,
            channel_layout="stereo",
            bit_rate=128_000,
        ),
    )


def _audio_info(path: str = "/in/audio.m4a", *, bit_rate: int = 160_000) -> MediaInfo:
    info = _video_info()
    return MediaInfo(
        path=Path(path),
        format_name="mov,mp4,m4a,3gp,3g2,mj2",
        duration_s=10,
        size_bytes=100_000,
        bit_rate=bit_rate,
        video=None,
        audio=info.audio,
    )


def _option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def _options(args: list[str], name: str) -> list[str]:
    return [args[i + 1] for i, arg in enumerate(args) if arg == name]


# ---------------------------------------------------------------------------------------------------------
# Pure argument checks


def test_web_video_has_the_peertube_preset() -> None:
    args = web_video_command(_video_info(), Path("/out/web.mp4"), resolution=720, fps=30, settings=SETTINGS)
    expected_bitrate = target_bitrate(720, 30, 1.7778, 8_000_000)

    assert args[:6] == ["-hide_banner", "-nostdin", "-y", "-progress", "pipe:1", "-nostats"]
    assert args[6:10] == ["-protocol_whitelist", "file,pipe", "-i", "/in/video.mp4"]
    assert _options(args, "-map") == ["0:v:0", "0:a:0"]
    assert _option(args, "-threads") == "2"
    assert _option(args, "-vcodec") == "libx264"
    assert _option(args, "-vf") == "scale=w=-2:h=720"
    assert _option(args, "-preset") == "veryfast"
    assert _option(args, "-maxrate:v") == str(expected_bitrate)
    assert _option(args, "-bufsize:v") == str(expected_bitrate * 2)
    assert (_option(args, "-b_strategy"), _option(args, "-bf")) == ("1", "16")
    assert (_option(args, "-r"), _option(args, "-g:v")) == ("30", "60")
    assert _option(args, "-pix_fmt") == "yuv420p"
    assert _option(args, "-movflags") == "faststart"
    assert _option(args, "-map_metadata") == "-1"
    assert _option(args, "-max_muxing_queue_size") == "1024"
    assert _option(args, "-acodec") == "copy"
    assert _option(args, "-f") == "mp4"
    assert args[-1] == "/out/web.mp4"
    # VOD rate control is CRF 23 under the VBV cap: never an explicit bitrate or CRF.
    assert "-b:v" not in args
    assert "-crf" not in args


def test_portrait_scales_the_width() -> None:
    portrait = _video_info(width=1080, height=1920)
    rotated = _video_info(rotation=90)

    for info in (portrait, rotated):
        args = web_video_command(info, Path("/out/web.mp4"), resolution=480, fps=30, settings=SETTINGS)
        assert _option(args, "-vf") == "scale=w=480:h=-2"


def test_no_threads_option_when_ffmpeg_chooses() -> None:
    args = web_video_command(_video_info(), Path("/o.mp4"), resolution=720, fps=30, settings=EncodeSettings())
    assert "-threads" not in args


def test_libfdk_aac_is_used_when_available() -> None:
    args = web_video_command(
        _video_info(), Path("/o.mp4"), resolution=720, fps=30, settings=EncodeSettings(has_libfdk_aac=True)
    )
    assert (_option(args, "-acodec"), _option(args, "-q:a")) == ("libfdk_aac", "5")


def test_separated_audio_is_a_second_input() -> None:
    args = web_video_command(
        _video_info(), Path("/o.mp4"), resolution=720, fps=30, settings=SETTINGS, audio_input=_audio_info()
    )

    assert _options(args, "-i") == ["/in/video.mp4", "/in/audio.m4a"]
    assert _options(args, "-map") == ["0:v:0", "1:a:0"]


def test_relative_paths_cannot_be_read_as_options() -> None:
    relative = replace(_video_info(), path=Path("-video.mp4"))
    args = web_video_command(relative, Path("-out.mp4"), resolution=720, fps=30, settings=SETTINGS)
    assert _option(args, "-i") == "./-video.mp4"
    assert args[-1] == "./-out.mp4"


def test_hls_never_copies_audio_and_splits_streams_on_request() -> None:
    info = _video_info()
    playlist, fragmented = Path("/out/u-720.m3u8"), Path("/out/u-720-fragmented.mp4")

    both = hls_command(info, playlist, fragmented, resolution=720, fps=30, settings=SETTINGS)
    video_only = hls_command(
        info, playlist, fragmented, resolution=720, fps=30, settings=SETTINGS, separated_audio=True
    )
    audio_only = hls_command(
        info, playlist, fragmented, resolution=0, fps=0, settings=SETTINGS, separated_audio=True
    )

    assert _option(both, "-acodec") == "aac"
    assert _options(both, "-map") == ["0:v:0", "0:a:0"]
    assert "-an" in video_only
    assert "-acodec" not in video_only
    assert _options(video_only, "-map") == ["0:v:0"]
    assert "-vn" in audio_only
    assert "-vcodec" not in audio_only
    assert _options(audio_only, "-map") == ["0:a:0"]
    for args in (both, video_only, audio_only):
        assert _option(args, "-f") == "hls"
        assert _option(args, "-hls_segment_type") == "fmp4"
        assert _option(args, "-hls_flags") == "single_file"
        assert _option(args, "-hls_time") == "4"
        assert _option(args, "-hls_playlist_type") == "vod"
        assert _option(args, "-hls_list_size") == "0"
        assert _option(args, "-hls_segment_filename") == str(fragmented)
        assert args[-1] == str(playlist)


def test_hls_file_must_sit_next_to_its_playlist() -> None:
    with pytest.raises(ValueError, match="next to its playlist"):
        hls_command(
            _video_info(), Path("/a/p.m3u8"), Path("/b/f.mp4"), resolution=720, fps=30, settings=SETTINGS
        )


def test_audio_only_output_needs_audio() -> None:
    silent = replace(_video_info(), audio=None)
    with pytest.raises(NoAudioStream):
        hls_command(silent, Path("/o/p.m3u8"), Path("/o/f.mp4"), resolution=0, fps=0, settings=SETTINGS)


def test_video_output_needs_a_picture() -> None:
    with pytest.raises(NoVideoStream, match="no video stream"):
        web_video_command(_audio_info(), Path("/o.mp4"), resolution=720, fps=30, settings=SETTINGS)


def test_audio_only_web_video_is_allowed() -> None:
    args = web_video_command(_audio_info(), Path("/o.mp4"), resolution=0, fps=0, settings=SETTINGS)

    assert "-vn" in args
    assert _options(args, "-map") == ["0:a:0"]


def test_audio_merge_keeps_peertube_bitrate_quirk() -> None:
    args = audio_merge_command(
        Path("/in/preview.jpg"),
        _audio_info(bit_rate=100_000),
        Path("/o.mp4"),
        resolution=720,
        fps=25,
        settings=SETTINGS,
    )

    # The audio file is measured as the video: ratio 0, so min(192k, 1.3 x 100k) = 130k.
    assert _option(args, "-maxrate:v") == "130000"
    assert _option(args, "-bufsize:v") == "260000"
    # The looped picture lasts as long as the audio (10 s), whatever ffmpeg's -shortest does.
    assert args[args.index("-loop") : args.index("-loop") + 8] == [
        *("-loop", "1", "-t", "10", "-protocol_whitelist", "file,pipe", "-i", "/in/preview.jpg"),
    ]
    assert _options(args, "-map") == ["0:v:0", "1:a:0"]
    assert _option(args, "-vf") == "scale=trunc(iw/2)*2:trunc(ih/2)*2"
    assert _option(args, "-tune") == "stillimage"
    assert _option(args, "-preset:v") == "veryfast"
    assert "-shortest" in args
    assert (_option(args, "-r"), _option(args, "-g:v")) == ("25", "50")
    assert _option(args, "-acodec") == "copy"


def test_audio_merge_of_an_audio_of_unknown_duration_relies_on_shortest() -> None:
    audio = replace(_audio_info(), duration_s=0.0)

    args = audio_merge_command(
        Path("/p.jpg"), audio, Path("/o.mp4"), resolution=720, fps=25, settings=SETTINGS
    )

    assert args[args.index("-loop") : args.index("-loop") + 3] == ["-loop", "1", "-protocol_whitelist"]
    assert "-shortest" in args


def test_audio_merge_without_audio_is_refused() -> None:
    with pytest.raises(NoAudioStream):
        audio_merge_command(
            Path("/p.jpg"),
            replace(_audio_info(), audio=None),
            Path("/o.mp4"),
            resolution=720,
            fps=25,
            settings=SETTINGS,
        )


def test_storyboard_filter_is_peertube_s() -> None:
    sprites = StoryboardSprites(width=192, height=108, columns=10, rows=6, duration_s=1)
    args = storyboard_command(Path("/in/v.mp4"), Path("/out/sb.jpg"), sprites, SETTINGS)

    assert _option(args, "-filter_complex") == (
        "setpts='N/FRAME_RATE/TB',select='isnan(prev_selected_t)+gte(t-prev_selected_t,1)',"
        "scale=192:108,tile=layout=10x6"
    )
    assert (_option(args, "-frames:v"), _option(args, "-q:v")) == ("1", "2")


def test_thumbnail_options() -> None:
    args = thumbnail_command(
        Path("/v.mp4"), Path("/t.jpg"), seek_s=5, width=850, height=480, settings=SETTINGS
    )

    assert args.index("-ss") < args.index("-i")
    assert _option(args, "-ss") == "5.000"
    assert _option(args, "-filter:v") == "thumbnail=50,scale=850x480:force_original_aspect_ratio=decrease"
    assert _option(args, "-abort_on") == "empty_output"
    assert "-ss" not in thumbnail_command(Path("/v.mp4"), Path("/t.jpg"), seek_s=None, settings=SETTINGS)


def test_fix_hls_playlist_makes_every_uri_bare(tmp_path: Path) -> None:
    playlist = tmp_path / "u-720.m3u8"
    playlist.write_text(
        "#EXTM3U\n"
        '#EXT-X-MAP:URI="/tmp/job/u-720-fragmented.mp4",BYTERANGE="1371@0"\n'
        "#EXTINF:4.000000,\n#EXT-X-BYTERANGE:1000@1371\n/tmp/job/u-720-fragmented.mp4\n#EXT-X-ENDLIST\n"
    )

    fix_hls_playlist(playlist)

    assert playlist.read_text() == (
        "#EXTM3U\n"
        '#EXT-X-MAP:URI="u-720-fragmented.mp4",BYTERANGE="1371@0"\n'
        "#EXTINF:4.000000,\n#EXT-X-BYTERANGE:1000@1371\nu-720-fragmented.mp4\n#EXT-X-ENDLIST\n"
    )


# ---------------------------------------------------------------------------------------------------------
# Real runs


def _top_level_boxes(path: Path) -> list[str]:
    boxes = []
    data = path.read_bytes()
    offset = 0
    while offset + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[offset : offset + 8])
        if size == 1:
            size = struct.unpack(">Q", data[offset + 8 : offset + 16])[0]
        elif size == 0:
            size = len(data) - offset
        boxes.append(kind.decode("latin-1"))
        offset += size
    return boxes


async def test_web_video_output(ffmpeg_path: Path, sample_clip: Path, tmp_path: Path) -> None:
    source = await probe(sample_clip)
    output = tmp_path / "web-144.mp4"

    await run_ffmpeg(
        ffmpeg_path,
        web_video_command(source, output, resolution=144, fps=24, settings=SETTINGS),
        duration_s=source.duration_s,
    )

    result = await probe(output)
    assert result.video is not None
    assert result.audio is not None
    assert (result.video.width, result.video.height) == (256, 144)
    assert result.video.fps == 24
    assert (result.video.codec, result.video.pix_fmt) == ("h264", "yuv420p")
    assert result.audio.codec == "aac"
    assert result.duration_s == pytest.approx(CLIP_DURATION_S, abs=0.2)
    boxes = _top_level_boxes(output)
    assert boxes.index("moov") < boxes.index("mdat"), boxes


async def test_web_video_of_a_rotated_source_is_portrait(
    ffmpeg_path: Path, rotated_clip: Path, tmp_path: Path
) -> None:
    source = await probe(rotated_clip)
    output = tmp_path / "portrait.mp4"

    await run_ffmpeg(
        ffmpeg_path,
        web_video_command(source, output, resolution=144, fps=25, settings=SETTINGS),
        duration_s=source.duration_s,
    )

    result = await probe(output)
    assert result.video is not None
    # ffmpeg applies the rotation while decoding; the short side (width, now) is the resolution.
    assert (result.video.display_width, result.video.display_height) == (144, 256)


async def test_web_video_from_separated_audio(
    ffmpeg_path: Path, video_only_clip: Path, audio_only_clip: Path, tmp_path: Path
) -> None:
    video, audio = await probe(video_only_clip), await probe(audio_only_clip)
    output = tmp_path / "merged.mp4"

    await run_ffmpeg(
        ffmpeg_path,
        web_video_command(video, output, resolution=144, fps=25, settings=SETTINGS, audio_input=audio),
        duration_s=video.duration_s,
    )

    result = await probe(output)
    assert result.video is not None
    assert result.audio is not None
    assert result.audio.codec == "aac"
    assert result.duration_s == pytest.approx(2.0, abs=0.2)


def _parse_playlist(playlist: Path) -> tuple[str, list[tuple[int, int]], list[str]]:
    """(EXT-X-MAP line, byte ranges (length, offset) of the init section and segments, segment URIs)."""
    lines = playlist.read_text().splitlines()
    assert lines[0] == "#EXTM3U"
    assert "#EXT-X-ENDLIST" in lines
    (map_line,) = [line for line in lines if line.startswith("#EXT-X-MAP:")]
    init = map_line.split('BYTERANGE="')[1].rstrip('"').split("@")
    ranges = [(int(init[0]), int(init[1]))]
    for line in lines:
        if line.startswith("#EXT-X-BYTERANGE:"):
            length, offset = line.removeprefix("#EXT-X-BYTERANGE:").split("@")
            ranges.append((int(length), int(offset)))
    uris = [line for line in lines if line and not line.startswith("#")]
    return map_line, ranges, uris


async def _run_hls(
    ffmpeg_path: Path,
    source: Path,
    tmp_path: Path,
    *,
    resolution: int,
    fps: int,
    separated_audio: bool = False,
) -> tuple[Path, Path]:
    info = await probe(source)
    playlist = tmp_path / f"uuid-{resolution}.m3u8"
    fragmented = tmp_path / f"uuid-{resolution}-fragmented.mp4"
    args = hls_command(
        info,
        playlist,
        fragmented,
        resolution=resolution,
        fps=fps,
        settings=SETTINGS,
        separated_audio=separated_audio,
    )
    await run_ffmpeg(ffmpeg_path, args, duration_s=info.duration_s, cwd=tmp_path)
    fix_hls_playlist(playlist)
    return playlist, fragmented


async def test_hls_variant(ffmpeg_path: Path, sample_clip: Path, tmp_path: Path) -> None:
    playlist, fragmented = await _run_hls(ffmpeg_path, sample_clip, tmp_path, resolution=144, fps=25)

    map_line, ranges, uris = _parse_playlist(playlist)
    assert map_line.startswith(f'#EXT-X-MAP:URI="{fragmented.name}",')
    assert uris
    assert set(uris) == {fragmented.name}
    assert len(ranges) == len(uris) + 1
    # The init section and the segments follow each other inside the one file.
    position = 0
    for length, offset in ranges:
        assert offset == position
        position += length
    assert position <= fragmented.stat().st_size
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([playlist.name, fragmented.name])

    result = await probe(fragmented)
    assert result.video is not None
    assert result.audio is not None
    assert (result.video.width, result.video.height, result.video.fps) == (256, 144, 25)
    assert result.duration_s == pytest.approx(CLIP_DURATION_S, abs=0.2)


async def test_hls_audio_only_variant_has_no_video(
    ffmpeg_path: Path, sample_clip: Path, tmp_path: Path
) -> None:
    playlist, fragmented = await _run_hls(ffmpeg_path, sample_clip, tmp_path, resolution=0, fps=0)

    result = await probe(fragmented)
    assert result.video is None
    assert result.audio is not None
    assert result.audio.codec == "aac"
    _, _, uris = _parse_playlist(playlist)
    assert set(uris) == {fragmented.name}


async def test_hls_separated_audio_variant_has_no_audio(
    ffmpeg_path: Path, sample_clip: Path, tmp_path: Path
) -> None:
    _, fragmented = await _run_hls(
        ffmpeg_path, sample_clip, tmp_path, resolution=144, fps=25, separated_audio=True
    )

    result = await probe(fragmented)
    assert result.audio is None
    assert result.video is not None
    assert result.video.height == 144


async def test_audio_merge_output(
    ffmpeg_path: Path, still_image: Path, audio_only_clip: Path, tmp_path: Path
) -> None:
    audio = await probe(audio_only_clip)
    output = tmp_path / "merge.mp4"

    await run_ffmpeg(
        ffmpeg_path,
        audio_merge_command(still_image, audio, output, resolution=180, fps=25, settings=SETTINGS),
        duration_s=audio.duration_s,
    )

    result = await probe(output)
    assert result.video is not None
    assert result.audio is not None
    # 321x181 rounded down to even; the payload resolution does not scale the picture.
    assert (result.video.width, result.video.height) == (320, 180)
    assert result.video.fps == 25
    # As long as the audio, within a frame: ffmpeg 5.1's -shortest alone left 1.5 s of extra picture.
    assert result.duration_s == pytest.approx(audio.duration_s, abs=0.05)
    boxes = _top_level_boxes(output)
    assert boxes.index("moov") < boxes.index("mdat")


async def test_storyboard_output(ffmpeg_path: Path, sample_clip: Path, tmp_path: Path) -> None:
    source = await probe(sample_clip)
    assert source.video is not None
    sprites = storyboard_sprites(source.video.display_width, source.video.display_height, source.duration_s)
    assert sprites == StoryboardSprites(width=192, height=108, columns=3, rows=1, duration_s=1)
    output = tmp_path / "storyboard.jpg"

    await run_ffmpeg(
        ffmpeg_path, storyboard_command(sample_clip, output, sprites, SETTINGS), duration_s=source.duration_s
    )

    result = await probe(output)
    assert result.video is not None
    assert (result.video.width, result.video.height) == (3 * 192, 108)


async def test_thumbnail_output(ffmpeg_path: Path, sample_clip: Path, tmp_path: Path) -> None:
    output = tmp_path / "thumb.jpg"

    await run_ffmpeg(
        ffmpeg_path,
        thumbnail_command(
            sample_clip, output, seek_s=CLIP_DURATION_S / 2, width=100, height=100, settings=SETTINGS
        ),
        duration_s=None,
    )

    result = await probe(output)
    assert result.video is not None
    assert result.video.width == 100
    assert result.video.height == round(100 * CLIP_HEIGHT / CLIP_WIDTH)
