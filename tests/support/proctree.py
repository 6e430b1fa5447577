"""Process trees from /proc (Linux, no psutil): every descendant of a process, and whether the very processes seen
earlier are still running. A process is identified by (pid, start time) so a reused pid is not mistaken for it,
and a zombie (exited, waiting to be reaped by whoever adopted it) counts as gone."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class Proc:
    pid: int
    start: int  # clock ticks after boot (field 22 of /proc/<pid>/stat)
    cmdline: str

    def __str__(self) -> str:
        return f"{self.pid} {self.cmdline[:160]}"


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time), or None if the process is gone."""
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces and parentheses
    return fields[0], int(fields[1]), int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def proc(pid: int) -> Proc | None:
    stat = _stat(pid)
    return None if stat is None else Proc(pid, stat[2], _cmdline(pid))


def descendants(pid: int) -> list[Proc]:
    """Every living process whose ancestry includes `pid` (children, grandchildren ...), not `pid` itself."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir(PROC):
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and stat[0] not in ("Z", "X"):
                children.setdefault(stat[1], []).append(int(entry.name))
    found: list[Proc] = []
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        p = proc(child)
        if p is not None:
            found.append(p)
        todo.extend(children.get(child, []))
    return found


def running(p: Proc) -> bool:
    """True while that very process (same pid and start time) exists and is not a zombie."""
    stat = _stat(p.pid)
    return stat is not None and stat[2] == p.start and stat[0] not in ("Z", "X")


def wait_gone(procs: list[Proc], timeout: float) -> list[Proc]:
    """Waits up to `timeout` s for every process in `procs` to end; returns the ones still running."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in procs if running(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)
