"""`pip install ./client` works on its own: a fresh virtual environment with nothing of the
service in it gets the package, its two dependencies and the `jobq` script."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CLIENT_DIR = Path(__file__).resolve().parents[2] / "client"

pytestmark = pytest.mark.e2e  # builds a wheel and installs it: a real-process test


def test_client_installs_alone_in_a_fresh_virtual_environment(tmp_path: Path) -> None:
    uv = shutil.which("uv")
    assert uv, "uv is needed to build the environment"
    venv = tmp_path / "venv"
    python = venv / "bin" / "python"

    def run(*args: str | Path) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [str(arg) for arg in args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done

    run(uv, "venv", "--quiet", venv)
    run(uv, "pip", "install", "--quiet", "--python", python, CLIENT_DIR)

    assert "usage: jobq" in run(venv / "bin" / "jobq", "--help").stdout
    shown = run(
        python,
        "-c",
        "import importlib.util as u, jobqueue_client as j; "
        "print(j.__version__, j.Client.__name__, u.find_spec('django') is None, "
        "u.find_spec('jobs') is None)",
    )
    assert shown.stdout.split() == ["0.1.0", "Client", "True", "True"]
    installed = run(uv, "pip", "list", "--python", python, "--format", "freeze").stdout
    names = {line.split("==")[0].lower() for line in installed.splitlines()}
    assert {"jobqueue-client", "httpx", "websockets"} <= names
    assert not names & {"django", "redis", "channels", "psycopg"}
