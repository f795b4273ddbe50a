"""The ``[import.<cloud>]`` sections and the ``import`` command's mistakes: one clear line each."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from dsmr_logger import cli
from dsmr_logger.config import IMPORT_TYPES, ConfigError, from_mapping

EXAMPLE = (REPO_ROOT / "deploy" / "config.example.toml").read_text()
CLIMKIT = {"username": "u", "password": "climkit-pass-0123456", "site": "s", "meter": "m"}
COPPER = {
    "client_id": "c",
    "client_secret": "copper-secret-0123456",
    "enterprise_id": "e",
    "meter": "m",
}


def config(**imports: dict[str, object]) -> dict[str, object]:
    return {"meter": {"port": "/dev/null"}, "import": imports}


def example_section(name: str) -> dict[str, object]:
    """The commented-out ``[import.<name>]`` section of the example, as TOML."""
    lines = EXAMPLE.split(f"# [import.{name}]\n", 1)[1].split("\n\n", 1)[0].splitlines()
    return tomllib.loads("\n".join(line.removeprefix("# ") for line in lines))


@pytest.mark.parametrize("name", list(IMPORT_TYPES))
def test_the_example_documents_every_import_key_with_its_default(name: str) -> None:
    shown = example_section(name)
    fields = dataclasses.fields(IMPORT_TYPES[name])
    assert set(shown) == {f.name for f in fields}
    for f in fields:
        if f.default not in (dataclasses.MISSING, None):
            assert shown[f.name] == f.default, f.name
    # and it is valid as written, once its ca_file names a real CA file
    real_ca = REPO_ROOT / "dsmr_logger" / "sources" / "data" / "homewizard-ca.pem"
    from_mapping(config(**{name: {**shown, "ca_file": str(real_ca)}}))


def test_every_mistake_names_its_key() -> None:
    with pytest.raises(ConfigError) as raised:
        from_mapping(
            config(
                climkit={"username": "u", "site": 3, "colour": "red"},
                copper={**COPPER, "base_url": "http://api.example.com"},
                heatpump={},
            )
        )
    problems = raised.value.problems
    assert "import.climkit.password: is required" in problems
    assert "import.climkit.meter: is required" in problems
    assert "import.climkit.site: must be a string, not int" in problems
    assert "import.climkit.colour: unknown key" in problems
    assert any(p.startswith("import.copper.base_url: must be an https:// URL") for p in problems)
    assert any(p.startswith("import.heatpump: unknown cloud") for p in problems)


def test_plain_http_is_only_for_this_machine() -> None:
    local = from_mapping(config(climkit={**CLIMKIT, "base_url": "http://127.0.0.1:8080/api/v1"}))
    assert local.imports.climkit is not None
    assert local.imports.climkit.base_url == "http://127.0.0.1:8080/api/v1"


def test_check_config_shows_the_sections_with_secrets_masked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        '[meter]\nport = "/dev/null"\n'
        + "[import.climkit]\n"
        + "".join(f'{k} = "{v}"\n' for k, v in CLIMKIT.items())
        + "[import.copper]\n"
        + "".join(f'{k} = "{v}"\n' for k, v in COPPER.items())
    )
    assert cli.main(["check-config", "--config", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "[import.climkit]" in shown and "[import.copper]" in shown
    assert 'password = "****56"' in shown and 'client_secret = "****56"' in shown
    assert CLIMKIT["password"] not in shown and COPPER["client_secret"] not in shown
    assert 'base_url = "https://api.climkit.io/api/v1"' in shown


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["neurio", "--sink", "home"], "import.neurio: no [import.neurio] section"),
        (["climkit", "--sink", "nowhere"], "--sink 'nowhere': not a dsmr-reader sink"),
        (
            ["climkit", "--sink", "home", "--since", "last tuesday"],
            "--since: 'last tuesday' is not an ISO 8601 date",
        ),
    ],
)
def test_command_mistakes_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], message: str
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        f'[meter]\nport = "/dev/null"\n[spool]\npath = "{tmp_path / "spool.sqlite3"}"\n'
        '[[sink]]\nname = "home"\nurl = "http://127.0.0.1:9"\napi_key = "k"\n'
        "[import.climkit]\n" + "".join(f'{k} = "{v}"\n' for k, v in CLIMKIT.items())
    )
    assert cli.main(["import", *arguments, "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_an_unreadable_ca_file_is_a_configuration_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        f'[meter]\nport = "/dev/null"\n[spool]\npath = "{tmp_path / "spool.sqlite3"}"\n'
        "[import.climkit]\n"
        + "".join(f'{k} = "{v}"\n' for k, v in CLIMKIT.items())
        + f'ca_file = "{tmp_path / "missing.pem"}"\n'
    )
    assert (
        cli.main(["import", "climkit", "--to-archive", str(tmp_path / "a"), "--config", str(path)])
        == 2
    )
    err = capsys.readouterr().err
    assert "import.climkit.ca_file:" in err and "missing.pem: no such file" in err
    assert len(err.strip().splitlines()) == 1


def test_a_target_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        cli.main(["import", "climkit"])
    assert raised.value.code == 2
    assert "one of the arguments --sink --to-archive is required" in capsys.readouterr().err
