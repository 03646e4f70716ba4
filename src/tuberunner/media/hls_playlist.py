"""The one post-processing step of an HLS transcode: make the variant playlist point at bare file names."""

from __future__ import annotations

import re
from pathlib import Path

# `#EXT-X-MAP:URI="<path>"`: some ffmpeg versions write the segment file's full path here.
_MAP_URI = re.compile(r'(#EXT-X-MAP:URI=")([^"]*)(")')


def fix_hls_playlist(playlist: Path) -> None:
    """Rewrite the playlist so that it names the fragmented MP4 by its bare file name.

    The server stores the playlist next to the file and serves both by name, so a path would point nowhere
    (and leak our temporary directory). PeerTube fixes the `EXT-X-MAP` URI; the segment lines get the same
    treatment here in case an ffmpeg version writes paths there too.
    """
    text = playlist.read_text(encoding="utf-8")
    fixed_lines = []
    for line in text.splitlines(keepends=True):
        if line.startswith("#EXT-X-MAP:"):
            line = _MAP_URI.sub(lambda match: match.group(1) + _bare(match.group(2)) + match.group(3), line)
        elif line.strip() and not line.startswith("#"):
            line = _bare(line.rstrip("\r\n")) + line[len(line.rstrip("\r\n")) :]
        fixed_lines.append(line)
    fixed = "".join(fixed_lines)
    if fixed != text:
        playlist.write_text(fixed, encoding="utf-8")


def _bare(uri: str) -> str:
    return uri.rsplit("/", 1)[-1]
