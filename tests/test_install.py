"""dyngate installed as a wheel beside PyPA's `build` (issue 10): every import name is dyngate's own, so the
installed `dyngate` command works and `dyngate_build` is dyngate's, not PyPA's.

A throwaway virtual environment gets PyPA `build` and dyngate (`pip install --no-deps` of this repository:
hatchling builds a wheel, nothing editable). dyngate's dependencies (torch, ...) are not installed again: a
.pth file puts the test environment's site-packages *after* the new environment's own, so what the new
environment installs wins and nothing of the test environment's editable dyngate is seen (a .pth line adds
a folder but does not run the .pth files inside it). pip fetches `build` and hatchling from PyPI.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(command: list[str], cwd: Path, env: dict, timeout: float = 300) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_installed_dyngate_works_beside_pypa_build(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    own = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    tmp_path, env).strip())
    (own / "dyngate-test-shared.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(python), "--disable-pip-version-check", "install", "--quiet"]
    _run(pip + ["build"], tmp_path, env)
    _run(pip + ["--no-deps", str(ROOT)], tmp_path, env)

    where = _run([str(python), "-c", "import build, dyngate_build, dyngate_cli; "
                                     "print(build.ProjectBuilder.__module__, dyngate_build.__version__, "
                                     "dyngate_build.__file__, dyngate_cli.__file__, sep='\\n')"], tmp_path, env)
    pypa_module, version, build_file, cli_file = where.splitlines()
    assert pypa_module.startswith("build")  # PyPA's build is importable as `build` ...
    assert version == "0.1.0"  # ... and dyngate's version is dyngate's own
    assert Path(build_file).is_relative_to(own) and Path(cli_file).is_relative_to(own)  # the wheel, not the repo

    dyngate = str(venv / "bin" / "dyngate")
    assert "zero-report" in _run([dyngate, "--help"], tmp_path, env)
    listing = _run([dyngate, "build", "--list"], tmp_path, env)
    assert "fp32" in listing and "torchscript" in listing
