"""systemd's notify protocol (``Type=notify``): READY, STATUS lines and watchdog pings.

A few lines over a datagram socket, so no library: the message goes to ``$NOTIFY_SOCKET``
(``@`` = abstract namespace). Without that variable (not under systemd) every call is a no-op.
Pings come from a task in the daemon's event loop, so a wedged loop stops them and systemd
restarts the service after ``WatchdogSec``.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET") or None
        if address is not None and address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and mine else None
        """Half of systemd's WatchdogSec, as sd_watchdog_enabled advises; None: no watchdog."""

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> None:
        if self.address is None:
            return
        with (
            contextlib.suppress(OSError),
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock,
        ):
            # Never block the event loop: a full notify queue drops this message instead.
            sock.sendto("\n".join(lines).encode(), socket.MSG_DONTWAIT, self.address)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str, *, watchdog: bool) -> None:
        self.send(*(["WATCHDOG=1"] if watchdog else []), f"STATUS={status}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")
