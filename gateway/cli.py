"""The ``turngate`` command: serve, migrate, keys."""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any

import uvicorn

from gateway.settings import Settings, settings_help
from turngate.exceptions import ConfigError, TurngateError


def _load_dotenv() -> None:
    try:
        from dotenv import load_dotenv
    except ImportError:  # optional at runtime
        return
    load_dotenv(override=False)


def _settings() -> Settings:
    _load_dotenv()
    return Settings.from_env()


async def _first_start_key(settings: Settings) -> str | None:
    """On the embedded default with no users yet: make a local user and a one-time key."""
    from persistence import Store, migrate

    await migrate(settings.database_url)
    async with Store(settings.database_url) as store:
        if await store.count_users() > 0:
            return None
        user_id = await store.create_user("local")
        return await store.create_api_key(user_id)


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway._http_guard import HeadLimits, guarded_http_protocol
    from gateway.app import create_app
    from gateway.logs import configure_logging

    settings = _settings()
    configure_logging(settings.log_format, settings.log_level)
    if settings.database_url.startswith("sqlite"):
        key = asyncio.run(_first_start_key(settings))
        if key is not None:
            shown_host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
            print("turngate: first start, created user 'local'. Open the chat page with:")
            print(f"    http://{shown_host}:{args.port}/#key={key}")
            print("(the key is shown only this once; `turngate keys create NAME` makes more)")
            sys.stdout.flush()
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        # httptools with a head deadline, head size limits and TCP_USER_TIMEOUT.
        http=guarded_http_protocol(HeadLimits(
            settings.header_timeout, settings.max_header_bytes,
            settings.max_pending_connections, settings.send_timeout,
        )),
        log_config=None,
        lifespan="on",
        # A backstop only: the app's drain ends every live stream within the grace
        # period plus one finalize deadline; uvicorn then cancels what is left.
        timeout_graceful_shutdown=math.ceil(
            settings.shutdown_grace_seconds + settings.finalize_timeout + 2
        ),
    )
    _DrainingServer(config, app).run()
    return 0


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the app the moment SIGTERM/SIGINT arrives.

    uvicorn closes the listener, then waits for open connections before it runs
    the lifespan shutdown. SSE streams of running turns would hold it there, so
    the app must start draining at the signal: it stops taking turns (503), lets
    running ones finish within the grace period, finalizes the rest as
    ``interrupted`` and ends their streams with a finish chunk.
    """

    def __init__(self, config: uvicorn.Config, app: Any) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        event = getattr(self._app.state.ctx, "shutdown_event", None)
        if event is not None and not event.is_set():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                loop.call_soon_threadsafe(event.set)
            else:
                event.set()
        super().handle_exit(sig, frame)


def cmd_migrate(args: argparse.Namespace) -> int:
    from persistence import migrate

    settings = _settings()
    asyncio.run(migrate(settings.database_url))
    print("turngate: schema is current", file=sys.stderr)
    return 0


async def _keys_create(settings: Settings, name: str) -> str:
    from persistence import Store, migrate

    if settings.database_url.startswith("sqlite"):
        await migrate(settings.database_url)
    async with Store(settings.database_url) as store:
        user_id = await store.create_user(name)
        return await store.create_api_key(user_id)


async def _keys_revoke(settings: Settings, prefix: str) -> bool:
    from persistence import Store

    async with Store(settings.database_url) as store:
        return await store.revoke_api_key(prefix)


def cmd_keys(args: argparse.Namespace) -> int:
    settings = _settings()
    if args.keys_command == "create":
        name = args.name.strip()
        if not name or len(name) > 100:
            print(f"turngate: user name {args.name!r} must be 1..100 characters", file=sys.stderr)
            return 2
        print(asyncio.run(_keys_create(settings, name)))
        return 0
    from persistence import split_key

    prefix = args.prefix.strip()
    whole_key = split_key(prefix)
    if whole_key is not None:
        prefix = whole_key[0]
    if asyncio.run(_keys_revoke(settings, prefix)):
        print(f"turngate: revoked key {prefix}", file=sys.stderr)
        return 0
    print(f"turngate: no active key with prefix {prefix!r}", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turngate", description="A chat-turn gateway.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="run the gateway",
        description="Run the gateway. Configuration comes from environment variables "
        "(a .env file may set them):\n\n" + settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(func=cmd_serve)
    mig = sub.add_parser("migrate", help="bring the database schema to the newest version")
    mig.set_defaults(func=cmd_migrate)
    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create user NAME if needed and print a new key")
    create.add_argument("name")
    revoke = keys_sub.add_parser(
        "revoke", help="revoke the key with PREFIX (or give the whole key)",
        epilog="A prefix that starts with '-' (keys made by early versions) goes after "
        "'--': turngate keys revoke -- -AbC12_x",
    )
    revoke.add_argument("prefix", help="the 8 characters after 'tg_', or the whole key")
    keys.set_defaults(func=cmd_keys)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``turngate`` console script."""
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except ConfigError as exc:
        print(f"turngate: configuration error: {exc}", file=sys.stderr)
        return 2
    except TurngateError as exc:
        print(f"turngate: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
