"""Output files of a video: their names, HLS playlists, and the JSON that lists them with public URLs.

Names in storage and in URLs (all under the key `videos/<uuid>/`, recorded in `video_files`):

    <uuid>-<res>.mp4                 web video            /static/web-videos/<name>
    <uuid>-<res>-fragmented.mp4      HLS rendition        /static/streaming-playlists/hls/<uuid>/<name>
    <uuid>-<res>.m3u8                its media playlist   (same folder; res 0 = separated audio)
    master.m3u8                      HLS master playlist  (same folder)
    <uuid>-<lang>.vtt                caption              /static/captions/<uuid>/<name>
    <uuid>-storyboard.jpg            storyboard sprites   /static/storyboards/<uuid>/<name>
    preview.<ext>                    audio upload still   /static/previews/<uuid>/<name>

A URL is served only when it names a recorded file of the right kind; the storage key always comes from the
database row, never from the URL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

from tuberunner.coordinator.videos import VideoFile

MASTER_PLAYLIST_NAME: Final = "master.m3u8"
AUDIO_GROUP_ID: Final = "audio"
# A media playlist of one single-file rendition is a few kB per hour; anything this big is not one.
MAX_PLAYLIST_BYTES: Final = 8 * 1024 * 1024

# URL folder under /static → the file kinds it serves.
STATIC_FOLDERS: Final[dict[str, frozenset[str]]] = {
    "web-videos": frozenset({"web-video"}),
    "streaming-playlists/hls": frozenset({"hls-video", "hls-playlist", "hls-master"}),
    "captions": frozenset({"caption"}),
    "storyboards": frozenset({"storyboard"}),
    "previews": frozenset({"preview"}),
}

_URI_ATTRIBUTE = re.compile(r'URI="[^"]*"')


class PlaylistError(ValueError):
    """A result playlist that is not a single-file HLS media playlist."""


def web_video_name(video_uuid: str, resolution: int) -> str:
    return f"{video_uuid}-{resolution}.mp4"


def hls_video_name(video_uuid: str, resolution: int) -> str:
    return f"{video_uuid}-{resolution}-fragmented.mp4"


def hls_playlist_name(video_uuid: str, resolution: int) -> str:
    return f"{video_uuid}-{resolution}.m3u8"


def caption_name(video_uuid: str, language: str) -> str:
    return f"{video_uuid}-{language}.vtt"


def storyboard_name(video_uuid: str) -> str:
    return f"{video_uuid}-storyboard.jpg"


def static_path(video_uuid: str, file: VideoFile) -> str | None:
    """The public path of a recorded file, or None for kinds that are not published."""
    if file.kind == "web-video":
        return f"/static/web-videos/{file.name}"
    for folder, kinds in STATIC_FOLDERS.items():
        if file.kind in kinds:
            return f"/static/{folder}/{video_uuid}/{file.name}"
    return None


# ------------------------------------------------------------------------------------------ playlists


def rewrite_media_playlist(text: str, file_name: str) -> str:
    """Point every URI of a single-file media playlist (the EXT-X-MAP and each segment) at `file_name`.

    The runner names its fragmented MP4 as it likes; the stored copy has our name. Raises PlaylistError
    when `text` is not a media playlist with at least one segment.
    """
    lines = text.replace("\r\n", "\n").split("\n")
    if not lines or lines[0].lstrip("\ufeff").strip() != "#EXTM3U":
        raise PlaylistError("the resolution playlist is not an HLS playlist (no #EXTM3U header)")
    if any(line.startswith("#EXT-X-STREAM-INF") for line in lines):
        raise PlaylistError("the resolution playlist is a master playlist, not a media playlist")
    segments = 0
    rewritten: list[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#EXT-X-MAP:"):
            line = _URI_ATTRIBUTE.sub(f'URI="{file_name}"', stripped)
        elif stripped and not stripped.startswith("#"):
            line = file_name
            segments += 1
        rewritten.append(line)
    if segments == 0:
        raise PlaylistError("the resolution playlist lists no segment")
    return "\n".join(rewritten)


def playlist_bandwidth(text: str) -> tuple[int, int] | None:
    """(peak, average) bits/s of a byte-range playlist, from its segment sizes and durations.

    This is what BANDWIDTH and AVERAGE-BANDWIDTH mean in RFC 8216 §4.3.4.2; None when the playlist has no
    byte ranges (then the container bit rate is the best estimate).
    """
    duration: float | None = None
    peak = 0.0
    total_bits = 0
    total_s = 0.0
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("#EXTINF:"):
            try:
                duration = float(line[len("#EXTINF:") :].split(",", 1)[0])
            except ValueError:
                duration = None
        elif line.startswith("#EXT-X-BYTERANGE:") and duration:
            try:
                size = int(line[len("#EXT-X-BYTERANGE:") :].split("@", 1)[0])
            except ValueError:
                continue
            peak = max(peak, size * 8 / duration)
            total_bits += size * 8
            total_s += duration
            duration = None
    if total_s <= 0:
        return None
    return round(peak), round(total_bits / total_s)


@dataclass(frozen=True)
class Rendition:
    """What the master playlist says about one HLS rendition (kept in the `extra` of its hls-video row)."""

    resolution: int
    playlist: str
    width: int
    height: int
    fps: float
    codecs: str
    bandwidth: int
    average_bandwidth: int

    def as_extra(self) -> dict[str, Any]:
        return {
            "playlist": self.playlist,
            "width": self.width,
            "height": self.height,
            "fps": self.fps,
            "codecs": self.codecs,
            "bandwidth": self.bandwidth,
            "averageBandwidth": self.average_bandwidth,
        }

    @classmethod
    def from_file(cls, file: VideoFile) -> Rendition | None:
        extra = file.extra or {}
        try:
            return cls(
                resolution=int(file.resolution or 0),
                playlist=str(extra["playlist"]),
                width=int(extra["width"]),
                height=int(extra["height"]),
                fps=float(extra["fps"]),
                codecs=str(extra["codecs"]),
                bandwidth=int(extra["bandwidth"]),
                average_bandwidth=int(extra["averageBandwidth"]),
            )
        except (KeyError, TypeError, ValueError):
            return None


def build_master_playlist(renditions: list[Rendition]) -> str:
    """The master playlist: one variant per video rendition, highest first, and the separated audio
    rendition (resolution 0) as the default member of an AUDIO group that every variant refers to.

    BANDWIDTH and CODECS of a variant include its audio group's, as RFC 8216 requires.
    """
    audio = next((r for r in renditions if r.resolution == 0), None)
    videos = sorted((r for r in renditions if r.resolution > 0), key=lambda r: (-r.resolution, r.playlist))
    lines = ["#EXTM3U", "#EXT-X-VERSION:6", "#EXT-X-INDEPENDENT-SEGMENTS"]
    if audio is not None and videos:
        lines.append(
            f'#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID="{AUDIO_GROUP_ID}",NAME="Audio",'
            f'AUTOSELECT=YES,DEFAULT=YES,URI="{audio.playlist}"'
        )
    for rendition in videos:
        bandwidth, average, codecs = rendition.bandwidth, rendition.average_bandwidth, rendition.codecs
        attributes = []
        if audio is not None:
            bandwidth += audio.bandwidth
            average += audio.average_bandwidth
            codecs = ",".join(c for c in (codecs, audio.codecs) if c)
        attributes += [
            f"BANDWIDTH={bandwidth}",
            f"AVERAGE-BANDWIDTH={average}",
            f"RESOLUTION={rendition.width}x{rendition.height}",
            f"FRAME-RATE={rendition.fps:.3f}",
            f'CODECS="{codecs}"',
        ]
        if audio is not None:
            attributes.append(f'AUDIO="{AUDIO_GROUP_ID}"')
        lines += ["#EXT-X-STREAM-INF:" + ",".join(attributes), rendition.playlist]
    if audio is not None and not videos:
        # Only the audio rendition exists so far: offer it as the one variant.
        lines += [
            f"#EXT-X-STREAM-INF:BANDWIDTH={audio.bandwidth},AVERAGE-BANDWIDTH={audio.average_bandwidth},"
            f'CODECS="{audio.codecs}"',
            audio.playlist,
        ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ JSON


def outputs_json(base_url: str, video_uuid: str, files: list[VideoFile]) -> dict[str, Any]:
    """Every published output of a video with its absolute URL."""

    def url(file: VideoFile) -> str:
        return base_url + (static_path(video_uuid, file) or "")

    web = sorted((f for f in files if f.kind == "web-video"), key=lambda f: -(f.resolution or 0))
    hls_videos = sorted((f for f in files if f.kind == "hls-video"), key=lambda f: -(f.resolution or 0))
    playlists = {f.name: f for f in files if f.kind == "hls-playlist"}
    master = next((f for f in files if f.kind == "hls-master"), None)
    preview = next((f for f in files if f.kind == "preview"), None)
    renditions = []
    for file in hls_videos:
        extra = file.extra or {}
        playlist = playlists.get(str(extra.get("playlist")))
        renditions.append(
            {
                "resolution": file.resolution,
                "fps": file.fps,
                "size": file.size_bytes,
                "codecs": extra.get("codecs"),
                "bandwidth": extra.get("bandwidth"),
                "videoUrl": url(file),
                "playlistUrl": url(playlist) if playlist else None,
            }
        )
    return {
        "webVideos": [
            {"resolution": f.resolution, "fps": f.fps, "size": f.size_bytes, "url": url(f)} for f in web
        ],
        "hls": (
            {"masterPlaylistUrl": url(master) if master else None, "renditions": renditions}
            if renditions or master
            else None
        ),
        "captions": [
            {"language": (f.extra or {}).get("language"), "url": url(f)} for f in files if f.kind == "caption"
        ],
        "storyboards": [
            {"sprites": (f.extra or {}).get("sprites"), "url": url(f)}
            for f in files
            if f.kind == "storyboard"
        ],
        "previewUrl": url(preview) if preview else None,
    }
