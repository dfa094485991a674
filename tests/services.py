"""Real PostgreSQL and Redis servers for tests, started on free ports and removed afterwards (pytest fixtures).

Registered in tests/conftest.py (``pytest_plugins``). Without the server binaries the tests that need them are
skipped with the apt-get line as reason, except under ``CI=true``, where a missing binary fails them
(scripts/test run as root installs them: scripts/debian-packages).

* `postgres_server` (session): a private cluster (initdb into a temp dir, fsync off) on 127.0.0.1;
  `postgres_url`: a fresh database per test, dropped afterwards.
* `redis_server` (session): ``redis-server`` without persistence; `redis_url`: a per-test database number,
  flushed before and after the test.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from testing.system import missing, reason

START_TIMEOUT_S = 30.0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres_bindir() -> Path | None:
    """The bin directory of the newest Debian PostgreSQL install, else the one holding `initdb` on PATH."""
    def version(d: str) -> tuple[int, ...]:
        m = re.search(r"/postgresql/([\d.]+)/bin$", d)
        return tuple(int(x) for x in m.group(1).split(".") if x) if m else ()

    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if all(Path(d, b).is_file() for b in ("initdb", "pg_ctl", "postgres")):
            return Path(d)
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl") and shutil.which("postgres"):
        return Path(initdb).parent
    return None


@dataclass
class PostgresServer:
    """A running throwaway cluster; superuser ``postgres``, trust authentication, TCP on 127.0.0.1."""

    bindir: Path
    base: Path
    port: int
    host: str = "127.0.0.1"
    as_user: list[str] = field(default_factory=list)  # runuser prefix when we are root

    @property
    def datadir(self) -> Path:
        return self.base / "data"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{dbname}"

    def pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([*self.as_user, str(self.bindir / "pg_ctl"), "-D", str(self.datadir), *args],
                              capture_output=True, text=True, check=check, timeout=START_TIMEOUT_S + 10)


def _start_postgres(bindir: Path) -> PostgresServer:
    base = Path(tempfile.mkdtemp(prefix="pytest-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: the cluster belongs to `postgres`
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(base)
            missing("PostgreSQL tests run as root need a 'postgres' user: " + reason("postgresql"))
        if not shutil.which("runuser"):
            shutil.rmtree(base)
            missing("PostgreSQL tests run as root need runuser (apt-get install -y util-linux)")
        os.chown(base, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    server = PostgresServer(bindir=bindir, base=base, port=0, as_user=as_user)
    try:
        subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(server.datadir), "-U", "postgres", "-A", "trust",
                        "-E", "UTF8", "--no-locale", "--no-sync"],
                       capture_output=True, text=True, check=True, timeout=120)
        for _ in range(3):  # another process may take the free port between choosing and binding it
            server.port = free_port()
            opts = (f"-p {server.port} -h {server.host} -k {base} -c fsync=off -c synchronous_commit=off "
                    "-c full_page_writes=off -c max_connections=100")
            started = server.pg_ctl("-l", str(base / "server.log"), "-w", "-t", str(int(START_TIMEOUT_S)),
                                    "-o", opts, "start", check=False)
            if started.returncode == 0:
                break
        else:
            log = (base / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"PostgreSQL did not start: {started.stderr.strip()}\n{log}")
        _wait_postgres(server)
        return server
    except BaseException:
        if (server.datadir / "postmaster.pid").exists():
            server.pg_ctl("stop", "-m", "immediate", check=False)
        shutil.rmtree(base, ignore_errors=True)
        raise


def _wait_postgres(server: PostgresServer) -> None:
    import psycopg

    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            psycopg.connect(server.url(), connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster for the whole session, stopped and deleted at the end."""
    bindir = _postgres_bindir()
    if bindir is None:
        missing(reason("postgresql"))
    server = _start_postgres(bindir)
    try:
        yield server
    finally:
        server.pg_ctl("stop", "-m", "fast", "-w", check=False)
        shutil.rmtree(server.base, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of a database created for this test (t_<random>), dropped after it."""
    import psycopg

    name = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(postgres_server.url(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield postgres_server.url(name)
    finally:
        with psycopg.connect(postgres_server.url(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@dataclass
class RedisServer:
    """A running throwaway redis-server (no persistence) on 127.0.0.1."""

    proc: subprocess.Popen
    port: int
    dir: Path
    host: str = "127.0.0.1"
    databases: int = 16
    _next_db: int = 0

    def url(self, db: int = 0) -> str:
        return f"redis://{self.host}:{self.port}/{db}"

    def take_db(self) -> int:
        """The next database number, round robin over all but 0 (left for ad-hoc use)."""
        self._next_db = self._next_db % (self.databases - 1) + 1
        return self._next_db


def _start_redis(binary: str) -> RedisServer:
    import redis

    workdir = Path(tempfile.mkdtemp(prefix="pytest-redis-"))
    for _ in range(3):  # another process may take the free port between choosing and binding it
        port = free_port()
        log = (workdir / "redis.log").open("wb")
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", str(workdir), "--databases", "16"],
                                stdout=log, stderr=subprocess.STDOUT)
        log.close()
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    if client.ping():
                        return RedisServer(proc=proc, port=port, dir=workdir)
                except redis.ConnectionError:
                    time.sleep(0.02)
        finally:
            client.close()
        proc.kill()
        proc.wait()
    output = (workdir / "redis.log").read_text(errors="replace")[-2000:]
    shutil.rmtree(workdir, ignore_errors=True)
    raise RuntimeError(f"redis-server did not start: {output}")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server for the whole session, stopped at the end."""
    binary = shutil.which("redis-server")
    if binary is None:
        missing(reason("redis-server"))
    server = _start_redis(binary)
    try:
        yield server
    finally:
        server.proc.terminate()
        try:
            server.proc.wait(10)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
        shutil.rmtree(server.dir, ignore_errors=True)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """The URL of a Redis database for this test, empty at the start and flushed at the end."""
    import redis

    url = redis_server.url(redis_server.take_db())
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()
