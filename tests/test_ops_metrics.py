"""``/metrics`` values move as turns run (both databases)."""

from __future__ import annotations

import json

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures_server import GatewayServer

pytestmark = pytest.mark.anyio

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(client: httpx.AsyncClient) -> Samples:
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum over every label set that includes ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


async def test_metrics_move_as_turns_run(gateway: GatewayServer) -> None:
    async with gateway.client() as api:
        before = await scrape(api)
        names = {n for n, _ in before}
        assert {"turngate_generations_started_total", "turngate_active_streams",
                "turngate_active_generations"} <= names
        assert value(before, "turngate_generations_started_total") == 0
        assert value(before, "turngate_active_streams") == 0

        # 1. A turn that completes.
        thread_a = await gateway.new_thread(api)
        r = await api.post(f"/v1/threads/{thread_a}/turns",
                           json={"turn_id": "a1", "text": "hello", "model": "scripted:tokens=5"})
        assert r.status_code == 200
        after_complete = await scrape(api)
        assert value(after_complete, "turngate_generations_started_total") == 1
        assert value(after_complete, "turngate_turns_finalized_total", status="complete") == 1
        assert value(after_complete, "turngate_time_to_first_token_seconds_count") == 1
        assert value(after_complete, "turngate_finalize_duration_seconds_count") == 1
        assert total(after_complete, "turngate_db_operation_seconds_count",
                     operation="open_turn") >= 1
        assert total(after_complete, "turngate_db_operation_seconds_count",
                     operation="finalize_turn", outcome="ok") == 1
        assert total(after_complete, "turngate_db_operation_seconds_sum") > 0

        # 2. A turn that is cancelled mid-stream: the gauges are up while it streams.
        thread_b = await gateway.new_thread(api)
        seen_text = anyio.Event()
        chunks: list[str] = []

        async def follow() -> None:
            async with api.stream(
                "POST", f"/v1/threads/{thread_b}/turns",
                json={"turn_id": "b1", "text": "go on",
                      "model": "scripted:tokens=400,delay_ms=20"},
            ) as resp:
                assert resp.status_code == 200
                async for line in resp.aiter_lines():
                    if line.startswith("data: {"):
                        chunks.append(json.loads(line[6:])["type"])
                        if chunks[-1] == "text-delta":
                            seen_text.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(follow)
            with anyio.fail_after(10):
                await seen_text.wait()
            during = await scrape(api)
            assert value(during, "turngate_active_streams") == 1
            assert value(during, "turngate_active_generations") == 1
            assert value(during, "turngate_generations_started_total") == 2
            c = await api.post(f"/v1/threads/{thread_b}/turns/b1/cancel")
            assert c.status_code == 200 and c.json()["cancelled"] is True
        assert chunks[-1] == "finish"

        for _ in range(250):  # the response's last bookkeeping runs after the body
            after = await scrape(api)
            if value(after, "turngate_active_streams") == 0:
                break
            await anyio.sleep(0.02)
        assert value(after, "turngate_active_streams") == 0
        assert value(after, "turngate_active_generations") == 0
        assert value(after, "turngate_finalizing") == 0
        assert value(after, "turngate_turns_finalized_total", status="cancelled") == 1
        assert value(after, "turngate_turns_finalized_total", status="complete") == 1
        assert value(after, "turngate_time_to_first_token_seconds_count") == 2
        assert total(after, "turngate_db_operation_seconds_count",
                     operation="finalize_turn", outcome="ok") == 2

        # 3. An upstream failure is counted by adapter, and finalized as error.
        thread_c = await gateway.new_thread(api)
        r = await api.post(f"/v1/threads/{thread_c}/turns",
                           json={"turn_id": "c1", "text": "x",
                                 "model": "scripted:tokens=5,fail_after=2"})
        assert r.status_code == 200
        final = await scrape(api)
        assert value(final, "turngate_upstream_errors_total", adapter="scripted") == 1
        assert value(final, "turngate_turns_finalized_total", status="error") == 1
        assert value(final, "turngate_generations_started_total") == 3

        # 4. Replaying a finished turn does not start a generation.
        r = await api.post(f"/v1/threads/{thread_a}/turns",
                           json={"turn_id": "a1", "text": "hello", "model": "scripted:tokens=5"})
        assert r.status_code == 200
        assert value(await scrape(api), "turngate_generations_started_total") == 3


async def test_metrics_needs_no_key(gateway: GatewayServer) -> None:
    async with httpx.AsyncClient(base_url=gateway.url) as anonymous:
        r = await anonymous.get("/metrics")
        assert r.status_code == 200
        assert "turngate_generations_started_total" in r.text
        assert "turngate_active_streams" in r.text
