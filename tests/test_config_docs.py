"""The configuration is documented once, in its schema: the README and the example follow it.

A key added to a dataclass in ``config.py`` must appear in the README's key table and in
``deploy/config.example.toml`` with the same default, or a user reads one thing and gets another.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from typing import Any

import pytest
from conftest import REPO_ROOT

from dsmr_logger import config

EXAMPLE = (REPO_ROOT / "deploy" / "config.example.toml").read_text()
README = (REPO_ROOT / "README.md").read_text()


def test_readme_key_table_is_the_schemas() -> None:
    table = README.split("<!-- keys:begin -->\n", 1)[1].split("\n<!-- keys:end -->", 1)[0]
    assert table == config.key_table(), "regenerate it: python -m dsmr_logger.config"


ALTERNATIVE_METER = "# [meter]"
"""A commented-out ``[meter]`` section: another kind of meter, documented key by key too."""


def _example_sections() -> list[tuple[str, str, list[str]]]:
    """(header, meter or sink type or '', lines) for each live section of the example and each
    alternative ``# [meter]`` section, in order."""
    sections: list[tuple[str, str, list[str]]] = []
    for line in EXAMPLE.splitlines():
        if re.fullmatch(r"\[\[?\w+\]\]?", line) or line == ALTERNATIVE_METER:
            sections.append((line.removeprefix("# "), "", []))
        elif sections:
            sections[-1][2].append(line)
    result = []
    for header, _, lines in sections:
        kinds = [m.group(2) for m in map(re.compile(r'(# )?type = "(.+)"').fullmatch, lines) if m]
        kind = kinds[0] if kinds else ""
        result.append((header, kind, lines))
    return result


def _schema_for(header: str, kind: str) -> type[Any]:
    if header == "[meter]":
        return config.METER_TYPES[kind or "p1"]
    if header == "[[sink]]":
        return config.SINK_TYPES[kind or "dsmr-reader"]
    return config.SECTIONS[header.strip("[]")]


@pytest.mark.parametrize(
    ("header", "kind", "lines"),
    _example_sections(),
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_example_documents_every_key_with_its_default(
    header: str, kind: str, lines: list[str]
) -> None:
    schema = _schema_for(header, kind)
    for f in dataclasses.fields(schema):
        shown = [
            m.group(2)
            for m in map(re.compile(rf"(# )?{f.name} = (.*?)(\s+#.*)?").fullmatch, lines)
            if m
        ]
        assert shown, f"{header} {kind}: key {f.name} is not in the example"
        if f.default is dataclasses.MISSING or f.default is None:
            continue
        value = tomllib.loads(f"value = {shown[0]}")["value"]
        expected = str(f.default) if isinstance(f.default, config.Path) else f.default
        assert value == expected, f"{header} {kind}: {f.name} shows {value!r}, default {expected!r}"


def test_every_schema_key_has_a_check_and_a_doc() -> None:
    schemas = [*config.METER_TYPES.values(), *config.SINK_TYPES.values(), *config.SECTIONS.values()]
    for schema in schemas:
        for f in dataclasses.fields(schema):
            assert callable(f.metadata.get("check")), f"{schema.__name__}.{f.name}"
            assert f.metadata.get("doc"), f"{schema.__name__}.{f.name}"
