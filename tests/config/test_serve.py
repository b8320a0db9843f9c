"""The supervisor of `manage.py serve` (config/serve.py), run in process with real children."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import pytest

from config.serve import ServeOptions, Supervisor, bind_socket


def test_a_process_that_keeps_exiting_makes_the_supervisor_give_up_with_1(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Each child fails at once: the application cannot be imported.
    options = ServeOptions(
        port=0,
        processes=1,
        application="tests.config.no_such_module:application",
        restart_backoff_s=(0.05, 0.05),
    )
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="config.serve"):
        code = asyncio.run(Supervisor(options).run())

    assert code == 1
    assert time.monotonic() - started < 60
    messages = [record.getMessage() for record in caplog.records]
    assert [m for m in messages if m == "started"] == ["started"] * 3
    assert any(m.startswith("exited with code 1, 3 times in a row") for m in messages)
    assert messages[-1] == "stopped with errors"


def test_the_socket_is_bound_once_for_ipv4_and_ipv6_hosts() -> None:
    with bind_socket("127.0.0.1", 0) as sock:
        assert sock.family == socket.AF_INET and not sock.getblocking()
    if not socket.has_ipv6:
        return
    try:
        sock6 = bind_socket("[::1]", 0)
    except OSError as exc:  # IPv6 disabled on this machine
        pytest.skip(f"no IPv6 loopback: {exc}")
    with sock6:
        assert sock6.family == socket.AF_INET6
