"""Fixtures for the foundation tests: a fresh initialised data directory and a CLI runner."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import cli


class Mt:
    """Runs `mailtally --config <tmp>/config.toml ...` in-process against real files."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.config = directory / "config.toml"
        self.runner = CliRunner()

    def __call__(self, *args: str, input: str | None = None, ok: bool = True) -> Result:
        result = self.runner.invoke(cli.main, ["--config", str(self.config), *args], input=input)
        if ok:
            assert result.exit_code == 0, (result.output, result.exception)
        return result

    def fails(self, *args: str, input: str | None = None) -> str:
        """Run a command that must fail with one clear line on stderr and no traceback."""
        result = self(*args, input=input, ok=False)
        assert result.exit_code != 0, result.output
        assert "Traceback" not in result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
        return lines[0]


@pytest.fixture
def mt(tmp_path: Path) -> Mt:
    m = Mt(tmp_path / "data")
    m("init", "--dir", str(m.dir))
    return m
