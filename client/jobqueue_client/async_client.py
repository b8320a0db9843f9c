"""`AsyncClient`: the job queue's REST API and WebSocket from asyncio code. Same methods as
`Client`, as coroutines (`list` and `watch` are async iterators)."""

from __future__ import annotations

import asyncio
import builtins
import json
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI

from jobqueue_client import _calls
from jobqueue_client._realtime import (
    CLOSE_TIMEOUT,
    OPEN_FAILURES,
    Connect,
    Disconnected,
    Emit,
    Fetch,
    Program,
    Receive,
    ReceiveTimeout,
    Reconnecting,
    Send,
    Sleep,
    decode_frame,
    handshake_refused,
    socket_closed,
    wait_program,
    watch_program,
)
from jobqueue_client.errors import JobQueueError
from jobqueue_client.models import Job, JobUpdate


class AsyncClient:
    """The API at `base_url` as the tenant of `api_key`, for asyncio.

    Requests time out after `timeout` seconds; failed attempts are retried up to `max_retries`
    times where that is safe (see `create`). Use as an async context manager, or await
    `aclose()`."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = _calls.DEFAULT_TIMEOUT,
        max_retries: int = _calls.DEFAULT_MAX_RETRIES,
    ) -> None:
        self.base_url = _calls.normalize_base_url(base_url)
        self._ws_url = _calls.websocket_url(self.base_url, api_key)
        self._max_retries = max_retries
        self._backoff = _calls.Backoff()
        self._reconnecting = Reconnecting()
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=_calls.default_headers(api_key), timeout=timeout
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self._http.aclose()

    # --- REST -----------------------------------------------------------------------------------

    async def create(
        self,
        type: str,
        payload: Any = None,
        *,
        priority: int | None = None,
        max_attempts: int | None = None,
        run_at: datetime | str | None = None,
        delay_ms: int | None = None,
        timeout_ms: int | None = None,
        depends_on: Sequence[str] | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """Create a job. It carries an `Idempotency-Key` (a new UUID unless given), so a lost
        answer, a 429 or a 503 is retried with backoff and never makes a second job."""
        options = {
            "priority": priority,
            "max_attempts": max_attempts,
            "run_at": run_at,
            "delay_ms": delay_ms,
            "timeout_ms": timeout_ms,
            "depends_on": None if depends_on is None else [str(i) for i in depends_on],
        }
        call = _calls.create_call(type, payload, options, idempotency_key)
        return Job.from_api(await self._send(call))

    async def create_batch(
        self, jobs: Iterable[Mapping[str, Any]], *, idempotency_key: str | None = None
    ) -> builtins.list[str]:
        """Create 1 to 1,000 jobs at once, all or none (each a mapping with `type`, `payload`
        and `create`'s options, `depends_on` included, where `"$<index>"` names an earlier
        item); their ids in order. It carries an `Idempotency-Key` (a new UUID unless given),
        so a retried batch never creates its jobs twice."""
        return (await self._send(_calls.batch_call(jobs, idempotency_key)))["jobIds"]

    async def get(self, id: Any) -> Job:
        """One job of the tenant; NotFound if it has none of that id."""
        return Job.from_api(await self._send(_calls.get_call(id)))

    async def list(
        self, status: str | None = None, type: str | None = None, *, page_size: int = 100
    ) -> AsyncIterator[Job]:
        """Every job of the tenant (optionally of one status and/or type), newest first, page
        by page as the iteration goes."""
        pages = _calls.Pages(status=status, job_type=type, page_size=page_size)
        call = pages.next_call()
        while call is not None:
            for job in pages.take(await self._send(call)):
                yield job
            call = pages.next_call()

    async def cancel(self, id: Any) -> Job:
        """Cancel a WAITING, PENDING or RUNNING job (and the jobs waiting for it); Conflict in
        any other state."""
        return Job.from_api(await self._send(_calls.action_call(id, "cancel")))

    async def retry(self, id: Any) -> Job:
        """Put a FAILED or CANCELLED job back to PENDING; Conflict in any other state."""
        return Job.from_api(await self._send(_calls.action_call(id, "retry")))

    async def _send(self, call: _calls.Call) -> Any:
        retrying = _calls.Retrying(call, max_retries=self._max_retries, backoff=self._backoff)
        while True:
            try:
                response = await self._http.request(
                    call.method, call.path, json=call.json, params=call.params, headers=call.headers
                )
            except httpx.TransportError as exc:
                await asyncio.sleep(retrying.after_transport_error(exc, self.base_url))
                continue
            pause = retrying.after_response(response)
            if pause is None:
                return _calls.result_of(response)
            await asyncio.sleep(pause)

    # --- WebSocket ------------------------------------------------------------------------------

    async def wait(self, id: Any, timeout: float | None = None) -> Job:
        """Wait until the job is COMPLETED, FAILED or CANCELLED and return it, as pushed over
        the WebSocket (no polling). WaitTimeout after `timeout` seconds (None: no limit)."""
        result: list[Job] = []
        async for _ in self._run(wait_program(str(id), timeout, self._reconnecting), result):
            pass
        return result[0]

    def watch(self, cursor: str | None = None) -> AsyncGenerator[JobUpdate, None]:
        """Every update of the tenant's jobs, for ever: from `cursor` on (`"0"`: from the
        beginning; None: from now). Reconnects and resumes after a drop; never yields a change
        twice."""
        return self._run(watch_program(cursor, self._reconnecting), [])

    async def _run(
        self, program: Program, result: builtins.list[Any]
    ) -> AsyncGenerator[JobUpdate, None]:
        """Run a program of `_realtime`: its updates are yielded, its result appended to
        `result` (an async generator returns no value)."""
        socket = _Socket(self._ws_url)
        reply: Any = None
        error: BaseException | None = None
        try:
            while True:
                try:
                    operation = program.throw(error) if error else program.send(reply)
                except StopIteration as done:
                    result.append(done.value)
                    return
                reply, error = None, None
                if isinstance(operation, Emit):
                    yield operation.update
                elif isinstance(operation, Fetch):
                    reply = await self.get(operation.job_id)
                elif isinstance(operation, Sleep):
                    await asyncio.sleep(operation.seconds)
                else:
                    try:
                        reply = await socket.perform(operation)
                    except (Disconnected, ReceiveTimeout) as exc:
                        error = exc
        finally:
            await socket.close()
            program.close()


class _Socket:
    """One WebSocket at a time for a program, with the library's failures turned into the
    program's `Disconnected` and `ReceiveTimeout`."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.connection: ClientConnection | None = None

    async def perform(self, operation: Connect | Send | Receive) -> Any:
        if isinstance(operation, Connect):
            await self.close()
            self.connection = await _open(self.url, operation.timeout)
            return None
        assert self.connection is not None
        try:
            if isinstance(operation, Send):
                await self.connection.send(json.dumps(operation.frame))
                return None
            while True:
                try:
                    raw = await asyncio.wait_for(self.connection.recv(), operation.timeout)
                except asyncio.TimeoutError:
                    raise ReceiveTimeout() from None
                frame = decode_frame(raw)
                if frame is not None:
                    return frame
        except ConnectionClosed as exc:
            raise socket_closed(exc) from None

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()
            self.connection = None


async def _open(url: str, timeout: float) -> ClientConnection:
    try:
        return await connect(url, open_timeout=timeout, close_timeout=CLOSE_TIMEOUT)
    except InvalidStatus as exc:
        raise handshake_refused(exc) from None
    except InvalidURI as exc:
        raise JobQueueError(f"not a WebSocket URL: {exc}") from None
    except OPEN_FAILURES as exc:
        raise Disconnected(_calls.describe(exc)) from None
