"""The guarded HTTP protocol costs an open connection no more memory than uvicorn's own."""

from __future__ import annotations

import sys

import pytest
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from gateway.ops.http_guard import GuardedHttpToolsProtocol, HeadLimits, guarded_http_protocol


@pytest.mark.anyio
async def test_the_guards_state_does_not_grow_the_connections_instance_dict() -> None:
    config = Config(app="gateway.app:create_app", factory=True, http="httptools")
    config.load()
    state = ServerState()
    plain = HttpToolsProtocol(config=config, server_state=state, app_state={})
    guarded = guarded_http_protocol(HeadLimits())(config=config, server_state=state,
                                                  app_state={})
    assert isinstance(guarded, GuardedHttpToolsProtocol)
    assert guarded._head_bytes == 0 and guarded._refusal == 0
    # Past CPython's shared-key limit an instance dict becomes a full one (~1.5 KiB
    # per connection instead of ~0.3): the guard's own fields live in slots.
    assert vars(guarded).keys() == vars(plain).keys()
    assert sys.getsizeof(vars(guarded)) <= sys.getsizeof(vars(plain))
