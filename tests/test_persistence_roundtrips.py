"""Round trips per operation on PostgreSQL, counted on the wire by a TCP proxy."""

from __future__ import annotations

import pytest

from persistence import Store, UsageRecord, build_user_content
from tests.fixtures_db import RoundTripProxy

USAGE = UsageRecord(prompt_tokens=1, completion_tokens=1, total_tokens=2)


async def _open(store: Store, thread_id: str, owner: int, turn: str) -> int:
    opened = await store.open_turn(
        thread_id, owner, turn, build_user_content("x"), lease_owner="p", lease_seconds=30
    )
    assert opened.status == "opened" and opened.assistant_message_id is not None
    return opened.assistant_message_id


@pytest.mark.anyio
async def test_open_and_finalize_are_one_round_trip_each(
    counting_store: tuple[Store, RoundTripProxy],
) -> None:
    store, proxy = counting_store
    owner = await store.create_user("alice")
    warm_thread = (await store.create_thread(owner, None, None))[0].id
    thread_id = (await store.create_thread(owner, None, None))[0].id
    # Warm up: prepared statements and type introspection are cached per connection.
    warm = await _open(store, warm_thread, owner, "w")
    await store.finalize_turn(warm, warm_thread, owner, [], "complete", USAGE)

    proxy.reset()
    assistant_id = await _open(store, thread_id, owner, "t1")
    opened_trips = proxy.round_trips

    proxy.reset()
    await _open(store, thread_id, owner, "t1")  # idempotent repeat, no race
    repeat_trips = proxy.round_trips

    proxy.reset()
    outcome = await store.finalize_turn(
        assistant_id, thread_id, owner, [{"type": "text", "text": "hi"}], "complete", USAGE
    )
    finalize_trips = proxy.round_trips
    assert outcome == "ok"

    print(f"round trips: open={opened_trips} repeat={repeat_trips} finalize={finalize_trips}")
    assert (opened_trips, repeat_trips, finalize_trips) == (1, 1, 1)


@pytest.mark.anyio
async def test_proxy_counts_pipelined_exchanges(
    counting_store: tuple[Store, RoundTripProxy],
) -> None:
    # The counter itself: three sequential statements are three round trips.
    store, proxy = counting_store
    await store.ping()
    proxy.reset()
    for _ in range(3):
        assert await store.ping()
    assert proxy.round_trips == 3


@pytest.mark.anyio
async def test_open_with_history_is_one_round_trip(
    counting_store: tuple[Store, RoundTripProxy],
) -> None:
    store, proxy = counting_store
    owner = await store.create_user("alice")
    thread_id = (await store.create_thread(owner, None, None))[0].id

    async def turn(turn_id: str) -> int:
        opened = await store.open_turn(
            thread_id,
            owner,
            turn_id,
            build_user_content(f"x {turn_id}"),
            lease_owner="p",
            lease_seconds=30,
            with_history=True,
        )
        assert opened.status == "opened" and opened.history is not None
        assert opened.assistant_message_id is not None
        await store.finalize_turn(
            opened.assistant_message_id, thread_id, owner, [], "complete", USAGE
        )
        return len(opened.history)

    assert await turn("warm") == 0  # prepares the statement on the connection
    proxy.reset()
    opened = await store.open_turn(
        thread_id,
        owner,
        "t1",
        build_user_content("x"),
        lease_owner="p",
        lease_seconds=30,
        with_history=True,
    )
    trips = proxy.round_trips
    assert opened.history is not None
    assert [(m.role, m.turn_id) for m in opened.history] == [
        ("user", "warm"),
        ("assistant", "warm"),
    ]
    print(f"round trips: open with history={trips}")
    assert trips == 1

    # renew_leases is one statement for all the rows named.
    assert opened.assistant_message_id is not None
    ids = [opened.assistant_message_id]
    await store.renew_leases("p", 30, ids)  # warm-up
    proxy.reset()
    assert await store.renew_leases("p", 30, ids) == set(ids)
    assert proxy.round_trips == 1
