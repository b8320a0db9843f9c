"""What a client of the real server sees when the server closes its WebSocket: the code and the
reason (Daphne alone drops the reason)."""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets
from channels.db import database_sync_to_async
from websockets.exceptions import ConnectionClosed

from jobs.models import Tenant
from jobs.services import api_key_create, api_key_revoke
from tests.support.stack import Stack


async def closed_by_server(ws: websockets.ClientConnection) -> tuple[int, str]:
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await asyncio.wait_for(ws.recv(), timeout=10)
    assert closed.value.rcvd is not None, "the connection ended without a close frame"
    return closed.value.rcvd.code, closed.value.rcvd.reason


def test_close_codes_arrive_with_their_reasons(stack: Stack) -> None:
    tenant = Tenant.objects.create(id="acme")
    key_model, key = api_key_create(tenant=tenant)
    stack.start_api()

    async def scenario() -> tuple[tuple[int, str], tuple[int, str]]:
        url = f"{stack.ws_url}?token={key}"
        async with websockets.connect(url, max_size=None) as ws:
            assert json.loads(await ws.recv())["type"] == "CONNECTED"
            await ws.send("x" * (65 * 1024))
            too_big = await closed_by_server(ws)
        async with websockets.connect(url) as ws:
            assert json.loads(await ws.recv())["type"] == "CONNECTED"
            await database_sync_to_async(api_key_revoke)(prefix=key_model.prefix)
            revoked = await closed_by_server(ws)
        return too_big, revoked

    too_big, revoked = asyncio.run(scenario())
    assert too_big == (4009, "message too big")
    assert revoked == (4001, "API key revoked or tenant inactive")
