"""Shared fixtures: the telegram corpus, resolved relative to the repository root."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import structlog

# Tests press Ctrl-C (SIGINT) on commands as a person at a terminal does. A suite started in
# the background by a non-interactive shell (a CI runner, `cmd &`) has SIGINT ignored, and every
# command it starts inherits that: a backfill or an import then ran on through the test's
# "Ctrl-C" (a fixed backfill and a fixed import test failed in 5 of 5 runs started that way).
# A handler here, unlike SIG_IGN, is reset to the default in each command the tests start.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS = REPO_ROOT.parent / "shared" / "telegrams"


def _manifest() -> list[dict[str, Any]]:
    path = CORPUS / "MANIFEST.json"
    if not path.is_file():
        return []
    return json.loads(path.read_text())


MANIFEST = _manifest()


def require_corpus() -> Path:
    """The corpus directory; a missing corpus fails under CI and skips elsewhere."""
    if not (CORPUS / "MANIFEST.json").is_file():
        message = f"telegram corpus not found at {CORPUS} (expected ../shared/telegrams)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return CORPUS


@pytest.fixture
def corpus() -> Path:
    return require_corpus()


def corpus_entries(*kinds: str) -> list[dict[str, Any]]:
    """Manifest entries of the given kinds, for parametrize (empty when the corpus is absent)."""
    return [entry for entry in MANIFEST if entry["kind"] in kinds]


@pytest.fixture(autouse=True)
def _fresh_structlog() -> None:
    """A test that ran the CLI leaves structlog writing to its (closed) captured stderr."""
    yield
    structlog.reset_defaults()
