"""Processes seen through Linux's /proc: the children a supervisor started."""

from __future__ import annotations

from pathlib import Path


def child_pids(pid: int) -> set[int]:
    """The live (not zombie) children of process `pid`."""
    children: set[int] = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat_fields(stat)
        if fields and int(fields[1]) == pid and fields[0] != "Z":
            children.add(int(stat.parent.name))
    return children


def is_running(pid: int) -> bool:
    fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    return fields is not None and fields[0] != "Z"


def _stat_fields(stat: Path) -> list[str] | None:
    """State, parent pid, ... of a /proc/<pid>/stat; None once the process is gone."""
    try:
        text = stat.read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may itself contain spaces and parentheses.
    return text[text.rindex(")") + 2 :].split()
