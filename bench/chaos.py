"""`make chaos`: a coordinator and K runner daemons (separate processes, real ffmpeg) transcode M videos while
real faults hit them at random moments; then the invariants are checked and printed as a table.

    python bench/chaos.py                                   # 10 minutes, 4 runners, 20 videos, every fault
    python bench/chaos.py --duration 60 --runners 2 --videos 4 --seed 7 --json chaos.json
    python bench/chaos.py --faults runner-kill,partition --seed 1234      # a menu; replay a seed
    python bench/chaos.py --duration 60 --runners 2 --lives 2 --faults live,runner-kill   # lives

Exit codes: 0 every invariant holds; 1 an invariant failed (the seed and the command that replays it are
printed); 2 the run could not be set up; 130 interrupted. See docs/chaos.md for the faults, the options and
how to read the tables.
"""

from __future__ import annotations

import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:  # `tests.support.tcp_proxy` is reused, not copied
    sys.path.insert(0, str(_REPO))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import secrets  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

from chaos_cluster import Cluster, RunnerSettings, SetupError, Snapshot  # noqa: E402
from chaos_faults import (  # noqa: E402
    FAULT_KINDS,
    LIVE_FAULT_KINDS,
    SHARED_FAULT_KINDS,
    ChaosLimits,
    Faults,
    parse_menu,
)
from chaos_lives import LiveOptions, Lives  # noqa: E402
from chaos_report import RunFacts, Submission, check_invariants, fault_stats, print_report  # noqa: E402
from tuberunner.coordinator import ingest_client  # noqa: E402
from tuberunner.media.binaries import find_ffmpeg  # noqa: E402
from tuberunner.media.samples import make_sample_clip  # noqa: E402

EXIT_OK, EXIT_FAILED, EXIT_SETUP, EXIT_INTERRUPTED = 0, 1, 2, 130
SUBMIT_DEADLINE_S = 90.0


def _seconds(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _range(text: str) -> tuple[float, float]:
    low, _, high = text.partition(",")
    try:
        pair = (float(low), float(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"MIN,MAX seconds, got {text!r}") from None
    if not 0 <= pair[0] <= pair[1]:
        raise argparse.ArgumentTypeError(f"0 <= MIN <= MAX, got {text!r}")
    return pair


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    try:
        size = (int(width), int(height))
    except ValueError:
        raise argparse.ArgumentTypeError(f"WxH, got {text!r}") from None
    if min(size) < 16 or size[0] % 2 or size[1] % 2:
        raise argparse.ArgumentTypeError(f"even sizes of at least 16, got {text!r}")
    return size


def _menu(text: str) -> tuple[str, ...]:
    try:
        return parse_menu(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/chaos.py",
        description="Inject real faults into a coordinator and runner daemons; check that no job is stuck "
        "and nothing is lost.",
    )
    parser.add_argument("--duration", type=_seconds, default=600.0, help="seconds of fault injection (600)")
    parser.add_argument("--runners", type=int, default=4, help="runner daemons, K (4)")
    parser.add_argument(
        "--coordinators",
        type=int,
        default=1,
        help="coordinator processes (1: SQLite and a local folder; 2 or more: the scale-out set-up on "
        "PostgreSQL, Redis and moto's S3 server, with their faults added to the default menu)",
    )
    parser.add_argument("--videos", type=int, default=20, help="videos submitted, M (20)")
    parser.add_argument(
        "--lives",
        type=int,
        default=None,
        help="lives published at once, one after the other, during the run (1; 0 with several "
        "coordinators: lives need the one process that serves RTMP)",
    )
    parser.add_argument(
        "--live-seconds",
        type=_range,
        default=(12.0, 30.0),
        help="MIN,MAX seconds of each publication (12,30)",
    )
    parser.add_argument("--seed", type=int, default=None, help="RNG seed (default: a random one, printed)")
    parser.add_argument(
        "--faults",
        type=_menu,
        default=None,
        help="fault menu: 'all' or a comma list of "
        + ", ".join(FAULT_KINDS + SHARED_FAULT_KINDS)
        + ", or the groups 'partition', 'job', 'live', 'shared' and 'scale-out' (default: all, and the "
        "shared services' faults with several coordinators; without lives, none of the live faults)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the whole report as JSON here")
    parser.add_argument(
        "--gap", type=_range, default=(3.0, 10.0), help="MIN,MAX seconds between faults (3,10)"
    )
    parser.add_argument("--max-concurrent", type=int, default=2, help="faults in progress at once (2)")
    parser.add_argument("--lease", type=_seconds, default=4.0, help="job lease, both sides (4 s)")
    parser.add_argument("--stall", type=_seconds, default=5.0, help="runners' ffmpeg stall limit (5 s)")
    parser.add_argument("--concurrency", type=int, default=1, help="job slots per runner (1)")
    parser.add_argument("--recovery-limit", type=_seconds, default=60.0, help="max wait for recovery (60 s)")
    parser.add_argument(
        "--settle", type=_seconds, default=180.0, help="max wait for quiet at the end (180 s)"
    )
    parser.add_argument(
        "--submit-window", type=float, default=0.8, help="videos come in this share of the run (0.8)"
    )
    parser.add_argument("--clip-seconds", type=_seconds, default=30.0, help="length of the clips (30 s)")
    parser.add_argument("--clip-size", type=_size, default=(640, 360), help="WxH of the clips (640x360)")
    parser.add_argument("--resolutions", default="240,144", help="ladder asked for each video (240,144)")
    parser.add_argument("--tmpfs-mb", type=int, default=64, help="size of each runner's tmpfs (64 MB)")
    parser.add_argument("--ffmpeg-nice", type=int, default=10, help="niceness of the runners' ffmpeg (10)")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep everything here (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder even when all is well")
    args = parser.parse_args(argv)
    if min(args.runners, args.videos, args.concurrency, args.max_concurrent, args.coordinators) < 1:
        parser.error("--runners, --videos, --concurrency, --max-concurrent, --coordinators: at least 1")
    if args.lives is None:
        args.lives = 1 if args.coordinators == 1 else 0
    if args.lives < 0 or (args.lives and args.coordinators > 1):
        parser.error("--lives: 0 or more, and 0 with several coordinators (lives need one RTMP process)")
    if args.faults is None:
        args.faults = FAULT_KINDS + (SHARED_FAULT_KINDS if args.coordinators > 1 else ())
        if not args.lives:
            args.faults = tuple(k for k in args.faults if k not in LIVE_FAULT_KINDS)
    if not 0 < args.submit_window <= 1:
        parser.error("--submit-window is a share of the run, in (0, 1]")
    return args


def replay_command(argv: list[str], seed: int) -> str:
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--seed":
            skip = True
            continue
        if arg.startswith("--seed="):
            continue
        kept.append(arg)
    return shlex.join([".venv/bin/python", "bench/chaos.py", *kept, "--seed", str(seed)])


@dataclass
class Run:
    args: argparse.Namespace
    seed: int
    root: Path
    t0: float = field(default_factory=time.monotonic)

    def say(self, message: str) -> None:
        print(f"[{time.monotonic() - self.t0:7.1f} s] {message}", flush=True)


async def make_clips(run: Run) -> list[Path]:
    ffmpeg = find_ffmpeg()
    folder = run.root / "media"
    folder.mkdir(parents=True, exist_ok=True)
    seconds = run.args.clip_seconds
    width, height = run.args.clip_size
    shapes = [(width, height, seconds), (width, height, max(3.0, round(seconds * 0.6)))]
    return list(
        await asyncio.gather(
            *(
                make_sample_clip(ffmpeg, folder / f"clip-{w}x{h}-{s:g}s.mp4", duration_s=s, width=w, height=h)
                for w, h, s in shapes
            )
        )
    )


async def submit_videos(run: Run, cluster: Cluster, clips: list[Path], deadline: float) -> list[Submission]:
    """M uploads through the ingest API at random moments of the submit window."""
    rng = random.Random(run.seed * 7919 + 1)
    window_s = run.args.duration * run.args.submit_window
    moments = sorted(rng.uniform(0, window_s) for _ in range(run.args.videos))
    moments[0] = 0.0  # work from the start
    resolutions = [int(r) for r in run.args.resolutions.split(",") if r.strip()]
    token = cluster.admin_token
    submissions: list[Submission] = []
    start = time.monotonic()
    for index, moment in enumerate(moments, 1):
        await asyncio.sleep(max(0.0, start + moment - time.monotonic()))  # the submission's random moment
        clip = clips[rng.randrange(len(clips))]
        sub = Submission(
            index=index, name=f"chaos-video-{index}", clip=clip.name, at_s=time.monotonic() - run.t0
        )
        submissions.append(sub)
        give_up = time.monotonic() + SUBMIT_DEADLINE_S
        while sub.video_uuid is None:
            sub.attempts += 1
            try:
                video = await asyncio.to_thread(
                    ingest_client.submit,
                    cluster.url,
                    token,
                    clip,
                    name=sub.name,
                    resolutions=resolutions,
                )
            except ingest_client.ClientError as exc:
                # No answer (a coordinator restarting) or 503 (storage or database unreachable for a
                # while: nothing was recorded, the answer says to send it again): retry, as a client would.
                if exc.status not in (None, 503) or time.monotonic() > give_up:
                    sub.error = str(exc)
                    break
                await asyncio.sleep(0.5)  # retry pace while the coordinator restarts
                continue
            sub.video_uuid = str(video["uuid"])
        if sub.video_uuid is not None:
            try:
                detail = await cluster.admin.video(sub.video_uuid)
                sub.jobs = {j["uuid"]: j.get("parentUuid") for j in detail["jobs"]["list"]}
            except Exception as exc:
                sub.error = f"its jobs could not be read: {exc}"
        retried = f" after {sub.attempts} attempts" if sub.attempts > 1 else ""
        run.say(
            f"video {index}/{len(moments)} {sub.name} ({sub.clip}) "
            + (
                f"submitted{retried}: {len(sub.jobs)} jobs"
                if sub.video_uuid
                else f"NOT submitted: {sub.error}"
            )
        )
        if time.monotonic() > deadline:
            break
    return submissions


async def inject_faults(run: Run, faults: Faults, deadline: float) -> None:
    """Faults from the menu, in seeded shuffled rounds (so every kind comes as often), at random gaps."""
    rng = random.Random(run.seed)
    menu: tuple[str, ...] = run.args.faults
    slots = asyncio.Semaphore(run.args.max_concurrent)
    rounds: list[str] = []
    number = 0

    async def one(number: int, kind: str, seed: int) -> None:
        try:
            await faults.run_fault(number, kind, seed)
        finally:
            slots.release()

    async with asyncio.TaskGroup() as tg:
        while True:
            gap = rng.uniform(*run.args.gap)
            await asyncio.sleep(max(0.0, min(gap, deadline - time.monotonic())))  # a random moment
            if time.monotonic() >= deadline:
                break
            if not rounds:
                rounds = list(menu)
                rng.shuffle(rounds)
            kind, seed = rounds.pop(), rng.randrange(2**31)
            await slots.acquire()
            if time.monotonic() >= deadline:
                slots.release()
                break
            number += 1
            tg.create_task(one(number, kind, seed), name=f"fault {number}")
    run.say(f"fault injection over: {number} fault(s) started")


async def settle(run: Run, cluster: Cluster) -> float | None:
    """Wait (bounded) until no job is unfinished and every runner is idle and connected."""

    def quiet(s: Snapshot) -> bool:
        return (
            s.coordinator_up
            and s.unfinished == 0
            and all(
                view.alive
                and view.state is not None
                and not view.state.jobs
                and view.serving_since(s.at - 15)
                for view in s.runners.values()
            )
        )

    started = time.monotonic()
    seen = await cluster.monitor.until(quiet, run.args.settle)
    return None if seen is None else time.monotonic() - started


async def chaos(run: Run, argv: list[str]) -> int:
    args = run.args
    settings = RunnerSettings(
        lease_s=args.lease,
        stall_s=args.stall,
        concurrency=args.concurrency,
        ffmpeg_nice=args.ffmpeg_nice,
        min_free_disk_bytes=8 * 1024**2,
        input_cache_bytes=16 * 1024**2,
    )
    cluster = Cluster(
        run.root,
        runners=args.runners,
        lease_s=args.lease,
        admin_token="tra-chaos-" + secrets.token_hex(16),
        settings=settings,
        tmpfs_mb=args.tmpfs_mb,
        coordinators=args.coordinators,
        lives=args.lives > 0,
    )
    limits = ChaosLimits(lease_s=args.lease, stall_s=args.stall, recovery_limit_s=args.recovery_limit)
    facts = RunFacts(seed=run.seed, root=run.root, limits=limits, menu=args.faults)
    try:
        run.say(f"generating clips in {run.root}/media while the coordinator and the runners start")
        async with asyncio.TaskGroup() as tg:
            making = tg.create_task(make_clips(run))
            tg.create_task(cluster.start(run.say))
        clips = making.result()
        faults = Faults(cluster, limits, run.t0, run.say)
        facts.faults = faults
        deadline = time.monotonic() + args.duration
        faults.window_end = deadline
        if args.lives:
            options = LiveOptions(channels=args.lives, seconds=args.live_seconds)
            faults.lives = facts.lives = Lives(cluster, options, run.seed, run.t0, run.say, deadline)
        run.say(f"chaos for {args.duration:g} s: {', '.join(args.faults)}")
        async with asyncio.TaskGroup() as tg:
            submitting = tg.create_task(submit_videos(run, cluster, clips, deadline))
            tg.create_task(inject_faults(run, faults, deadline))
            if facts.lives is not None:
                tg.create_task(facts.lives.run())
        facts.submissions = submitting.result()
        run.say(
            f"settling (at most {args.settle:g} s): waiting for every job to end and every runner to idle"
        )
        facts.settle_s = await settle(run, cluster)
        run.say(
            f"settled after {facts.settle_s:.1f} s"
            if facts.settle_s is not None
            else f"NOT settled after {args.settle:g} s"
        )
        run.say("checking the invariants (every output is downloaded and probed)")
        await check_invariants(cluster, facts)
    finally:
        await cluster.stop()
    facts.check_after_stop(cluster)
    ok = print_report(facts, args.duration)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(facts.as_json(vars_of(args), fault_stats(facts)), indent=1))
        run.say(f"report written to {args.json}")
    if not ok:
        print(f"\nINVARIANT FAILED. seed {run.seed}; replay with:\n  {replay_command(argv, run.seed)}")
        print(f"logs and data kept in {run.root}")
        return EXIT_FAILED
    return EXIT_OK


def vars_of(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


async def main_async(argv: list[str]) -> int:
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 2**31)
    root = args.work_dir or Path(tempfile.mkdtemp(prefix="tuberunner-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    run = Run(args, seed, root.resolve())
    run.say(f"seed {seed} (replay: {replay_command(argv, seed)})")
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    interrupted = False

    def interrupt() -> None:
        nonlocal interrupted
        if interrupted:
            print("still stopping the processes and unmounting; please wait", flush=True)
            return
        interrupted = True
        main.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupt)
    code = EXIT_SETUP
    try:
        code = await chaos(run, argv)
    except asyncio.CancelledError:
        if not interrupted:
            raise
        print(f"interrupted; everything was stopped. seed {seed}", flush=True)
        code = EXIT_INTERRUPTED
    except Exception as exc:
        leaves = _leaves(exc)
        if leaves and all(isinstance(leaf, SetupError) for leaf in leaves):
            for leaf in leaves:
                print(f"cannot set up the chaos run: {leaf}", flush=True)
            return _finish(root, args, EXIT_SETUP)
        traceback.print_exc()
        print(f"the chaos run itself failed (seed {seed}); replay: {replay_command(argv, seed)}", flush=True)
        code = EXIT_SETUP
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return _finish(root, args, code)


def _finish(root: Path, args: argparse.Namespace, code: int) -> int:
    if code == EXIT_OK and not args.keep and args.work_dir is None:
        shutil.rmtree(root, ignore_errors=True)
    elif code != EXIT_OK:
        print(f"work folder kept: {root}")
    return code


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, or the exception itself."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def main() -> None:
    sys.exit(asyncio.run(main_async(sys.argv[1:])))


if __name__ == "__main__":
    main()
