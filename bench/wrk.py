"""HTTP load with `wrk` (the Debian package): keep-alive connections, a Lua script for the method,
body and headers, and a `done` hook that prints the summary as one JSON line (requests, duration,
socket errors, latency percentiles). With `count_statuses` a `response` hook also counts the
answers by status; that hook costs wrk CPU per response (wrk parses every header into Lua), so
the throughput figures run without it and rely on wrk's own count of answers >= 400 (its
"Non-2xx or 3xx responses" line), and the runs that must tell 5xx from 4xx use it."""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from stack import child_setup

WRK = shutil.which("wrk") or "/usr/bin/wrk"
MARK = "WRK_JSON "
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}

_DONE = r"""
local threads = {}
function setup(thread)
  table.insert(threads, thread)
end
function done(summary, latency, requests)
  local statuses = {}
  for _, thread in ipairs(threads) do
    local counted = thread:get("statuses")
    if counted then
      for code, n in pairs(counted) do
        local key = tostring(code)
        statuses[key] = (statuses[key] or 0) + n
      end
    end
  end
  local parts = {}
  for code, n in pairs(statuses) do
    table.insert(parts, string.format('"%s": %d', code, n))
  end
  local e = summary.errors
  io.write(string.format(
    '%s{"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_us": {"min": %d, "p50": %d, "p90": %d, "p99": %d, "max": %d, "mean": %.1f}, ' ..
    '"statuses": {%s}}\n',
    "WRK_JSON ", summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean, table.concat(parts, ", ")))
end
"""

_COUNT = r"""
statuses = {}
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end
"""

_PATHS = r"""
local paths = {%s}
local index = 0
function request()
  index = index %% #paths + 1
  return wrk.format(nil, paths[index])
end
"""


def _lua_string(text: str) -> str:
    """A Lua string literal (JSON's escaping is a subset Lua reads the same way)."""
    return json.dumps(text)


def script(
    *,
    method: str,
    body: str | None,
    headers: dict[str, str],
    paths: list[str] | None,
    count_statuses: bool,
) -> str:
    """The Lua script of one run."""
    lines = [f"wrk.method = {_lua_string(method)}"]
    if body is not None:
        lines.append(f"wrk.body = {_lua_string(body)}")
    lines += [f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in headers.items()]
    text = "\n".join(lines) + "\n"
    if paths:
        text += _PATHS % ", ".join(_lua_string(p) for p in paths)
    if count_statuses:
        text += _COUNT
    return text + _DONE


@dataclass
class WrkResult:
    """One wrk run: what it sent, what came back and how fast."""

    url: str
    connections: int
    threads: int
    seconds: float
    count_statuses: bool
    requests: int
    duration_s: float
    errors: dict[str, int]
    latency_ms: dict[str, float]
    statuses: dict[int, int] = field(default_factory=dict)
    client_cpu_s: float = 0.0

    @property
    def answered_below_400(self) -> int:
        """Answers with a status below 400 (wrk counts those >= 400 as `errors.status`)."""
        return self.requests - self.errors["status"]

    def count(self, low: int, high: int) -> int | None:
        """Answers with low <= status < high, if statuses were counted."""
        if not self.count_statuses:
            return None
        return sum(n for code, n in self.statuses.items() if low <= code < high)

    @property
    def ok_per_s(self) -> float:
        """Answers below 400 per second (all 2xx for the endpoints measured)."""
        return self.answered_below_400 / self.duration_s if self.duration_s else 0.0

    @property
    def socket_errors(self) -> int:
        e = self.errors
        return e["connect"] + e["read"] + e["write"] + e["timeout"]

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["statuses"] = {str(k): v for k, v in self.statuses.items()}
        data["ok_per_s"] = self.ok_per_s
        data["socket_errors"] = self.socket_errors
        return data


def run(
    url: str,
    *,
    connections: int,
    seconds: float,
    log_path: Path,
    threads: int = 1,
    method: str = "GET",
    body: str | None = None,
    headers: dict[str, str] | None = None,
    paths: list[str] | None = None,
    count_statuses: bool = False,
    timeout_s: float = 10,
) -> WrkResult:
    """Run wrk against `url` (127.0.0.1 only) and return its summary. The script and wrk's
    output are written next to `log_path`; a crash or a missing summary raises."""
    host = urlsplit(url).hostname or ""
    if host not in LOCAL_HOSTS:
        raise ValueError(f"wrk is only pointed at this machine, not {host!r}")
    threads = max(1, min(threads, connections))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    lua = log_path.with_suffix(".lua")
    lua.write_text(
        script(
            method=method,
            body=body,
            headers=headers or {},
            paths=paths,
            count_statuses=count_statuses,
        )
    )
    cmd = [
        WRK,
        "--threads",
        str(threads),
        "--connections",
        str(connections),
        "--duration",
        f"{max(1, round(seconds))}s",
        "--timeout",
        f"{max(1, round(timeout_s))}s",
        "--latency",
        "--script",
        str(lua),
        url,
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=seconds + timeout_s + 60,
        stdin=subprocess.DEVNULL,
        preexec_fn=child_setup,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # wrk is the only child reaped in between: its CPU time (the load generator's share).
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    with log_path.open("a") as log:
        log.write(f"$ {' '.join(cmd)}\n{result.stdout}{result.stderr}\n")
    lines = [line for line in result.stdout.splitlines() if line.startswith(MARK)]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({result.returncode}): {result.stderr.strip()[:300]}")
    summary = json.loads(lines[-1][len(MARK) :])
    latency = {k: v / 1000 for k, v in summary["latency_us"].items()}
    return WrkResult(
        url=url,
        connections=connections,
        threads=threads,
        seconds=seconds,
        count_statuses=count_statuses,
        requests=summary["requests"],
        duration_s=summary["duration_us"] / 1e6,
        errors=summary["errors"],
        latency_ms=latency,
        statuses={int(k): v for k, v in summary["statuses"].items()},
        client_cpu_s=cpu,
    )
