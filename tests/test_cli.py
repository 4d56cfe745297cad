"""The `dyngate` command's own checks, run in process: each refuses a bad flag before any work, with one
`error:` line naming the flag, the bad value and what is allowed."""

from __future__ import annotations

from importlib.metadata import version

import pytest

from dyngate_cli import main


def test_version_prints_the_installed_distribution_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"dyngate {version('dyngate')}"
