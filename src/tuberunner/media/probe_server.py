"""The probe fork server: `python -m tuberunner.media.probe_server SOCKET WORKER_MODULE`.

A probe runs in a process of its own (a hostile file that crashes or hangs libavformat takes down only
that process), but starting Python and importing PyAV for each one costs ~80 ms of CPU and ~150 ms of
wall time, several times what the probe itself costs. This server imports the worker module once, then
forks one child per request: each probe still gets its own process, in its own session, with the worker's
resource limits, and the child's death or hang touches nothing else.

Protocol, over the Unix socket SOCKET (in a directory only the owner can enter), one request per connection:

    client: ["--keyframes", "/path/to/file"]\\n      (the worker's arguments, a JSON list of strings)
    server: {"pid": 1234}\\n                          (the child runs; kill its process group on a timeout)
    server: {"code": 0, "stdout": "...", "stderr": "..."}\\n   (once the child exited and was reaped)

`code` is the child's exit code, or minus the signal that killed it (as `Popen.returncode`); `stdout` and
`stderr` are what the child wrote to its file descriptors 1 and 2 (latin-1 text of the bytes, so nothing
is lost), as a worker subprocess would have given them. The child runs `WORKER_MODULE.main(argv)`.

The server prints `ready` on stdout once it listens, and exits when its stdin reaches end of file: its
parent closed it or died. Children still running then are killed.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import selectors
import signal
import socket
import sys
import tempfile
import traceback
from dataclasses import dataclass
from typing import IO, Any

# A request line is a few paths long; anything larger is not a request.
_MAX_REQUEST_BYTES = 64 * 1024
# A client that connects must send its request at once (it writes it right after connecting).
_REQUEST_TIMEOUT_S = 5.0
# What is sent back of a child's output: its answer is one short JSON line; stderr is for the error message.
_MAX_STDOUT_BYTES = 1024 * 1024
_MAX_STDERR_BYTES = 64 * 1024


@dataclass
class _Child:
    conn: socket.socket
    stdout: IO[bytes]
    stderr: IO[bytes]


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m tuberunner.media.probe_server SOCKET WORKER_MODULE", file=sys.stderr)
        return 2
    socket_path, module_name = argv[1], argv[2]
    worker: Any = importlib.import_module(module_name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen(64)
    wakeup_read, wakeup_write = os.pipe()
    os.set_blocking(wakeup_write, False)
    os.set_blocking(wakeup_read, False)
    signal.set_wakeup_fd(wakeup_write)
    # A handler (not SIG_IGN, which would reap children before their status is read) so that SIGCHLD
    # reaches the wake-up pipe.
    signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)
    children: dict[int, _Child] = {}
    selector = selectors.DefaultSelector()
    # What a child closes first: the server's own descriptors (0, 1 and 2 are replaced).
    server_fds = [listener.fileno(), wakeup_read, wakeup_write, selector.fileno()]
    selector.register(listener, selectors.EVENT_READ, "accept")
    selector.register(sys.stdin.fileno(), selectors.EVENT_READ, "stdin")
    selector.register(wakeup_read, selectors.EVENT_READ, "reap")
    print("ready", flush=True)
    try:
        while True:
            for key, _ in selector.select():
                if key.data == "stdin":
                    if not os.read(sys.stdin.fileno(), 4096):
                        return 0
                elif key.data == "reap":
                    with contextlib.suppress(BlockingIOError):
                        while os.read(wakeup_read, 4096):
                            pass
                    _reap(children)
                else:
                    conn, _ = listener.accept()
                    _serve(conn, worker, module_name, children, server_fds)
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        with contextlib.suppress(OSError):
            os.unlink(socket_path)


def _serve(
    conn: socket.socket, worker: Any, module_name: str, children: dict[int, _Child], server_fds: list[int]
) -> None:
    """Read one request from `conn` and fork its child; a bad request only closes the connection."""
    try:
        conn.settimeout(_REQUEST_TIMEOUT_S)
        args = _read_request(conn)
        if args is None:
            conn.close()
            return
        stdout, stderr = _scratch_file("stdout"), _scratch_file("stderr")
        pid = os.fork()
        if pid == 0:  # the child: never returns
            _run_child(worker, module_name, args, stdout, stderr, [conn.fileno(), *server_fds])
        children[pid] = _Child(conn, stdout, stderr)
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    except OSError:
        # The client left (or the fork failed): its child, if any, is reaped and its answer dropped.
        conn.close()


def _scratch_file(name: str) -> IO[bytes]:
    """An anonymous file for one of a child's outputs (in memory where the system can)."""
    if hasattr(os, "memfd_create"):
        return os.fdopen(os.memfd_create(f"probe-{name}"), "w+b")
    return tempfile.TemporaryFile()


def _read_request(conn: socket.socket) -> list[str] | None:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk or len(data) + len(chunk) > _MAX_REQUEST_BYTES:
            return None
        data += chunk
    try:
        args = json.loads(data)
    except ValueError:
        return None
    if not isinstance(args, list) or not all(isinstance(arg, str) for arg in args):
        return None
    return args


def _run_child(
    worker: Any, module_name: str, args: list[str], stdout: IO[bytes], stderr: IO[bytes], close: list[int]
) -> None:
    code = 1
    try:
        # Its own session: the client kills the whole group on a timeout, as it would a worker subprocess.
        os.setsid()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in close:
            with contextlib.suppress(OSError):
                os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(stdout.fileno(), 1)
        os.dup2(stderr.fileno(), 2)
        argv = [module_name, *args]
        sys.argv = argv
        result = worker.main(argv)
        code = result if isinstance(result, int) else 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _reap(children: dict[int, _Child]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        child = children.pop(pid, None)
        if child is None:
            continue
        try:
            answer = {
                "code": os.waitstatus_to_exitcode(status),
                "stdout": _read(child.stdout, _MAX_STDOUT_BYTES, tail=False),
                "stderr": _read(child.stderr, _MAX_STDERR_BYTES, tail=True),
            }
            child.conn.sendall(json.dumps(answer).encode() + b"\n")
        except OSError:
            pass  # the client gave up (a timeout): nothing to tell
        finally:
            child.conn.close()
            child.stdout.close()
            child.stderr.close()


def _read(handle: IO[bytes], limit: int, *, tail: bool) -> str:
    size = handle.seek(0, os.SEEK_END)
    handle.seek(max(0, size - limit) if tail else 0)
    return handle.read(limit).decode("latin-1")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
