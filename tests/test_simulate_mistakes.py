"""``dsmr-logger simulate``: what a person can get wrong, and a simulated meter that stays one.

The real command runs as a subprocess for what it prints and its exit status; the simulator's
writing is driven in process against a real pty read by a slow reader.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cli_process import dsmr_logger, one_clear_line

from dsmr_logger.tools.simulate import VirtualSerialPort


@pytest.mark.parametrize("kind", ["file", "folder", "link to a file"])
def test_link_never_replaces_what_the_user_has_there(tmp_path: Path, kind: str) -> None:
    """--link is replaced by a symlink to the pty: a typo naming the configuration file (or a
    folder, or the user's own link) must not cost it."""
    precious = tmp_path / "config.toml"
    precious.write_text("[meter]\n")
    target = {"file": precious, "folder": tmp_path, "link to a file": tmp_path / "p1"}[kind]
    if kind == "link to a file":
        target.symlink_to(precious)
    result = dsmr_logger("simulate", "--count", "1", "--link", target)
    assert result.returncode == 2
    one_clear_line(result, f"--link: {target} already exists and is not a simulator's link")
    assert precious.read_text() == "[meter]\n"
    assert target.is_dir() if kind == "folder" else target.resolve() == precious


def test_a_link_left_by_a_killed_simulator_is_taken_over(tmp_path: Path) -> None:
    link = tmp_path / "dsmr-p1"
    link.symlink_to("/dev/pts/4242")  # a simulator's, its pty long gone
    port = VirtualSerialPort(link)
    try:
        assert os.readlink(link) == port.path
    finally:
        port.close()
    assert not os.path.lexists(link), "removed again when the simulator stopped"
