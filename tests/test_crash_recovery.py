"""A hard kill mid-stream: the restarted server marks the turn interrupted."""

from __future__ import annotations

import signal

import anyio
import httpx
import pytest

from tests.fixtures_server import ServerProcess
from tests.sse_client import stream_request, validate_ui_stream
from tests.waiting import streaming_with_text

pytestmark = pytest.mark.anyio

CHECKPOINT = 0.3
LEASE = 1.5


async def test_sigkill_mid_stream_then_restart(database_url: str) -> None:
    server = ServerProcess(
        database_url,
        TURNGATE_CHECKPOINT_SECONDS=str(CHECKPOINT),
        TURNGATE_LEASE_SECONDS=str(LEASE),
    )
    key = (await server.cli("keys", "create", "crashy")).splitlines()[-1]
    headers = {"authorization": f"Bearer {key}"}
    try:
        await server.start()
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=10) as client:
            thread = (await client.post("/v1/threads", json={})).json()["id"]
            body = {"turn_id": "doomed", "text": "x", "model": "scripted:tokens=1000,delay_ms=10"}
            async with anyio.create_task_group() as tg:
                async def reader() -> None:
                    try:
                        await stream_request(client, "POST", f"/v1/threads/{thread}/turns",
                                             json=body)
                    except httpx.TransportError:
                        pass  # the server died under it

                tg.start_soon(reader)
                # Killed once a checkpoint holds some of the reply.
                await streaming_with_text(client, thread, prefix="w1 w2 ",
                                          within=LEASE + 3 * CHECKPOINT)
                server.kill(signal.SIGKILL)
            assert await server.wait(5) is not None
            killed_at = anyio.current_time()

            await server.start()
            with anyio.fail_after(LEASE + CHECKPOINT + 3):
                while True:
                    msgs = (await client.get(f"/v1/threads/{thread}/messages")).json()["messages"]
                    if msgs[-1]["status"] == "interrupted":
                        break
                    assert msgs[-1]["status"] == "streaming"
                    await anyio.sleep(0.1)
            assert anyio.current_time() - killed_at <= LEASE + CHECKPOINT + 3
            text = msgs[-1]["content"][0]["text"]
            assert text.startswith("w1 w2 "), "the checkpointed content was lost"
            usage = (await client.get("/v1/usage", params={"thread_id": thread})).json()["usage"]
            assert len(usage) == 1 and usage[0]["estimated"] is True

            nxt = await stream_request(
                client, "POST", f"/v1/threads/{thread}/turns",
                json={"turn_id": "after", "text": "y", "model": "scripted:tokens=3"})
            validate_ui_stream(nxt)
            assert nxt.text == "w1 w2 w3 "
    finally:
        await server.stop()
