"""Start-up failures of ``turngate serve`` / ``migrate`` / ``keys``: one line on stderr
naming the cause and what to do, exit status 1 or 2, no traceback (unless
TURNGATE_LOG_LEVEL=debug). Every fault is produced for real on loopback: a closed
port, a role and a database that do not exist on the test PostgreSQL, a SQLite
path under a regular file (the suite runs as root, so permissions would not stop
it), a port something already listens on."""

from __future__ import annotations

import json
import os
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from gateway.ops.settings import SETTINGS
from tests.fixtures_db import PG_HOST, PG_PORT, PG_USER, pg_url_for
from tests.fixtures_server import free_port

pytestmark = pytest.mark.anyio

TURNGATE = str(Path(sys.executable).parent / "turngate")
COMMANDS = [["migrate"], ["keys", "create", "bob"], ["serve", "--port", "0"]]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any turngate setting (a .env in cwd is not read: cwd
    is a fresh tmp_path)."""
    names = {s.env for s in SETTINGS}
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TURNGATE_") and k not in names}
    env.update(extra)
    return env


async def turngate(args: list[str], cwd: Path, timeout: float = 30, **env: str
                   ) -> tuple[int, str, str]:
    with anyio.fail_after(timeout):
        result = await anyio.run_process([TURNGATE, *args], cwd=cwd, env=clean_env(**env),
                                         check=False)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def one_line(stderr: str, *, must_name: list[str]) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    line = lines[0]
    assert line.startswith("turngate: "), line
    for word in must_name:
        assert word in line, f"{word!r} not named in {line!r}"
    assert "Traceback" not in stderr and "Event loop is closed" not in stderr, stderr
    return line


@pytest.fixture
def closed_port() -> int:
    return free_port()


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
async def test_postgresql_unreachable(command: list[str], tmp_path: Path,
                                      closed_port: int) -> None:
    url = pg_url_for("turngate", host="127.0.0.1", port=closed_port)
    code, out, err = await turngate(command, tmp_path, DATABASE_URL=url)
    assert code == 1, (code, err)
    one_line(err, must_name=[f"127.0.0.1:{closed_port}", "DATABASE_URL", "cannot reach"])
    assert out == ""


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
async def test_postgresql_role_missing(command: list[str], tmp_path: Path) -> None:
    role = f"no_role_{uuid.uuid4().hex[:8]}"
    url = f"postgresql://{role}:s3cretpw@{PG_HOST}:{PG_PORT}/turngate"
    code, _, err = await turngate(command, tmp_path, DATABASE_URL=url)
    assert code == 1, (code, err)
    line = one_line(err, must_name=[role, "DATABASE_URL", "role"])
    assert "s3cretpw" not in line


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
async def test_postgresql_database_missing(command: list[str], tmp_path: Path) -> None:
    name = f"no_db_{uuid.uuid4().hex[:8]}"
    url = f"postgresql://{PG_USER}:s3cretpw@{PG_HOST}:{PG_PORT}/{name}"
    code, _, err = await turngate(command, tmp_path, DATABASE_URL=url)
    assert code == 1, (code, err)
    line = one_line(err, must_name=[name, "does not exist", "DATABASE_URL"])
    assert "s3cretpw" not in line


@pytest.mark.parametrize("command", [["migrate"], ["keys", "create", "bob", "--create-db"],
                                     ["serve", "--port", "0"]], ids=lambda c: c[0])
async def test_sqlite_path_not_writable(command: list[str], tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("a regular file, so nothing can be created under it\n")
    db = afile / "sub" / "db.sqlite"
    code, _, err = await turngate(command, tmp_path, DATABASE_URL=f"sqlite:///{db}")
    assert code == 1, (code, err)
    one_line(err, must_name=[str(db), "DATABASE_URL"])
    assert afile.read_text().startswith("a regular file")


async def test_debug_level_shows_the_traceback(tmp_path: Path, closed_port: int) -> None:
    url = pg_url_for("turngate", host="127.0.0.1", port=closed_port)
    code, _, err = await turngate(["migrate"], tmp_path, DATABASE_URL=url,
                                  TURNGATE_LOG_LEVEL="debug")
    assert code == 1
    assert "Traceback" in err, err
    assert err.strip().splitlines()[-1].startswith("turngate: cannot migrate"), err


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_busy_port_stops_serve_before_the_database(
    kind: str, tmp_path: Path, busy_port: int
) -> None:
    db = tmp_path / "never.db"
    if kind == "sqlite":
        url = f"sqlite:///{db}"
    else:  # an empty database would be refused as unmigrated: the port must come first
        url = pg_url_for("turngate", host="127.0.0.1", port=free_port())
    code, out, err = await turngate(["serve", "--port", str(busy_port)], tmp_path,
                                    DATABASE_URL=url)
    assert code == 1, (code, err)
    one_line(err, must_name=[f"127.0.0.1:{busy_port}", "in use", "--port"])
    assert not db.exists(), "serve on a busy port created (migrated) the SQLite file"
    assert "Application startup complete" not in err + out
    assert "schema migrated" not in err


async def test_bad_port_is_a_usage_error(tmp_path: Path) -> None:
    code, _, err = await turngate(["serve", "--port", "70000"], tmp_path)
    assert code == 2
    assert "70000" in err and "0..65535" in err, err
    assert not (tmp_path / "turngate.db").exists()


async def test_bad_mcp_users_stop_serve_with_the_value(tmp_path: Path) -> None:
    config = json.dumps({"mcpServers": {"team": {"command": "a", "users": "alice"}}})
    code, _, err = await turngate(["serve", "--port", "0"], tmp_path,
                                  TURNGATE_MCP_CONFIG=config)
    assert code != 0
    line = one_line(err, must_name=["TURNGATE_MCP_CONFIG", "'team'", '"users" is "alice"',
                                    "list of user names"])
    assert "e.g. [\"alice\", \"bob\"]" in line


async def test_serve_help_shows_defaults_and_meaning(tmp_path: Path) -> None:
    code, out, _ = await turngate(["serve", "--help"], tmp_path)
    assert code == 0
    flat = " ".join(out.split())
    assert "--host HOST address to listen on" in flat, out
    assert "(default: 127.0.0.1)" in flat, out
    assert "--port PORT TCP port to listen on" in flat, out
    assert "(default: 8000)" in flat, out


# -- which database ------------------------------------------------------------------


async def test_keys_create_refuses_a_new_sqlite_file(tmp_path: Path) -> None:
    code, out, err = await turngate(["keys", "create", "bob"], tmp_path)
    assert code == 2, (code, err)
    one_line(err, must_name=[str(tmp_path / "turngate.db"), "--create-db", "DATABASE_URL"])
    assert out == ""
    assert not (tmp_path / "turngate.db").exists()

    code, out, err = await turngate(["keys", "create", "bob", "--create-db"], tmp_path)
    assert code == 0, err
    assert out.startswith("tg_") and len(out.splitlines()) == 1, out
    assert f"created SQLite file {tmp_path / 'turngate.db'}" in err, err
    assert (tmp_path / "turngate.db").exists()

    # The file exists now: no flag needed, and the database is named.
    code, out, err = await turngate(["keys", "create", "carol"], tmp_path)
    assert code == 0, err
    assert f"in SQLite file {tmp_path / 'turngate.db'}" in err, err
    assert "created SQLite" not in err


async def test_keys_revoke_does_not_create_a_file(tmp_path: Path) -> None:
    code, _, err = await turngate(["keys", "revoke", "AbCd1234"], tmp_path)
    assert code == 2, err
    one_line(err, must_name=[str(tmp_path / "turngate.db")])
    assert not (tmp_path / "turngate.db").exists()


async def test_migrate_names_the_database(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    code, _, err = await turngate(["migrate"], tmp_path, DATABASE_URL=f"sqlite:///{db}")
    assert code == 0, err
    assert f"created SQLite file {db}" in err, err
    code, _, err = await turngate(["migrate"], tmp_path, DATABASE_URL=f"sqlite:///{db}")
    assert code == 0, err
    assert f"schema of SQLite file {db} is current" in err, err


async def test_keys_create_on_unmigrated_postgresql_says_migrate(tmp_path: Path,
                                                                  pg_url: str) -> None:
    # The session database is migrated; an empty one is made for this test.
    import asyncpg

    name = f"turngate_empty_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(pg_url, timeout=10)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        url = f"postgresql://{PG_USER}:s3cretpw@{PG_HOST}:{PG_PORT}/{name}"
        code, out, err = await turngate(["keys", "create", "bob"], tmp_path, DATABASE_URL=url)
        assert code == 1, err
        line = one_line(err, must_name=["turngate migrate", f"/{name}"])
        assert "s3cretpw" not in line and out == ""
        code, _, err = await turngate(["migrate"], tmp_path, DATABASE_URL=url)
        assert code == 0, err
        assert f"postgresql://{PG_USER}:***@{PG_HOST}:{PG_PORT}/{name}" in err, err
        assert "s3cretpw" not in err
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


async def test_serve_logs_its_database_and_one_migration(tmp_path: Path) -> None:
    """A first start on a new SQLite file: the file is named, the migration logged once."""
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = await anyio.open_process([TURNGATE, "serve", "--port", str(port)], cwd=tmp_path,
                                        env=clean_env(), stdout=out, stderr=out)
    try:
        async with httpx.AsyncClient() as client:
            with anyio.fail_after(20):
                while True:
                    assert proc.returncode is None, log.read_text()
                    try:
                        if (await client.get(f"http://127.0.0.1:{port}/healthz")).is_success:
                            break
                    except httpx.TransportError:
                        await anyio.sleep(0.05)
    finally:
        proc.terminate()
        with anyio.fail_after(20):
            await proc.wait()
    text = log.read_text()
    assert text.count("schema migrated to") == 1, text
    assert text.count(f"database: SQLite file {tmp_path / 'turngate.db'} (created)") == 1, text
    assert f"listening on http://127.0.0.1:{port}" in text, text
    assert f"http://127.0.0.1:{port}/#key=tg_" in text, text
