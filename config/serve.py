"""`manage.py serve`: one listening socket, several Daphne processes accepting on it.

The supervisor binds the port once and starts `processes` children
(`python -m config.daphne_server --fd N ...`), each a full Daphne (HTTP and WebSockets) that
inherits the socket: the kernel hands each new connection to whichever child accepts it first.
The supervisor passes SIGTERM/SIGINT on to every child, SIGKILLs a child still running after the
grace period, restarts a child that exits on its own (with backoff) and gives up, exiting 1,
when a child keeps exiting soon after it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
APPLICATION = "config.asgi:application"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# What the children get for either stop signal: a child still importing Django dies of it
# quietly (SIGINT would print a KeyboardInterrupt traceback); a running one drains.
CHILD_STOP_SIGNAL = signal.SIGTERM
# A child that ran this long before exiting was not crash-looping: its failure count restarts.
STABLE_AFTER_S = 30.0
# Waits before each restart of a child that keeps exiting; after the last one, give up.
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0)
# Children drain for this much less than the grace period, so that they end on their own
# (exit watchdog included) before the supervisor's SIGKILL.
CHILD_GRACE_MARGIN_S = 3.0
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    processes: int = 1
    grace_s: float = 30.0
    # Extra `daphne` options for every child, e.g. ("--proxy-headers",).
    daphne_args: tuple[str, ...] = ()
    application: str = APPLICATION
    restart_backoff_s: tuple[float, ...] = RESTART_BACKOFF_S

    @property
    def child_grace_s(self) -> float:
        return max(self.grace_s - CHILD_GRACE_MARGIN_S, self.grace_s / 2)


@dataclass
class Child:
    """One slot of the supervisor: the Daphne process currently filling it and its record."""

    number: int
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    quick_exits: int = 0  # in a row, each within STABLE_AFTER_S of its start

    def log_context(self) -> dict[str, int]:
        return {"child": self.number, "pid": self.process.pid if self.process else 0}


@dataclass
class StopRequest:
    deadline: float
    give_up: bool = False


def default_processes() -> int:
    """The CPUs this process may run on (its affinity mask where there is one), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket every child accepts on; `::` also accepts IPv4 where it can."""
    host = host.strip("[]")
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    sock = socket.create_server(
        (host, port),
        family=family,
        backlog=socket.SOMAXCONN,
        dualstack_ipv6=host == "::" and socket.has_dualstack_ipv6(),
    )
    # Twisted adopts only non-blocking sockets; the flag is shared by every inherited copy.
    sock.setblocking(False)
    return sock


def socket_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if sock.family == socket.AF_INET6 else f"http://{host}:{port}"


class Supervisor:
    """Runs `options.processes` Daphne children on one socket until a stop signal."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.children = [Child(number) for number in range(1, options.processes + 1)]
        self.socket: socket.socket | None = None
        self.stop_request: StopRequest | None = None
        self.stopping = asyncio.Event()

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT or a crash loop; 0 if every child stopped cleanly."""
        self.socket = bind_socket(self.options.host, self.options.port)
        logger.info(
            "serving %s with %d Daphne processes (grace %.0fs)",
            socket_url(self.socket),
            self.options.processes,
            self.options.grace_s,
            extra={"pid": os.getpid()},
        )
        try:
            with self._stop_signals_handled():
                results = await asyncio.gather(*(self._keep_running(c) for c in self.children))
        finally:
            self._close_socket()
        clean = all(results) and self.stop_request is not None and not self.stop_request.give_up
        logger.info("stopped %s", "cleanly" if clean else "with errors")
        return 0 if clean else 1

    async def _keep_running(self, child: Child) -> bool:
        """Start the child, restart it whenever it exits unasked; its stop ends the loop.
        True if it stopped cleanly."""
        while not self.stopping.is_set():
            process = await self._start(child)
            exited = asyncio.ensure_future(process.wait())
            stop = asyncio.ensure_future(self.stopping.wait())
            await asyncio.wait({exited, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if self.stopping.is_set():
                return await self._stop(child, process, exited)
            ran_s = time.monotonic() - child.started_at
            child.quick_exits = child.quick_exits + 1 if ran_s < STABLE_AFTER_S else 0
            backoff_s = self.options.restart_backoff_s
            if child.quick_exits > len(backoff_s):
                logger.error(
                    "exited with %s, %d times in a row within %.0fs of starting: giving up",
                    describe_exit(process.returncode),
                    child.quick_exits,
                    STABLE_AFTER_S,
                    extra=child.log_context(),
                )
                self._request_stop(give_up=True)
                return False
            delay = backoff_s[child.quick_exits - 1] if child.quick_exits else 0.0
            logger.warning(
                "exited with %s after %.1fs; restarting in %.1fs",
                describe_exit(process.returncode),
                ran_s,
                delay,
                extra=child.log_context(),
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=delay)
        return True

    async def _start(self, child: Child) -> asyncio.subprocess.Process:
        assert self.socket is not None
        fd = self.socket.fileno()
        child.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "config.daphne_server",
            "--fd",
            str(fd),
            "--grace",
            f"{self.options.child_grace_s:g}",
            *self.options.daphne_args,
            self.options.application,
            cwd=ROOT,
            pass_fds=(fd,),
            # Signals reach a child only through the supervisor (a terminal's Ctrl-C would
            # otherwise reach it twice); it still gets SIGTERM if the supervisor dies.
            start_new_session=True,
            preexec_fn=stop_with_parent_hook(),
        )
        child.started_at = time.monotonic()
        logger.info("started", extra=child.log_context())
        return child.process

    async def _stop(
        self, child: Child, process: asyncio.subprocess.Process, exited: asyncio.Future[int]
    ) -> bool:
        request = self.stop_request
        assert request is not None
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(CHILD_STOP_SIGNAL)
        try:
            await asyncio.wait_for(
                asyncio.shield(exited), timeout=max(0.0, request.deadline - time.monotonic())
            )
        except TimeoutError:
            logger.error(
                "still running after the %.0fs grace period: SIGKILL",
                self.options.grace_s,
                extra=child.log_context(),
            )
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await exited
            return False
        # A child stopped before it could install its handlers dies of the signal itself.
        clean = process.returncode in (0, -CHILD_STOP_SIGNAL)
        log = logger.info if clean else logger.warning
        log("stopped with %s", describe_exit(process.returncode), extra=child.log_context())
        return clean

    def _request_stop(self, *, give_up: bool = False) -> None:
        self.stop_request = StopRequest(
            deadline=time.monotonic() + self.options.grace_s, give_up=give_up
        )
        # Nothing else is accepted once the children have closed their copies.
        self._close_socket()
        self.stopping.set()

    def _on_stop_signal(self, signum: signal.Signals) -> None:
        if self.stop_request is None:
            logger.info(
                "%s: stopping %d processes (grace %.0fs)",
                signum.name,
                len(self.running_children()),
                self.options.grace_s,
            )
            self._request_stop()
            return
        logger.warning("%s again: passing it on, processes stop at once", signum.name)
        for child in self.running_children():
            assert child.process is not None
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(CHILD_STOP_SIGNAL)

    def running_children(self) -> list[Child]:
        return [c for c in self.children if c.process and c.process.returncode is None]

    @contextlib.contextmanager
    def _stop_signals_handled(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, self._on_stop_signal, signum)
        try:
            yield
        finally:
            for signum in STOP_SIGNALS:
                loop.remove_signal_handler(signum)

    def _close_socket(self) -> None:
        if self.socket is not None:
            self.socket.close()


def describe_exit(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        return f"signal {signal.Signals(-returncode).name}"
    return f"code {returncode}"


def stop_with_parent_hook() -> Callable[[], None] | None:
    """On Linux, a pre-exec hook asking the kernel to SIGTERM the child when the supervisor
    dies (even by SIGKILL), so no orphan keeps serving the port."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def hook() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    return hook
