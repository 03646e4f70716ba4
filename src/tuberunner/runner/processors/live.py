"""`live-rtmp-hls-transcoding`: pull the RTMP stream, transcode every rendition with one ffmpeg, and upload
each segment as soon as ffmpeg lists it (spec §7.4).

    probe the stream ─► ffmpeg (all renditions) ─► media playlists, read every 100 ms
                                                      │ new segment: queued on its rendition
                                                      ▼
                           one uploader per rendition: add-chunk (segment + its playlist cut just after it,
                           the master once every rendition has a segment), then remove-chunk for what left
                           ffmpeg's window; the local file goes once it is both sent and out of the window

* A segment is uploaded once ffmpeg lists it in its playlist (ffmpeg writes a playlist only after closing
  the segment), not when the next file appears as the official runner does: that saves a whole segment of
  lag. The playlist sent never lists a segment the server does not have.
* Uploads never block ffmpeg: each rendition's queue holds what ffmpeg listed and the server does not have
  yet. When uploads fall behind (slow or failing server), a segment that leaves ffmpeg's window before it
  could be sent is skipped (deleted, counted, logged): viewers would not be offered it any more, so sending
  it late only adds lag. A segment ffmpeg could not write whole (a full disk: not a whole number of MPEG-TS
  packets) is skipped too; the playlists sent after a skip start after it. Transient failures are retried
  until the segment leaves the window; no update landing for `LIVE_LEASE_S` ends the job (the server has
  taken it back by then: PeerTube's stalled-live threshold is 30 s).
* The stream ends (ffmpeg exits once the stream does): the last segments go out, then `success`. A server
  answering "not in processing state" (PeerTube: "Session of this live ended") stops ffmpeg at once and the
  job ends with `success`, as the official runner does; 404 (job deleted or handed to another runner) stops
  it with nothing to report. Cancelling the job task kills ffmpeg's process group before anything else.
* Stall watchdog: no new segment for `stall_after_s` (5 segments, at least 20 s) kills ffmpeg and reports
  an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from collections import deque
from dataclasses import dataclass, field

from tuberunner.media.errors import FfmpegFailed, FfmpegRunError, FfmpegUnavailable, ProbeError
from tuberunner.media.live import (
    MASTER_PLAYLIST,
    LiveInput,
    LiveRendition,
    MediaPlaylist,
    PlaylistSegment,
    live_command,
    probe_live,
    variant_count,
)
from tuberunner.media.process import redact_urls, run_ffmpeg
from tuberunner.media.progress import Progress
from tuberunner.protocol.errors import ErrorCode
from tuberunner.protocol.payloads import LivePayload
from tuberunner.runner.errors import JobFailed, JobGone, RequestRejected, TransientError
from tuberunner.runner.job import JobContext, JobOutput, LiveChunkUpdate, LiveLink
from tuberunner.runner.processors.common import payload_of

__all__ = ["LIVE_LEASE_S", "live"]

log = logging.getLogger(__name__)

# How often ffmpeg's playlists are read (a stat each; read again only when changed).
POLL_S = 0.1
# PeerTube errors a live job without an update for 30 s (remote_runners.stalled_jobs.live).
LIVE_LEASE_S = 30.0
_PROBE_TIMEOUT_S = 20.0
_RETRY_FIRST_S = 0.25
# ffmpeg's MPEG-TS muxer writes whole packets: any other size is a file it could not finish.
_TS_PACKET_BYTES = 188
# No new segment for 5 segment durations, and for at least this long: the stream has stalled. A module
# setting, so that a test can shorten it.
STALL_MIN_S = 20.0


def stall_after_s(segment_duration_s: float) -> float:
    return max(5 * segment_duration_s, STALL_MIN_S)


async def live(ctx: JobContext) -> JobOutput:
    payload = payload_of(ctx, LivePayload)
    if ctx.live is None:
        raise JobFailed("this runner cannot send live segments (no live link)")
    url = payload.input.rtmpUrl
    renditions = [LiveRendition(r.resolution, r.fps) for r in payload.output.toTranscode]
    ctx.report_progress(None)
    started = time.monotonic()
    try:
        stream = await probe_live(ctx.settings.ffmpeg, url, timeout_s=_PROBE_TIMEOUT_S)
    except ProbeError as exc:
        raise JobFailed(f"Cannot read the live stream: {exc}") from exc
    except FfmpegUnavailable as exc:
        raise JobFailed(f"Cannot read the live stream: {exc}") from exc
    log.info(
        "job %s: stream read in %.2f s: %s, %s; transcoding to %s",
        ctx.job.uuid,
        time.monotonic() - started,
        "no video"
        if stream.video is None
        else f"{stream.video.width}x{stream.video.height} {stream.video.codec}",
        "no audio" if stream.audio is None else stream.audio.codec,
        ", ".join(f"{r.resolution}p{r.fps}" for r in renditions),
    )
    session = LiveSession(
        ctx,
        ctx.live,
        stream,
        renditions,
        segment_duration_s=payload.output.segmentDuration,
        list_size=payload.output.segmentListSize,
    )
    await session.run(url)
    return JobOutput(files={})


@dataclass(eq=False)
class _Rendition:
    """One media playlist of ffmpeg's and what its uploader has to do."""

    name: str
    playlist: MediaPlaylist | None = None
    # (mtime_ns, size) of the playlist file when last read.
    seen: tuple[int, int] | None = None
    next_sequence: int = 0
    queue: deque[PlaylistSegment] = field(default_factory=deque)
    removals: deque[str] = field(default_factory=deque)
    # Sent and still in ffmpeg's window: removed (on the server and here) once it leaves.
    sent: set[str] = field(default_factory=set)
    listed: set[str] = field(default_factory=set)
    listed_at: dict[str, float] = field(default_factory=dict)
    # The playlists sent list no segment below this one: one that could not be sent may still be in the
    # window (an incomplete file).
    first_sequence: int = 0
    sent_any: bool = False
    # Set once a first segment of this rendition is on its way, and once the server has one.
    first_started: bool = False
    first_sent: asyncio.Event = field(default_factory=asyncio.Event)
    busy: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def idle(self) -> bool:
        return not self.queue and not self.removals and not self.busy


class _SessionEnded(Exception):
    """The server ended the live session: stop, then `success`."""


class LiveSession:
    def __init__(
        self,
        ctx: JobContext,
        link: LiveLink,
        stream: LiveInput,
        renditions: list[LiveRendition],
        *,
        segment_duration_s: float,
        list_size: int,
    ) -> None:
        self.ctx = ctx
        self.link = link
        self.stream = stream
        self.renditions_asked = renditions
        self.segment_duration_s = segment_duration_s
        self.list_size = list_size
        self.out = ctx.work_dir / "hls"
        self.renditions = [_Rendition(f"{n}.m3u8") for n in range(variant_count(stream, renditions))]
        self.master_sent = False
        self.first_sends_started = 0
        self.last_segment_at = time.monotonic()
        self.last_delivery_at = time.monotonic()
        self.failure: BaseException | None = None
        self.changed = asyncio.Event()
        self.uploaded = 0
        self.skipped = 0
        self.lags_s: list[float] = []

    async def run(self, url: str) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        settings = self.ctx.settings
        args = live_command(
            url,
            self.stream,
            self.renditions_asked,
            out_dir=self.out,
            segment_duration_s=self.segment_duration_s,
            list_size=self.list_size,
            threads=settings.threads,
            has_libfdk_aac=settings.has_libfdk_aac,
        )
        stall_s = stall_after_s(self.segment_duration_s)

        def on_progress(progress: Progress) -> None:
            if progress.speed is not None:
                self.ctx.report_speed(progress.speed)

        ffmpeg = asyncio.ensure_future(
            run_ffmpeg(
                settings.ffmpeg,
                args,
                duration_s=None,
                on_progress=on_progress,
                # A backstop: the session's own watchdog (no new segment) fires first, with its message.
                stall_timeout_s=stall_s + self.segment_duration_s,
                nice=settings.nice,
                cwd=self.ctx.work_dir,
            )
        )
        ffmpeg.add_done_callback(lambda _: self.changed.set())
        uploaders = [asyncio.ensure_future(self._uploader(r)) for r in self.renditions]
        started = time.monotonic()
        try:
            await self._follow(ffmpeg, stall_s)
        except _SessionEnded as exc:
            log.info("job %s: %s; stopping the live and reporting success", self.ctx.job.uuid, exc)
        finally:
            for task in [ffmpeg, *uploaders]:
                task.cancel()
            # ffmpeg's process group is killed by run_ffmpeg's cancellation before this returns.
            await asyncio.gather(ffmpeg, *uploaders, return_exceptions=True)
            lag = ""
            if self.lags_s:
                lag = f", lag median {statistics.median(self.lags_s):.2f} s, max {max(self.lags_s):.2f} s"
            log.info(
                "job %s: live over after %.0f s: %d segment(s) uploaded, %d skipped%s",
                self.ctx.job.uuid,
                time.monotonic() - started,
                self.uploaded,
                self.skipped,
                lag,
            )

    async def _follow(self, ffmpeg: asyncio.Future[None], stall_s: float) -> None:
        """Read the playlists until ffmpeg ends and its last segments are out; raise what went wrong."""
        while True:
            self._raise_failure()
            self._scan()
            if ffmpeg.done():
                self._ended(ffmpeg)
                await self._drain()
                return
            if time.monotonic() - self.last_segment_at > stall_s:
                raise JobFailed(
                    f"Live stalled: ffmpeg wrote no segment for {stall_s:g} s (the stream sends nothing)"
                )
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_S):
                    await self.changed.wait()

    def _raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure

    def _ended(self, ffmpeg: asyncio.Future[None]) -> None:
        """ffmpeg exited: the end of the stream, unless it failed before writing anything."""
        self._scan()
        exc = ffmpeg.exception()
        if exc is None:
            return
        produced = any(r.next_sequence for r in self.renditions)
        if isinstance(exc, FfmpegFailed) and produced:
            # An input that ends abruptly (publisher gone, connection reset) is how lives end.
            log.info(
                "job %s: ffmpeg ended with code %s after the stream stopped: %s",
                self.ctx.job.uuid,
                exc.exit_code,
                redact_urls(exc.stderr_tail.strip().splitlines()[-1] if exc.stderr_tail.strip() else ""),
            )
            return
        if isinstance(exc, FfmpegFailed):
            tail = redact_urls(exc.stderr_tail[-3000:])
            message = f"Live transcoding failed: {redact_urls(str(exc))}"
            raise JobFailed(f"{message}\n--- ffmpeg stderr (end) ---\n{tail}")
        if isinstance(exc, FfmpegRunError | FfmpegUnavailable):
            raise JobFailed(f"Live transcoding failed: {redact_urls(str(exc))}")
        raise exc

    async def _drain(self) -> None:
        """Wait for the last segments to be uploaded (bounded: a server that stopped answering has ended
        the live anyway)."""
        deadline = time.monotonic() + max(3 * self.segment_duration_s, 15.0)
        while not all(r.idle for r in self.renditions):
            self._raise_failure()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.warning("job %s: the last live segments could not all be sent in time", self.ctx.job.uuid)
                return
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(POLL_S, remaining)):
                    await self.changed.wait()
        self._raise_failure()

    # ------------------------------------------------------------------ playlists

    def _scan(self) -> None:
        for rendition in self.renditions:
            path = self.out / rendition.name
            try:
                stat = path.stat()
                if (stat.st_mtime_ns, stat.st_size) == rendition.seen:
                    continue
                text = path.read_text("utf-8")
            except FileNotFoundError:
                continue
            rendition.seen = (stat.st_mtime_ns, stat.st_size)
            playlist = MediaPlaylist.parse(text)
            if _whole(playlist, text, rendition.playlist):
                self._update(rendition, playlist)
            else:  # written on a full disk: the next whole version tells
                log.debug("job %s: %s read incomplete, ignored", self.ctx.job.uuid, rendition.name)

    def _update(self, rendition: _Rendition, playlist: MediaPlaylist) -> None:
        now = time.monotonic()
        for segment in playlist.segments:
            if segment.sequence >= rendition.next_sequence:
                rendition.next_sequence = segment.sequence + 1
                rendition.queue.append(segment)
                rendition.listed_at[segment.name] = now
                self.last_segment_at = now
        names = set(playlist.names())
        left = rendition.listed - names
        rendition.listed = names
        rendition.playlist = playlist
        for name in sorted(left):
            if name in rendition.sent:
                rendition.removals.append(name)
                continue
            waiting = next((s for s in rendition.queue if s.name == name), None)
            in_flight = rendition.busy and bool(rendition.queue) and rendition.queue[0] is waiting
            if waiting is not None and not in_flight:  # the one being sent is judged by its sender
                self._skip_late(rendition, waiting)
        rendition.wake.set()

    def _skip_late(self, rendition: _Rendition, segment: PlaylistSegment) -> None:
        """`segment` left ffmpeg's window before the server got it: no viewer would be offered it now."""
        self._skip(rendition, segment, "it left the window before it could be uploaded (uploads are behind)")

    def _skip(self, rendition: _Rendition, segment: PlaylistSegment, why: str) -> None:
        """Never send `segment`; the playlists sent from now on start after it."""
        rendition.queue.remove(segment)
        rendition.first_sequence = max(rendition.first_sequence, segment.sequence + 1)
        self._drop(rendition, segment.name)
        self.skipped += 1
        self.link.segment_done("skipped", None)
        log.warning("job %s: live segment %s skipped: %s", self.ctx.job.uuid, segment.name, why)

    def _drop(self, rendition: _Rendition, name: str) -> None:
        (self.out / name).unlink(missing_ok=True)
        rendition.listed_at.pop(name, None)

    # ------------------------------------------------------------------ uploads

    async def _uploader(self, rendition: _Rendition) -> None:
        try:
            while True:
                await rendition.wake.wait()
                rendition.wake.clear()
                while rendition.queue or rendition.removals:
                    rendition.busy = True
                    try:
                        if rendition.queue:
                            await self._add(rendition, rendition.queue[0])
                        else:
                            await self._remove(rendition, rendition.removals[0])
                    finally:
                        rendition.busy = False
                        self.changed.set()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the session's loop, which raises it
            self.failure = exc
            self.changed.set()

    async def _add(self, rendition: _Rendition, segment: PlaylistSegment) -> None:
        playlist = rendition.playlist
        if playlist is None or segment.name not in rendition.listed:
            self._skip_late(rendition, segment)
            return
        chunk = self.out / segment.name
        size = chunk.stat().st_size if chunk.exists() else 0
        if size == 0 or size % _TS_PACKET_BYTES:
            # ffmpeg lists a segment it could not write whole (a full disk): viewers must not get it.
            self._skip(rendition, segment, f"ffmpeg wrote {size} bytes of it, not whole MPEG-TS packets")
            return
        text = playlist.up_to(segment.name, first_sequence=rendition.first_sequence)
        master = await self._master_to_send(rendition)
        update = LiveChunkUpdate(
            "add-chunk",
            segment.name,
            chunk_file=chunk,
            playlist=(rendition.name, text),
            master=master,
        )
        if not await self._send(update, rendition, segment):
            self._skip_late(rendition, segment)
            return
        rendition.queue.popleft()
        rendition.sent.add(segment.name)
        rendition.sent_any = True
        rendition.first_sent.set()
        if master is not None:
            self.master_sent = True
        listed_at = rendition.listed_at.get(segment.name)
        lag = time.monotonic() - listed_at if listed_at is not None else None
        if lag is not None:
            self.lags_s.append(lag)
        self.uploaded += 1
        self.link.segment_done("uploaded", lag)
        if self.uploaded == 1:
            log.info("job %s: first live segment sent (%s)", self.ctx.job.uuid, segment.name)
        log.debug("job %s: %s sent, %.2f s after ffmpeg listed it", self.ctx.job.uuid, segment.name, lag or 0)
        if segment.name not in rendition.listed:
            rendition.removals.append(segment.name)

    async def _master_to_send(self, rendition: _Rendition) -> str | None:
        """ffmpeg's master, with the update that gives the last rendition its first segment (a master
        naming playlists that answer 404 makes players give up). The renditions' first segments come
        together: the last one to go waits (a few dozen ms) for the others to land and takes the master,
        which would otherwise wait for the next segment."""
        if self.master_sent:
            return None
        if not rendition.first_started:
            rendition.first_started = True
            self.first_sends_started += 1
            if self.first_sends_started == len(self.renditions):
                others = [r.first_sent.wait() for r in self.renditions if r is not rendition]
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.segment_duration_s):
                        await asyncio.gather(*others)
        if not all(r.sent_any or r is rendition for r in self.renditions):
            return None
        try:
            text = (self.out / MASTER_PLAYLIST).read_text("utf-8")
        except FileNotFoundError:
            return None
        if not all(r.name in text for r in self.renditions):
            return None  # not written yet, or cut short by a full disk
        return text

    async def _remove(self, rendition: _Rendition, name: str) -> None:
        await self._send(LiveChunkUpdate("remove-chunk", name), rendition, None)
        rendition.removals.popleft()
        rendition.sent.discard(name)
        self._drop(rendition, name)

    async def _send(
        self, update: LiveChunkUpdate, rendition: _Rendition, segment: PlaylistSegment | None
    ) -> bool:
        """Send until the server has it; False when `segment` left the window meanwhile (skipped)."""
        failures = 0
        while True:
            try:
                await self.link.send(update)
            except JobGone as exc:
                if exc.code == ErrorCode.JOB_NOT_IN_PROCESSING_STATE:
                    raise _SessionEnded(exc.message) from exc
                raise
            except RequestRejected as exc:
                what = f"The server refused live segment {update.chunk_name}"
                raise JobFailed(f"{what}: {exc.message}") from exc
            except TransientError as exc:
                failures += 1
                silent_s = time.monotonic() - self.last_delivery_at
                if silent_s > LIVE_LEASE_S:
                    raise TransientError(
                        f"no live update delivered for {silent_s:.0f} s: {exc.message}",
                        status=exc.status,
                        code=exc.code,
                    ) from exc
                log.log(
                    logging.WARNING if failures == 1 else logging.DEBUG,
                    "job %s: %s not delivered (%s); retrying",
                    self.ctx.job.uuid,
                    update.chunk_name,
                    exc.message,
                )
                await asyncio.sleep(min(_RETRY_FIRST_S * 2 ** (failures - 1), self.segment_duration_s))
                if segment is not None and segment.name not in rendition.listed:
                    return False
                continue
            self.last_delivery_at = time.monotonic()
            return True


def _whole(playlist: MediaPlaylist, text: str, previous: MediaPlaylist | None) -> bool:
    """Whether `text` is a whole playlist of ffmpeg's. On a full disk ffmpeg leaves it empty or cut short:
    read as it is, its segments would seem to leave the window (removed from the server while still listed)
    or end in half a name. A window only moves forward, its lines end with a segment name."""
    if not text.startswith("#EXTM3U") or not playlist.segments:
        return False
    if not all(segment.name.endswith(".ts") for segment in playlist.segments):
        return False
    if previous is not None and previous.segments:
        if playlist.segments[0].sequence < previous.segments[0].sequence:
            return False
        if playlist.segments[-1].sequence < previous.segments[-1].sequence:
            return False
    return True
