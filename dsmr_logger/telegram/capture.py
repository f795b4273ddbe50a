"""Recorded telegrams: capture files, archive day files and single telegrams, as bytes and frames.

One reader for every place that replays what a meter sent (``simulate``, ``parse``, ``backfill``,
the demo and the tests): a file is read whole (``.gz`` decompressed) and its frames are found by
the daemon's own assembler, so a capture is cut exactly as the daemon would cut the live stream.
"""

from __future__ import annotations

import gzip
from importlib import resources
from pathlib import Path

from dsmr_logger.sources.p1.framing import FrameAssembler


def default_capture() -> bytes:
    """Ten telegrams of an Iskra AM550 (DSMR 5), shipped with the package."""
    return resources.files("dsmr_logger.telegram").joinpath("data/default-capture.log").read_bytes()


def read_capture(path: Path | None) -> bytes:
    """A capture's bytes (``.gz`` decompressed, ``.hex`` decoded); the bundled capture when
    ``path`` is None."""
    if path is None:
        return default_capture()
    data = path.read_bytes()
    if path.suffix == ".hex":  # an encrypted frame written as hex digits (the corpus's form)
        return bytes.fromhex(data.decode("ascii", "replace"))
    return gzip.decompress(data) if path.suffix == ".gz" else data


def frames_in(capture: bytes) -> list[bytes]:
    """The valid frames of a capture file, an archive file or a single telegram, in order."""
    return [frame.raw for frame in FrameAssembler().feed(capture, 0.0)]
