"""Text summary of py-spy's raw (collapsed) stacks of a process: where its time per job goes.

Two recordings of the same process over the same window are read: one of the samples where a
thread was running (CPU), one of every sample (wall, `--idle`). Per thread, the share of wall
time it was busy; over all threads, CPU time per job by package and the functions with the most
self and inclusive time.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

FRAME_RE = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
THREAD_RE = re.compile(r"^thread \(\d+\): (?P<name>.*)$")

# Leaf file -> bucket; the first pattern that matches wins.
OUR_CODE_RE = re.compile(r"\((?:.*/)?(?:jobs|realtime|config)/[^/()]*\.py[:)]")
BUCKETS: list[tuple[str, str]] = [
    ("django/db/", "Django ORM"),
    ("django/", "Django (other)"),
    ("psycopg", "psycopg"),
    ("channels_redis", "channels_redis"),
    ("msgpack", "msgpack"),
    ("redis/", "redis-py"),
    ("pydantic", "pydantic"),
    ("asyncio/", "asyncio"),
    ("selectors.py", "event loop select"),
    ("concurrent/futures", "thread pool"),
    ("threading.py", "threading"),
    ("queue.py", "threading"),
    ("json/", "json"),
    ("logging/", "logging"),
    ("uuid.py", "uuid"),
    ("asgiref", "asgiref"),
]


@dataclass(frozen=True)
class Stack:
    thread: str
    frames: tuple[str, ...]
    count: int


def parse(raw: str) -> list[Stack]:
    """The collapsed stacks (`frame;frame;... count`), thread name first (py-spy --threads)."""
    stacks = []
    for line in raw.splitlines():
        body, _, count = line.rpartition(" ")
        if not body or not count.isdigit():
            continue
        parts = body.split(";")
        match = THREAD_RE.match(parts[0])
        thread = match["name"] if match else "?"
        # Pool threads are numbered (jobs-db_0, asyncio_3): one name per pool.
        thread = re.sub(r"(?:[-_]\d+)+(?: \(\w+\))?$", "", thread)
        frames = tuple(parts[1:] if match else parts)
        stacks.append(Stack(thread, frames, int(count)))
    return stacks


def short(frame: str) -> str:
    """`func (path/to/site-packages/pkg/mod.py:12)` -> `func (pkg/mod.py)`."""
    match = FRAME_RE.match(frame)
    if not match:
        return frame
    path = match["file"]
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{match['func']} ({path})"


def is_ours(frame: str) -> bool:
    """A frame of the service's own code (jobs/, realtime/, config/)."""
    return OUR_CODE_RE.search(frame) is not None


def bucket(frame: str) -> str:
    """The package a frame's function belongs to."""
    if is_ours(frame):
        return "our code (jobs/, realtime/)"
    for pattern, name in BUCKETS:
        if pattern in frame:
            return name
    return "other"


def _innermost(frames: tuple[str, ...]) -> str:
    """`ours -> leaf` for the innermost frame of our code and the running function."""
    leaf = short(frames[-1])
    for frame in reversed(frames):
        if is_ours(frame):
            mine = short(frame)
            return mine if mine == leaf else f"{mine} -> {leaf}"
    return leaf


def _table(counter: Counter[str], total: int, us_per_sample: float, limit: int) -> list[str]:
    lines = []
    for name, n in counter.most_common(limit):
        lines.append(f"  {100 * n / total:5.1f}%  {n * us_per_sample:7.1f} us/job  {name}")
    return lines


def summarise(
    cpu_raw: str,
    wall_raw: str,
    *,
    title: str,
    rate_hz: int,
    jobs: int,
    window_s: float,
    cpu_accounting: dict[str, float] | None = None,
    limit: int = 25,
) -> str:
    """The report: thread busy shares, CPU per job by package, top self and inclusive.
    `jobs` is how many jobs the worker finished during the recorded `window_s` seconds."""
    cpu = parse(cpu_raw)
    wall = parse(wall_raw)
    total_cpu = sum(s.count for s in cpu) or 1
    jobs = max(jobs, 1)
    # Each CPU sample stands for 1/rate seconds of one thread's CPU.
    us_per_sample = 1e6 / rate_hz / jobs
    out = [
        f"{title}: {window_s:.1f}s window, {jobs} jobs in it "
        f"({jobs / window_s:.0f} jobs/s); {total_cpu} CPU samples at {rate_hz} Hz -> "
        f"{total_cpu * us_per_sample:.0f} us of Python-visible CPU per job",
        "",
    ]
    if cpu_accounting:
        out.append("CPU per job over the drain, by process group (from /proc):")
        out += [f"  {us:8.1f} us/job  {name}" for name, us in cpu_accounting.items()]
        out.append("")

    out.append("threads: busy samples / all samples (wall)")
    wall_by_thread = Counter[str]()
    for s in wall:
        wall_by_thread[s.thread] += s.count
    cpu_by_thread = Counter[str]()
    for s in cpu:
        cpu_by_thread[s.thread] += s.count
    for thread, n in wall_by_thread.most_common():
        busy = cpu_by_thread.get(thread, 0)
        out.append(f"  {thread:<24} {busy:6d} / {n:6d}  busy {100 * busy / n:5.1f}%")
    out.append("")
    out.append("wall time of each thread (idle included) by its innermost function of ours, or")
    out.append("its running function if none (waiting on PostgreSQL shows as psycopg's wait):")
    for thread, n in wall_by_thread.most_common():
        where = Counter[str]()
        for s in wall:
            if s.thread == thread and s.frames:
                where[_innermost(s.frames)] += s.count
        out.append(f"  {thread}:")
        out += [f"    {100 * k / n:5.1f}%  {name}" for name, k in where.most_common(8)]
    out.append("")

    by_bucket = Counter[str]()
    self_time = Counter[str]()
    inclusive = Counter[str]()
    ours = Counter[str]()
    for s in cpu:
        if not s.frames:
            continue
        by_bucket[bucket(s.frames[-1])] += s.count
        self_time[short(s.frames[-1])] += s.count
        for frame in set(s.frames):
            inclusive[short(frame)] += s.count
        # The innermost frame of our own code: which of our steps the time is spent under.
        for frame in reversed(s.frames):
            if is_ours(frame):
                ours[short(frame)] += s.count
                break
        else:
            ours["(not under our code: event loop, pool threads)"] += s.count

    out.append("CPU by package of the running function (self time):")
    out += _table(by_bucket, total_cpu, us_per_sample, limit)
    out.append("")
    out.append("CPU under our innermost function (inclusive):")
    out += _table(ours, total_cpu, us_per_sample, limit)
    out.append("")
    out.append("top functions by self CPU:")
    out += _table(self_time, total_cpu, us_per_sample, limit)
    out.append("")
    out.append("top functions by inclusive CPU:")
    out += _table(inclusive, total_cpu, us_per_sample, limit)
    return "\n".join(out) + "\n"
