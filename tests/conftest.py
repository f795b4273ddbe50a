"""Shared fixtures: the telegram corpus, resolved relative to the repository root."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import structlog

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
