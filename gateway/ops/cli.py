"""The ``turngate`` command: serve, migrate, keys."""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import logging
import math
import os
import socket
import sys
import traceback
from collections.abc import Awaitable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, cast

import uvicorn
from dotenv import load_dotenv

from gateway.ops.settings import Settings, settings_help
from turngate.exceptions import ConfigError, SchemaOutdated, TurngateError

logger = logging.getLogger("turngate.cli")


def _load_dotenv() -> None:
    load_dotenv(override=False)


def _settings() -> Settings:
    _load_dotenv()
    return Settings.from_env()


class UsageError(TurngateError):
    """The command cannot do what was asked as given (exit status 2)."""


def _note(message: str) -> None:
    """One line on stderr for the person at the terminal."""
    print(f"turngate: {message}", file=sys.stderr, flush=True)


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket of ``serve``, bound before anything touches the database,
    so that a busy port stops start-up before a migration runs."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # As uvicorn does: a port in TIME_WAIT is free; one with a listener is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            raise TurngateError(
                f"cannot listen on {where}: the port is in use (another turngate serve?); "
                "stop that process or choose another --port"
            ) from exc
        if isinstance(exc, socket.gaierror):
            raise TurngateError(
                f"cannot listen on {where}: unknown host {host!r} ({exc.strerror}); "
                "give --host an address of this machine, e.g. 127.0.0.1 or 0.0.0.0"
            ) from exc
        raise TurngateError(
            f"cannot listen on {where}: {exc.strerror or exc}; choose another --host/--port"
        ) from exc
    return sock


def _sqlite_file(settings: Settings) -> Path | None:
    from persistence import sqlite_path

    path = sqlite_path(settings.database_url)
    return Path(os.path.abspath(path)) if path is not None else None


async def _prepare_for_serve(settings: Settings) -> str | None:
    """Migrate the embedded SQLite file / check the PostgreSQL schema, before serving.

    On the embedded default with no users yet, also make a local user and return a
    one-time key. Raises ``DatabaseUnavailable``/``SchemaOutdated`` with a one-line cause.
    """
    from gateway.app import prepare_database
    from persistence import Store, display_url

    shown = display_url(settings.database_url)
    if not settings.database_url.startswith("sqlite"):
        await prepare_database(settings)
        logger.info("database: %s", shown, extra={"event": "database", "database": shown})
        return None
    file = _sqlite_file(settings)
    created = file is not None and not file.exists()
    await prepare_database(settings)
    logger.info("database: %s%s", shown, " (created)" if created else "",
                extra={"event": "database", "database": shown, "db_created": created})
    async with Store(settings.database_url) as store:
        if await store.count_users() > 0:
            return None
        user_id = await store.create_user("local")
        return await store.create_api_key(user_id)


#: The collector's thresholds under ``turngate serve`` (Python's default: 700, 10, 10).
GC_THRESHOLDS = (20_000, 20, 10)


def tune_gc() -> None:
    """Fewer cyclic garbage collections for a server that holds many open streams.

    With Python's defaults, opening 1,000 held streams ran the collector 522
    times, 4 of them full collections over every object of the process (420,000),
    2.2 s of CPU of the 4.9 s the opens took (docs/DECISIONS.md). A young
    generation of 20,000 objects collects the short-lived cycles of a turn as
    before, only less often (``tests/test_gc_tuning.py``); the objects of start-up
    (modules, the app) are frozen out of every later collection
    (``freeze_startup_objects``).
    """
    gc.set_threshold(*GC_THRESHOLDS)


def freeze_startup_objects() -> None:
    """Collect once, then leave what start-up made (and keeps) out of later collections."""
    gc.collect()
    gc.freeze()


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.app import create_app
    from gateway.ops.http_guard import HeadLimits, guarded_http_protocol
    from gateway.ops.logs import configure_logging

    settings = _settings()
    configure_logging(settings.log_format, settings.log_level)
    sock = _bind(args.host, args.port)
    try:
        key = asyncio.run(_prepare_for_serve(settings))
        port = sock.getsockname()[1]
        if key is not None:
            shown_host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
            print("turngate: first start, created user 'local'. Open the chat page with:")
            print(f"    http://{shown_host}:{port}/#key={key}")
            print("(the key is shown only this once; `turngate keys create NAME` makes more)")
            sys.stdout.flush()
        if getattr(args, "reload", False):
            from gateway.ops.devserver import serve_reload

            sock.close()  # the reloader binds the port itself, for each worker it starts
            serve_reload(args.host, port, args.reload_dir or ())
            return 0
        tune_gc()
        # The database is ready (migrated / checked above): the lifespan does not repeat it.
        app = create_app(settings, prepared=True)
        config = uvicorn.Config(
            _OneLineStartupFailure(app),
            # Told, not guessed: uvicorn takes an app whose __call__ is no coroutine
            # function for an ASGI 2 one.
            interface="asgi3",
            host=args.host,
            port=port,
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
        server = _DrainingServer(config, app)
        try:
            server.run(sockets=[sock])
        except SystemExit:  # uvicorn's "startup failed" (it logged why)
            return 1
        return 0 if server.started else 1
    finally:
        sock.close()


class _OneLineStartupFailure:
    """The app as uvicorn runs it: a start-up failure in the lifespan (Redis not
    answering, say) is logged as one line naming the cause, not as Starlette's
    traceback (which stays available with TURNGATE_LOG_LEVEL=debug)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, scope: Any, receive: Any, send: Any) -> Awaitable[None]:
        # A request gets the app's own awaitable: no frame of this wrapper is held
        # for as long as it runs (a stream: hours).
        if scope["type"] != "lifespan" or _debug():
            return cast("Awaitable[None]", self.app(scope, receive, send))
        return self._lifespan(scope, receive, send)

    async def _lifespan(self, scope: Any, receive: Any, send: Any) -> None:
        failed = False

        async def quiet_send(message: Any) -> None:
            nonlocal failed
            if message["type"] == "lifespan.startup.failed":
                failed = True
                message = {**message, "message": ""}
            await send(message)

        try:
            await self.app(scope, receive, quiet_send)
        except Exception as exc:
            if failed:
                logger.error("startup failed: %s: %s", type(exc).__name__, exc,
                             extra={"event": "startup_failed"})
            raise


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

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            freeze_startup_objects()
        if self.started and sockets:
            # uvicorn names the address only for sockets it bound itself.
            host, port = sockets[0].getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            logger.info("listening on http://%s:%d", shown, port,
                        extra={"event": "listening", "host": host, "port": port})

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
    from persistence import display_url, migrate

    settings = _settings()
    shown = display_url(settings.database_url)
    file = _sqlite_file(settings)
    created = file is not None and not file.exists()
    result = asyncio.run(migrate(settings.database_url))
    if created:
        _note(f"created {shown}, schema {result.after}")
    elif result.changed:
        _note(f"migrated {shown} from {result.before or 'an empty schema'} to {result.after}")
    else:
        _note(f"schema of {shown} is current ({result.after})")
    return 0


async def _open_existing(settings: Settings, *, create: bool) -> None:
    """Make sure the database the key goes into is the one meant.

    SQLite: the file must exist unless ``create`` (then it is created and migrated);
    an existing file is migrated if it is old. PostgreSQL: its schema must be current
    (``turngate migrate`` is the release step).
    """
    from persistence import display_url, migrate, schema_status

    shown = display_url(settings.database_url)
    file = _sqlite_file(settings)
    if file is not None:
        existed = file.exists()
        if not existed:
            if not create:
                raise UsageError(
                    f"no database at {file} (DATABASE_URL={settings.database_url}, "
                    f"working directory {os.getcwd()}): run this where `turngate serve` "
                    "runs or set DATABASE_URL to its database; --create-db creates a new one"
                )
        result = await migrate(settings.database_url)
        if not existed:
            _note(f"created {shown}, schema {result.after}")
        elif result.changed:
            _note(f"migrated {shown} from {result.before or 'an empty schema'} to {result.after}")
        return
    status = await schema_status(settings.database_url)
    if status not in ("current", "newer"):
        raise SchemaOutdated(
            f"the schema of {shown} is {status}: run `turngate migrate` first"
        )


async def _keys_create(settings: Settings, name: str, create_db: bool) -> str:
    from persistence import Store

    await _open_existing(settings, create=create_db)
    async with Store(settings.database_url) as store:
        user_id = await store.create_user(name)
        return await store.create_api_key(user_id)


async def _keys_revoke(settings: Settings, prefix: str) -> bool:
    from persistence import Store

    await _open_existing(settings, create=False)
    async with Store(settings.database_url) as store:
        return await store.revoke_api_key(prefix)


def cmd_keys(args: argparse.Namespace) -> int:
    from persistence import display_url

    settings = _settings()
    shown = display_url(settings.database_url)
    if args.keys_command == "create":
        name = args.name.strip()
        if not name or len(name) > 100:
            print(f"turngate: user name {args.name!r} must be 1..100 characters", file=sys.stderr)
            return 2
        key = asyncio.run(_keys_create(settings, name, args.create_db))
        _note(f"created a key for user {name!r} in {shown}")
        print(key)
        return 0
    from persistence import split_key

    prefix = args.prefix.strip()
    whole_key = split_key(prefix)
    if whole_key is not None:
        prefix = whole_key[0]
    if asyncio.run(_keys_revoke(settings, prefix)):
        print(f"turngate: revoked key {prefix} in {shown}", file=sys.stderr)
        return 0
    print(f"turngate: no active key with prefix {prefix!r} in {shown}", file=sys.stderr)
    return 1


def cmd_check_adapter(args: argparse.Namespace) -> int:
    """Run the conformance checks of turngate.testing.conformance; exit 0 only if all hold."""
    import functools
    import importlib
    import logging
    import os

    import anyio

    from turngate.exceptions import UnknownAdapter
    from turngate.testing.conformance import check_adapter

    _load_dotenv()
    # The check throws errors and cuts turns on purpose: only errors are worth a log line.
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    factory = None
    if args.factory:
        module_name, sep, attr = args.factory.partition(":")
        if not sep or not attr:
            print(f"turngate: --factory {args.factory!r} must be in format "
                  "\"<module>:<attribute>\"", file=sys.stderr)
            return 2
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            print(f"turngate: --factory {args.factory!r} cannot be loaded ({exc}); expected "
                  "an importable module and an attribute of it", file=sys.stderr)
            return 2
    run = functools.partial(
        check_adapter, args.model, env=dict(os.environ), database_url=args.database_url,
        factory=factory, cuts=args.cuts, turn_timeout=args.turn_timeout,
        **({"prompt": args.prompt} if args.prompt else {}),
    )
    try:
        report = anyio.run(run, backend="asyncio")
    except UnknownAdapter as exc:
        print(f"turngate: {exc}", file=sys.stderr)
        return 2
    for line in report.lines():
        print(line)
    sys.stdout.flush()
    if report.ok:
        print(f"turngate: {args.model}: all {len(report.results)} properties hold",
              file=sys.stderr)
        return 0
    print(f"turngate: {args.model}: {len(report.failed)} of {len(report.results)} properties "
          f"fail: {', '.join(report.failed)}", file=sys.stderr)
    return 1


class _HelpFormatter(argparse.RawDescriptionHelpFormatter,
                     argparse.ArgumentDefaultsHelpFormatter):
    """The settings table as written, and each option's default after its meaning."""


def _port(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(
            f"{raw!r}: must be a TCP port number 0..65535 (0 picks a free one)"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turngate", description="A chat-turn gateway.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="run the gateway",
        description="Run the gateway. Configuration comes from environment variables "
        "(a .env file may set them):\n\n" + settings_help(),
        formatter_class=_HelpFormatter,
    )
    serve.add_argument(
        "--host", default="127.0.0.1",
        help="address to listen on: 127.0.0.1 for this machine only, 0.0.0.0 (or ::) "
        "for every interface",
    )
    serve.add_argument(
        "--port", type=_port, default=8000,
        help="TCP port to listen on; checked before the database is touched",
    )
    serve.add_argument("--reload", action="store_true",
                       help="restart on changes to the project, the installed adapter "
                       "packages and any --reload-dir (development)")
    serve.add_argument("--reload-dir", action="append", metavar="DIR",
                       help="also watch DIR with --reload (repeatable)")
    serve.set_defaults(func=cmd_serve)
    check = sub.add_parser(
        "check-adapter",
        help="check that an adapter is safe to plug in (conformance checks)",
        description="Run the adapter conformance checks against a live gateway on a free "
        "loopback port and print one line per property with the measured figure; exit 0 "
        "only if all hold. The adapter's settings (base URL, key) come from the "
        "environment, as for serve. See docs/ADAPTERS.md.",
    )
    check.add_argument("model", help='"<adapter>:<model>", e.g. scripted:tokens=100')
    check.add_argument("--database-url", default=None,
                       help="database for the check (default: a fresh SQLite file)")
    check.add_argument("--factory", default=None, metavar="MODULE:ATTR",
                       help="make the adapter with this class or factory instead of the "
                       "registered one (an adapter not installed yet)")
    check.add_argument("--prompt", default=None,
                       help="the user text of every turn (default: ask for a long reply)")
    check.add_argument("--cuts", type=int, default=20,
                       help="disconnect at this many event indexes at least (default: 20)")
    check.add_argument("--turn-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="longest one turn may take (default: 30)")
    check.set_defaults(func=cmd_check_adapter)
    mig = sub.add_parser(
        "migrate", help="bring the database schema to the newest version",
        description="Bring the schema of DATABASE_URL to the newest version (a new SQLite "
        "file is created). The release step before `turngate serve` on PostgreSQL.",
    )
    mig.set_defaults(func=cmd_migrate)
    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser(
        "create", help="create user NAME if needed and print a new key",
        description="Create user NAME if needed and print a new key, alone on its line, "
        "for the database of DATABASE_URL (default sqlite:///./turngate.db, relative to "
        "the working directory).",
        formatter_class=_HelpFormatter,
    )
    create.add_argument("name", help="the user's name (1..100 characters)")
    create.add_argument(
        "--create-db", action="store_true",
        help="create (and migrate) the SQLite file if it does not exist; without it a "
        "missing file is an error, since the key would not work against a server that "
        "uses another database",
    )
    revoke = keys_sub.add_parser(
        "revoke", help="revoke the key with PREFIX (or give the whole key)",
        epilog="A prefix that starts with '-' (keys made by early versions) goes after "
        "'--': turngate keys revoke -- -AbC12_x",
    )
    revoke.add_argument("prefix", help="the 8 characters after 'tg_', or the whole key")
    keys.set_defaults(func=cmd_keys)
    return parser


def _debug() -> bool:
    return os.environ.get("TURNGATE_LOG_LEVEL", "").strip().lower() == "debug"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``turngate`` console script.

    A failure is one line on stderr naming its cause and what to do, with exit
    status 2 (bad configuration or arguments) or 1 (anything else); the traceback
    follows only with ``TURNGATE_LOG_LEVEL=debug``.
    """
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if _debug():
            traceback.print_exc()
        if isinstance(exc, ConfigError):
            print(f"turngate: configuration error: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, UsageError):
            print(f"turngate: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, TurngateError):
            print(f"turngate: {exc}", file=sys.stderr)
            return 1
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"turngate: unexpected error: {type(exc).__name__}: {first} "
              "(TURNGATE_LOG_LEVEL=debug shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
