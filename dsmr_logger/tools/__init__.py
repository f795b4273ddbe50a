"""Commands a person runs beside (or instead of) the daemon: ``status``, ``spool``, ``parse``,
``backfill``, ``pair``, ``simulate``, ``simulate-neurio`` and ``demo``."""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` safe to print on a terminal: a control character that a server's answer or a
    device put there (an escape sequence can retitle the window, clear the screen or, on some
    terminals, write the clipboard) is shown as its code, ``\\x1b``; line breaks and tabs stay."""
    return _CONTROL.sub(lambda found: f"\\x{ord(found.group()):02x}", text)
