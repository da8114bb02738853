"""Users, API keys, threads and pagination; the user content builder; migrations."""

from __future__ import annotations

import pytest

from persistence import (
    Store,
    ThreadIdTaken,
    UsageRecord,
    build_user_content,
    migrate,
    schema_status,
)
from tests.fixtures_db import MakeThread
from tests.waiting import clock_past


def test_build_user_content_orders_parts_and_drops_bad_documents() -> None:
    docs = [
        {"id": 1, "title": "A", "document_type": "pdf", "extra": "ignored"},
        {"id": "x", "title": "B", "document_type": "note"},
        {"id": 2, "title": "no type"},
        {"title": "no id", "document_type": "pdf"},
        {"id": 3, "title": 7, "document_type": "pdf"},
        {"id": True, "title": "bool id", "document_type": "pdf"},
        "not a dict",
    ]
    parts = build_user_content("hi", ["data:image/png;base64,AA", "data:b"], docs)
    assert parts == [
        {"type": "text", "text": "hi"},
        {"type": "image", "image": "data:image/png;base64,AA"},
        {"type": "image", "image": "data:b"},
        {
            "type": "mentioned-documents",
            "documents": [
                {"id": 1, "title": "A", "document_type": "pdf"},
                {"id": "x", "title": "B", "document_type": "note"},
            ],
        },
    ]
    assert build_user_content("hi", None, [{"id": 1}]) == [{"type": "text", "text": "hi"}]


@pytest.mark.anyio
async def test_users_and_keys(store: Store) -> None:
    assert await store.count_users() == 0
    uid = await store.create_user("alice")
    assert await store.create_user("alice") == uid
    assert await store.count_users() == 1
    key = await store.create_api_key(uid)
    assert key.startswith("tg_") and len(key) == 3 + 8 + 1 + 43
    assert await store.authenticate(key) == uid
    assert await store.authenticate(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert await store.authenticate("tg_short") is None
    assert await store.authenticate("") is None
    stored = await store._db.fetch_val("SELECT secret_hash FROM api_keys")
    assert key[12:] not in str(stored)  # only the hash is kept
    prefix = key[3:11]
    assert await store.revoke_api_key(prefix) is True
    assert await store.revoke_api_key(prefix) is False
    assert await store.authenticate(key) is None


@pytest.mark.anyio
async def test_create_thread_is_idempotent_per_owner(store: Store, user_id: int) -> None:
    row, created = await store.create_thread(user_id, "chat-1", "Title")
    assert created and row.id == "chat-1" and row.title == "Title"
    again, created_again = await store.create_thread(user_id, "chat-1", None)
    assert not created_again and again == row
    other = await store.create_user("bob")
    with pytest.raises(ThreadIdTaken):
        await store.create_thread(other, "chat-1", None)
    generated, _ = await store.create_thread(user_id, None, None)
    assert len(generated.id) == 36 and generated.id.count("-") == 4
    assert await store.get_thread("chat-1", other) is None


@pytest.mark.anyio
async def test_list_threads_paginates_newest_first(
    store: Store, user_id: int, make_thread: MakeThread
) -> None:
    ids = []
    for i in range(5):
        ids.append(await make_thread(thread_id=f"th-{i}"))
        made = await store.get_thread(ids[-1], user_id)
        assert made is not None
        await clock_past(store, made.updated_at)  # the next thread sorts after this one
    # Touching th-0 with a turn moves it to the front.
    await store.open_turn(
        "th-0", user_id, "t", build_user_content("x"), lease_owner="p", lease_seconds=9
    )
    seen: list[str] = []
    cursor = None
    while True:
        page, cursor = await store.list_threads(user_id, limit=2, before=cursor)
        seen.extend(t.id for t in page)
        if cursor is None:
            break
    assert seen == ["th-0", "th-4", "th-3", "th-2", "th-1"]
    with pytest.raises(ValueError):
        await store.list_threads(user_id, before="garbage!")


@pytest.mark.anyio
async def test_list_usage_filters_and_paginates(
    store: Store, user_id: int, make_thread: MakeThread
) -> None:
    usage = UsageRecord(
        prompt_tokens=1,
        completion_tokens=2,
        total_tokens=3,
        cost_micros=5,
        model_breakdown={"m": {"tokens": 3}},
        call_details=[{"model": "m"}],
    )
    threads = [await make_thread() for _ in range(3)]
    for i, thread_id in enumerate(threads):
        opened = await store.open_turn(
            thread_id, user_id, f"t{i}", build_user_content("x"), lease_owner="p", lease_seconds=9
        )
        assert opened.assistant_message_id is not None
        await store.finalize_turn(
            opened.assistant_message_id, thread_id, user_id, [], "complete", usage
        )
    first, cursor = await store.list_usage(user_id, limit=2)
    rest, end = await store.list_usage(user_id, limit=2, before=cursor)
    assert end is None and len(first) == 2 and len(rest) == 1
    assert [r.thread_id for r in first + rest] == threads[::-1]
    assert first[0].model_breakdown == {"m": {"tokens": 3}}
    assert first[0].call_details == [{"model": "m"}]
    only, _ = await store.list_usage(user_id, thread_id=threads[1])
    assert [r.thread_id for r in only] == [threads[1]]
    one, _ = await store.list_usage(user_id, message_id=only[0].message_id, limit=1)
    assert [r.id for r in one] == [only[0].id]
    assert await store.list_usage(await store.create_user("bob")) == ([], None)


@pytest.mark.anyio
async def test_messages_are_returned_in_order_with_iso_timestamps(
    store: Store, user_id: int, make_thread: MakeThread
) -> None:
    thread_id = await make_thread()
    await store.open_turn(
        thread_id, user_id, "t1", build_user_content("hi"), lease_owner="p", lease_seconds=9
    )
    messages = await store.list_messages(thread_id, user_id)
    assert messages is not None
    assert [(m.role, m.status, m.turn_id) for m in messages] == [
        ("user", "complete", "t1"),
        ("assistant", "streaming", "t1"),
    ]
    assert messages[0].content == [{"type": "text", "text": "hi"}]
    assert messages[1].content == [{"type": "text", "text": ""}]
    assert messages[0].created_at.endswith("Z") and "T" in messages[0].created_at


@pytest.mark.anyio
async def test_schema_status_and_migrate(tmp_path: object, database_url: str) -> None:
    assert await schema_status(database_url) == "current"
    await migrate(database_url)  # idempotent
    empty = f"sqlite:///{tmp_path}/empty.db"
    assert await schema_status(empty) == "empty"
    await migrate(empty)
    assert await schema_status(empty) == "current"


@pytest.mark.anyio
async def test_every_writer_reports_to_the_observer(
    store: Store, user_id: int, make_thread: MakeThread
) -> None:
    seen: list[tuple[str, str]] = []
    store.on_operation = lambda op, outcome, seconds: seen.append((op, outcome))
    thread_id = await make_thread()
    await store.open_turn(
        thread_id, user_id, "t", build_user_content("x"), lease_owner="p", lease_seconds=9
    )
    await store.open_turn(
        thread_id, user_id, "t", build_user_content("x"), lease_owner="p", lease_seconds=9
    )
    assert seen == [
        ("create_thread", "inserted"),
        ("open_turn", "inserted"),
        ("open_turn", "race_recovered"),
    ]
