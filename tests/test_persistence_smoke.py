from __future__ import annotations

import pytest

from persistence import Store, build_user_content
from tests.fixtures_db import MakeThread


@pytest.mark.anyio
async def test_open_and_finalize_smoke(store: Store, user_id: int, make_thread: MakeThread) -> None:
    thread_id = await make_thread()
    opened = await store.open_turn(
        thread_id, user_id, "t1", build_user_content("hi"), lease_owner="p1", lease_seconds=30
    )
    assert opened.status == "opened", opened
    again = await store.open_turn(
        thread_id, user_id, "t1", build_user_content("hi"), lease_owner="p1", lease_seconds=30
    )
    assert again.user_message_id == opened.user_message_id
    assert not again.user_inserted
    msgs = await store.list_messages(thread_id, user_id)
    assert msgs is not None and len(msgs) == 2
