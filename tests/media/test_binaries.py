from __future__ import annotations

import logging
import os
import stat
import time
from pathlib import Path

import imageio_ffmpeg
import pytest
from typer.testing import CliRunner

from tuberunner.cli import app
from tuberunner.media.binaries import (
    FFMPEG_PATH_ENV,
    MINIMUM_RELEASE,
    check_ffmpeg,
    find_ffmpeg,
    parse_encoders,
    parse_release,
)
from tuberunner.media.errors import FfmpegUnavailable

ENCODERS_SAMPLE = """\
Encoders:
 V..... = Video
 A..... = Audio
 ------
 V....D libx264              libx264 H.264 / AVC / MPEG-4 AVC / MPEG-4 part 10 (codec h264)
 VFS..D mjpeg                MJPEG (Motion JPEG)
 A....D aac                  AAC (Advanced Audio Coding)
"""


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _fake_ffmpeg(directory: Path, encoders: str, version: str = "6.1-fake") -> Path:
    # Answers -version and -encoders like ffmpeg, listing only the given encoders.
    listing = "\n".join(f" A....D {name}  {name} encoder" for name in encoders.split())
    return _script(
        directory / "ffmpeg",
        'case "$2" in\n'
        f'  -version) echo "ffmpeg version {version} Copyright (c) 2000-2023";;\n'
        f'  -encoders) printf "Encoders:\\n ------\\n{listing}\\n";;\n'
        "esac\n",
    )


def test_parse_encoders_reads_the_listing_after_the_separator() -> None:
    assert parse_encoders(ENCODERS_SAMPLE) == frozenset({"libx264", "mjpeg", "aac"})


def test_configured_path_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    configured = _script(tmp_path / "my-ffmpeg", "exit 0\n")
    monkeypatch.setenv(FFMPEG_PATH_ENV, "/somewhere/else")

    assert find_ffmpeg(str(configured)) == configured


def test_a_configured_path_that_does_not_exist_is_an_error_not_a_fallback(tmp_path: Path) -> None:
    with pytest.raises(FfmpegUnavailable, match=r"configured ffmpeg path .* does not exist"):
        find_ffmpeg(str(tmp_path / "missing"))


def test_a_configured_file_that_is_not_executable_is_refused(tmp_path: Path) -> None:
    plain = tmp_path / "ffmpeg"
    plain.write_text("")
    with pytest.raises(FfmpegUnavailable, match="not executable"):
        find_ffmpeg(str(plain))


def test_environment_variable_comes_next(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from_env = _script(tmp_path / "env-ffmpeg", "exit 0\n")
    monkeypatch.setenv(FFMPEG_PATH_ENV, str(from_env))

    assert find_ffmpeg() == from_env


def test_path_comes_before_the_bundled_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    on_path = _script(tmp_path / "ffmpeg", "exit 0\n")
    monkeypatch.delenv(FFMPEG_PATH_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))

    assert find_ffmpeg() == on_path


def test_bundled_binary_is_the_last_resort(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FFMPEG_PATH_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))

    found = find_ffmpeg()

    assert found == Path(imageio_ffmpeg.get_ffmpeg_exe())
    assert os.access(found, os.X_OK)


async def test_real_ffmpeg_has_what_the_default_profile_needs(ffmpeg_path: Path) -> None:
    capabilities = await check_ffmpeg(ffmpeg_path)

    assert {"libx264", "aac"} <= capabilities.encoders
    assert capabilities.has_libfdk_aac == ("libfdk_aac" in capabilities.encoders)
    assert capabilities.version


async def test_fake_ffmpeg_without_libx264_is_refused(tmp_path: Path) -> None:
    fake = _fake_ffmpeg(tmp_path, "aac mjpeg")

    with pytest.raises(FfmpegUnavailable, match="no libx264 encoder"):
        await check_ffmpeg(fake)


async def test_fake_ffmpeg_with_libfdk_is_recognised(tmp_path: Path) -> None:
    fake = _fake_ffmpeg(tmp_path, "libx264 libfdk_aac")

    capabilities = await check_ffmpeg(fake)

    assert capabilities.version == "6.1-fake"
    assert capabilities.has_libfdk_aac


@pytest.mark.parametrize(
    ("version", "release"),
    [
        ("5.1.9-0+deb12u1", (5, 1)),
        ("n9.0.2-17-g2a571b6068-20260930", (9, 0)),
        ("7.0.2-static", (7, 0)),
        ("4.4.2-0ubuntu0.22.04.1", (4, 4)),
        ("N-113000-g1ee7b8b", None),
        ("git-2020-08-31-4a11a6f", None),
    ],
)
def test_parse_release_reads_major_and_minor(version: str, release: tuple[int, int] | None) -> None:
    assert parse_release(version) == release


async def test_an_ffmpeg_older_than_the_minimum_is_refused_with_the_way_out(tmp_path: Path) -> None:
    fake = _fake_ffmpeg(tmp_path, "libx264 aac", version="4.4.2-0ubuntu0.22.04.1")

    with pytest.raises(FfmpegUnavailable, match=r"version 4\.4\.2.*older than 5\.1") as refused:
        await check_ffmpeg(fake)

    assert FFMPEG_PATH_ENV in str(refused.value)
    assert imageio_ffmpeg.get_ffmpeg_exe() in str(refused.value)


@pytest.mark.parametrize("version", ["5.1.9-0+deb12u1", "N-113000-g1ee7b8b"])
async def test_the_minimum_release_and_a_build_without_a_release_number_are_accepted(
    tmp_path: Path, version: str
) -> None:
    capabilities = await check_ffmpeg(_fake_ffmpeg(tmp_path, "libx264 aac", version=version))

    assert capabilities.version == version
    assert capabilities.release == parse_release(version)
    assert MINIMUM_RELEASE == (5, 1)


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(["server"], id="runner"),
        pytest.param(["coordinator", "serve", "--data-dir", "{tmp}/data", "--port", "0"], id="coordinator"),
        pytest.param(["transcode", "{fake}", "-o", "{tmp}/out"], id="one-shot"),
    ],
)
def test_every_entry_point_refuses_an_old_ffmpeg_at_start_up(
    tmp_path: Path, command: list[str], root_level: logging.Logger
) -> None:
    # In process (the CLI sets up logging: `root_level` puts it back); each exits before serving anything.
    fake = _fake_ffmpeg(tmp_path, "libx264 aac", version="4.4.2-0ubuntu0.22.04.1")
    env = {
        FFMPEG_PATH_ENV: str(fake),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
    }
    args = [part.format(tmp=tmp_path, fake=fake) for part in command]

    result = CliRunner().invoke(app, args, env=env)

    assert result.exit_code == 2, result.output
    assert "older than 5.1" in result.stderr


async def test_missing_binary_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(FfmpegUnavailable, match="cannot run ffmpeg"):
        await check_ffmpeg(tmp_path / "nope")


async def test_something_that_is_not_ffmpeg_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FfmpegUnavailable, match="does not look like ffmpeg"):
        await check_ffmpeg(_script(tmp_path / "ffmpeg", "echo hello\n"))


async def test_a_hanging_binary_is_given_up_after_the_timeout(tmp_path: Path) -> None:
    hanging = _script(tmp_path / "ffmpeg", "exec sleep 30\n")
    started = time.monotonic()

    with pytest.raises(FfmpegUnavailable, match="did not answer"):
        await check_ffmpeg(hanging, timeout_s=0.3)

    assert time.monotonic() - started < 3
