"""PeerTube's numbers, checked against the worked values of notes §3.1 and hand-computed cases."""

from __future__ import annotations

import pytest

from tuberunner.media.probe import AudioInfo
from tuberunner.media.profiles import (
    StoryboardSprites,
    aspect_ratio,
    audio_options,
    average_bitrate,
    can_copy_audio,
    compute_output_fps,
    max_audio_kbitrate,
    max_bitrate,
    min_bitrate,
    resolution_ladder,
    storyboard_sprites,
    target_bitrate,
)

RATIO_16_9 = aspect_ratio(1920, 1080)

# notes §3.1 "Worked values for 16:9 input": res -> (avg Mb/s at 30 fps, at 60 fps, floor Mb/s at 30 fps)
WORKED_VALUES = {
    144: (0.21, 0.42, 0.02),
    240: (0.52, 1.04, 0.06),
    360: (1.04, 2.07, 0.14),
    480: (1.47, 2.95, 0.25),
    720: (3.04, 6.08, 0.55),
    1080: (6.22, 12.44, 1.24),
    1440: (9.95, 19.91, 2.21),
    2160: (19.91, 39.81, 4.98),
}


def test_aspect_ratio_is_rounded_to_four_decimals() -> None:
    assert RATIO_16_9 == 1.7778
    assert aspect_ratio(1080, 1920) == 0.5625
    assert aspect_ratio(0, 1080) == 0.0


@pytest.mark.parametrize(("resolution", "expected"), WORKED_VALUES.items())
def test_bitrates_match_the_worked_values_table(
    resolution: int, expected: tuple[float, float, float]
) -> None:
    avg_30, avg_60, floor_30 = expected

    assert round(average_bitrate(resolution, 30, RATIO_16_9) / 1e6, 2) == avg_30
    assert round(average_bitrate(resolution, 60, RATIO_16_9) / 1e6, 2) == avg_60
    assert round(min_bitrate(resolution, 30, RATIO_16_9) / 1e6, 2) == floor_30
    # Without an input bitrate the target is the average.
    assert target_bitrate(resolution, 30, RATIO_16_9, None) == average_bitrate(resolution, 30, RATIO_16_9)


def test_exact_values_follow_the_formula() -> None:
    # floor(720 * (720 * 1.7778) * 30 * 0.11)
    assert average_bitrate(720, 30, RATIO_16_9) == 3_041_318
    assert max_bitrate(720, 30, RATIO_16_9) == 5_253_185
    # A resolution between buckets uses the bucket below: 1000p is priced like 720p.
    assert average_bitrate(1000, 30, RATIO_16_9) == int(1000 * 1000 * 1.7778 * 30 * 0.11)


def test_portrait_uses_the_same_pixel_count_as_landscape() -> None:
    portrait = aspect_ratio(1080, 1920)
    assert average_bitrate(720, 30, portrait) == pytest.approx(average_bitrate(720, 30, RATIO_16_9), rel=1e-3)


def test_target_is_capped_by_the_input_bitrate_plus_30_percent_but_never_below_the_floor() -> None:
    assert target_bitrate(720, 30, RATIO_16_9, 1_000_000) == 1_300_000
    assert target_bitrate(720, 30, RATIO_16_9, 10_000_000) == 3_041_318
    assert target_bitrate(720, 30, RATIO_16_9, 100_000) == min_bitrate(720, 30, RATIO_16_9)


def test_no_picture_falls_back_to_fixed_values() -> None:
    # The audio-merge quirk: the audio file is measured as if it were the video, so the ratio is 0.
    assert average_bitrate(720, 25, 0) == 192_000
    assert min_bitrate(720, 25, 0) == 10_000
    assert max_bitrate(720, 25, 0) == 256_000
    assert target_bitrate(720, 25, 0, 128_000) == 166_400
    assert target_bitrate(720, 25, 0, 320_000) == 192_000
    assert target_bitrate(720, 25, 0, 5_000) == 10_000


# ---------------------------------------------------------------------------------------------------------
# Audio


def _audio(codec: str = "aac", bit_rate: int | None = 128_000, layout: str | None = "stereo") -> AudioInfo:
    return AudioInfo(
        codec=codec, profile=None, sample_rate=48_000, channels=2, channel_layout=layout, bit_rate=bit_rate
    )


@pytest.mark.parametrize(
    ("codec", "bit_rate", "expected"),
    [
        ("aac", None, 256),
        ("aac", 128_000, -1),
        ("aac", 384_000, -1),
        ("aac", 384_001, 384),
        ("mp3", 192_000, 128),
        ("mp3", 192_001, 256),
        ("opus", 384_000, 256),
        ("flac", 900_000, 384),
    ],
)
def test_max_audio_kbitrate(codec: str, bit_rate: int | None, expected: int) -> None:
    assert max_audio_kbitrate(codec, bit_rate) == expected


@pytest.mark.parametrize(
    ("audio", "expected"),
    [
        (_audio(), True),
        (_audio(bit_rate=400_000), False),
        (_audio(bit_rate=None), False),
        (_audio(layout=None), False),
        (_audio(layout="quad"), False),
        (_audio(codec="mp3"), False),
        (None, True),
    ],
)
def test_can_copy_audio(audio: AudioInfo | None, expected: bool) -> None:
    assert can_copy_audio(audio) is expected


def test_audio_options() -> None:
    assert audio_options(None, False) == ["-an"]
    assert audio_options(_audio(), False) == ["-acodec", "copy"]
    assert audio_options(_audio(), True) == ["-acodec", "libfdk_aac", "-q:a", "5"]
    # AAC that may not be copied keeps the encoder's default rate.
    assert audio_options(_audio(), False, can_copy=False) == ["-acodec", "aac", "-channel_layout", "stereo"]
    assert audio_options(_audio(bit_rate=500_000), False) == [
        *("-acodec", "aac", "-channel_layout", "stereo", "-b:a", "384k"),
    ]
    assert audio_options(_audio(codec="mp3", bit_rate=320_000), False) == [
        *("-acodec", "aac", "-channel_layout", "stereo", "-b:a", "256k"),
    ]
    assert audio_options(_audio(bit_rate=None), False)[-2:] == ["-b:a", "256k"]


# ---------------------------------------------------------------------------------------------------------
# Frame rate and ladder


@pytest.mark.parametrize(
    ("input_fps", "resolution", "is_origin", "expected"),
    [
        (25, 1080, True, 25),
        (60, 480, False, 30),
        (60, 720, False, 60),
        (60, 480, True, 60),
        (50, 360, False, 25),
        (48, 240, False, 24),
        (59.94, 480, False, 30),
        (29.97, 480, False, 30),
        (
            45,
            480,
            False,
            30,
        ),  # no divisor: smallest remainder (45 % 30 = 15 beats 45 % 24 = 21, 45 % 25 = 20)
        (120, 1080, True, 60),
        (100, 1080, True, 50),
        (0.6, 1080, True, 1),
        (25, 0, False, 0),
    ],
)
def test_compute_output_fps(input_fps: float, resolution: int, is_origin: bool, expected: int) -> None:
    assert compute_output_fps(input_fps, resolution, is_origin) == expected


def test_compute_output_fps_honours_a_lower_max() -> None:
    assert compute_output_fps(60, 1080, True, max_fps=30) == 30
    # Above the max, only the "HD" rates 50/60/max that fit are candidates: here just 30.
    assert compute_output_fps(50, 1080, True, max_fps=30) == 30
    assert compute_output_fps(90, 1080, True, max_fps=50) == 50


def test_compute_output_fps_refuses_a_near_zero_rate() -> None:
    with pytest.raises(ValueError, match=r"lower than 0\.1"):
        compute_output_fps(0.05, 720, True)


ALL = [0, 144, 240, 360, 480, 720, 1080, 1440, 2160]


@pytest.mark.parametrize(
    ("short_side", "enabled", "kwargs", "expected"),
    [
        (1080, ALL, {}, [1080, 720, 480, 360, 240, 144, 0]),
        (1080, [240, 720], {}, [720, 240]),
        (1000, [480, 720, 1080], {}, [720, 480]),
        (181, ALL, {}, [144, 0]),
        (101, ALL, {}, [102, 0]),
        (101, ALL, {"has_audio": False}, [102]),
        (1000, [480, 720], {"always_include_input": True}, [1000, 720, 480]),
        (1080, [0, 1080], {"always_include_input": True}, [1080, 0]),
    ],
)
def test_resolution_ladder(
    short_side: int, enabled: list[int], kwargs: dict[str, bool], expected: list[int]
) -> None:
    assert resolution_ladder(short_side, enabled, **kwargs) == expected


# ---------------------------------------------------------------------------------------------------------
# Storyboard


@pytest.mark.parametrize(
    ("width", "height", "duration_s", "expected"),
    [
        (1920, 1080, 2.4, None),
        # Fewest rows first: 6 rows x 10 columns hold 60 sprites.
        (1920, 1080, 60, StoryboardSprites(width=192, height=108, columns=10, rows=6, duration_s=1)),
        (1920, 1080, 200, StoryboardSprites(width=192, height=108, columns=10, rows=10, duration_s=2)),
        (1920, 1080, 3600, StoryboardSprites(width=192, height=108, columns=11, rows=11, duration_s=30)),
        (1080, 1920, 10, StoryboardSprites(width=108, height=192, columns=10, rows=1, duration_s=1)),
        # 2.5 s rounds to 3 the JavaScript way (half up), so a sheet is made.
        (640, 480, 2.5, StoryboardSprites(width=192, height=144, columns=3, rows=1, duration_s=1)),
        (0, 0, 60, None),
    ],
)
def test_storyboard_sprites(
    width: int, height: int, duration_s: float, expected: StoryboardSprites | None
) -> None:
    assert storyboard_sprites(width, height, duration_s) == expected
