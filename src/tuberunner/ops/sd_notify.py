"""systemd's notification protocol (sd_notify(3)), without a dependency: one datagram per message on the
unix socket named by `NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace).

    READY=1       start-up is over (Type=notify units are "active" from then on)
    WATCHDOG=1    the event loop still turns (sent every tick; WatchdogSec= kills us when they stop)
    STOPPING=1    shutting down (draining)
    STATUS=...    one line shown by `systemctl status`

Without `NOTIFY_SOCKET` (not under systemd) every call does nothing. A failed send is logged once and
never raised: systemd being away must not stop the daemon.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["SystemdNotifier"]

log = logging.getLogger(__name__)


class SystemdNotifier:
    def __init__(self, address: str | None, watchdog_interval_s: float | None = None) -> None:
        self.address = address or None
        # How often systemd wants WATCHDOG=1 (WatchdogSec=), None when it does not watch us.
        self.watchdog_interval_s = watchdog_interval_s if self.address else None
        self._socket: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SystemdNotifier:
        """From `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` (ignored when meant for another pid)."""
        env = os.environ if env is None else env
        watchdog: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            watchdog = int(usec) / 1_000_000
        return cls(env.get("NOTIFY_SOCKET"), watchdog)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def ready(self, status: str | None = None) -> None:
        self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> None:
        if self.watchdog_interval_s is not None:
            self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> None:
        self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> None:
        self.notify(f"STATUS={text}")

    def notify(self, *assignments: str) -> bool:
        """Send `KEY=value` lines as one datagram; True when sent."""
        if self.address is None or not assignments:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        payload = "\n".join(line.replace("\n", " ") for line in assignments).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.setblocking(False)
            self._socket.sendto(payload, target)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd at %s: %s", self.address, exc)
            return False
        return True

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
