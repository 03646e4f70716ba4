"""Live HLS files without a server: our playlists from what runners send (live_files)."""

from __future__ import annotations

from pathlib import Path

from tuberunner.coordinator.live_files import LiveFiles, LiveSessionEnded, LiveUpdate

VIDEO = "00000000-0000-4000-8000-000000000001"
MASTER = '#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=1\n0.m3u8\n#EXT-X-MEDIA:TYPE=AUDIO,URI="1.m3u8"\n'


def _runner_playlist(names: list[str]) -> str:
    lines = ["#EXTM3U", "#EXT-X-TARGETDURATION:2"]
    for name in names:
        lines += ["#EXTINF:2.000000,", name]
    return "\n".join(lines) + "\n"


def _send(
    files: LiveFiles, tmp: Path, attempt: int, name: str, listed: list[str], *, master: str | None = None
) -> list[str]:
    chunk = tmp / f"upload-{attempt}-{name}"
    chunk.write_bytes(name.encode())
    playlist = tmp / "playlist"
    playlist.write_text(_runner_playlist(listed))
    master_file = None
    if master is not None:
        master_file = tmp / "master"
        master_file.write_text(master)
    update = LiveUpdate("add-chunk", name, chunk, f"{name.split('-')[0]}.m3u8", playlist, master_file)
    return [p.segment.name for p in files.apply(VIDEO, attempt, update)]


def test_a_whole_session_runner_playlist_keeps_our_window_and_sequence(tmp_path: Path) -> None:
    """A runner whose playlist lists every segment since its start (hls_list_size 0)."""
    files = LiveFiles(tmp_path / "live")
    files.begin_session(VIDEO, 1, list_size=4, segment_s=2.0)
    sent: list[str] = []
    for index in range(30):
        name = f"0-{index:06d}.ts"
        sent.append(name)
        assert _send(files, tmp_path, 1, name, sent) == [f"1-{name}"]
    state = files.state(VIDEO)
    assert state is not None
    rendition = state.renditions["0.m3u8"]
    assert [s.name for s in rendition.segments] == [f"1-0-{i:06d}.ts" for i in range(26, 30)]
    assert rendition.sequence == 26
    served = (files.folder(VIDEO) / "0.m3u8").read_text()
    assert "#EXT-X-MEDIA-SEQUENCE:26\n" in served
    # The window and one more window of retired segments stay on disk; older ones are gone.
    assert len(list(files.folder(VIDEO).glob("*.ts"))) == 8


def test_a_new_attempt_continues_after_a_discontinuity_and_the_master_waits_for_its_playlists(
    tmp_path: Path,
) -> None:
    files = LiveFiles(tmp_path / "live")
    files.begin_session(VIDEO, 1, list_size=3, segment_s=2.0)
    _send(files, tmp_path, 1, "0-000000.ts", ["0-000000.ts"], master=MASTER)
    assert files.servable(VIDEO, "master.m3u8") is None  # 1.m3u8 has no segment yet
    _send(files, tmp_path, 1, "1-000000.ts", ["1-000000.ts"])
    assert files.servable(VIDEO, "master.m3u8") is not None
    # A chunk never listed by its job is dropped when the next job takes over.
    chunk = tmp_path / "orphan"
    chunk.write_bytes(b"x")
    files.apply(VIDEO, 1, LiveUpdate("add-chunk", "0-000001.ts", chunk, None, None, None))
    for index in range(4):  # the next job starts its numbering again
        name = f"0-{index:06d}.ts"
        _send(files, tmp_path, 2, name, [f"0-{i:06d}.ts" for i in range(index + 1)])
    assert files.servable(VIDEO, "1-0-000001.ts") is None
    state = files.state(VIDEO)
    assert state is not None
    rendition = state.renditions["0.m3u8"]
    assert [(s.name, s.discontinuity) for s in rendition.segments] == [
        ("2-0-000001.ts", False),
        ("2-0-000002.ts", False),
        ("2-0-000003.ts", False),
    ]
    assert (rendition.sequence, rendition.discontinuity_sequence) == (2, 1)
    try:
        _send(files, tmp_path, 1, "0-000009.ts", ["0-000009.ts"])
    except LiveSessionEnded:
        pass
    else:
        raise AssertionError("a replaced job's update was applied")
    files.finish(VIDEO)
    assert (files.folder(VIDEO) / "0.m3u8").read_text().endswith("#EXT-X-ENDLIST\n")
