"""HTTP load from `wrk` (the Debian package) for end-to-end tests: keep-alive connections from a
separate process, so the load does not compete with the test for the GIL. A missing `wrk` fails
the test with instructions; it is never skipped."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

_REQUESTS = re.compile(r"(\d+) requests in ([\d.]+)(\w+)")
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON_2XX_3XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


@dataclass(frozen=True)
class WrkResult:
    requests: int
    non_2xx_3xx: int
    connect_errors: int
    read_errors: int
    write_errors: int
    timeouts: int
    output: str


def wrk_executable() -> str:
    path = shutil.which("wrk")
    if path is None:
        pytest.fail(
            "wrk is not installed; the load tests need it (Debian/Ubuntu: apt-get install wrk,"
            " macOS: brew install wrk)",
            pytrace=False,
        )
    return path


def start_wrk(
    url: str,
    *,
    connections: int = 64,
    duration_s: int = 3,
    threads: int = 2,
    script: Path | None = None,
) -> subprocess.Popen[str]:
    """Start `wrk` against `url` in the background; `finish_wrk` collects its result.
    `script`: a wrk Lua script (method, body, headers)."""
    return subprocess.Popen(
        [
            wrk_executable(),
            f"-t{min(threads, connections)}",
            f"-c{connections}",
            f"-d{duration_s}s",
            "--timeout",
            "5s",
            *(["-s", str(script)] if script is not None else []),
            url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish_wrk(proc: subprocess.Popen[str], *, timeout: float = 60) -> WrkResult:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output
    requests = _REQUESTS.search(output)
    assert requests, f"no summary in wrk's output:\n{output}"
    errors = _SOCKET_ERRORS.search(output)
    connect, read, write, timeouts = (int(n) for n in errors.groups()) if errors else (0,) * 4
    non_2xx = _NON_2XX_3XX.search(output)
    return WrkResult(
        requests=int(requests.group(1)),
        non_2xx_3xx=int(non_2xx.group(1)) if non_2xx else 0,
        connect_errors=connect,
        read_errors=read,
        write_errors=write,
        timeouts=timeouts,
        output=output,
    )


def run_wrk(url: str, **options: int) -> WrkResult:
    """`wrk` against `url` for `duration_s` seconds; its summary."""
    return finish_wrk(start_wrk(url, **options))
