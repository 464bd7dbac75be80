"""Throwaway PostgreSQL servers built from the machine's own server binaries, for the tests and for fault drills.

`TemporaryPostgres` owns one server's whole life: a fresh cluster in a temporary directory (initdb, trust auth), a
free TCP port on 127.0.0.1, one database, and the directory's removal on `stop()`. It is tuned to start fast and lose
its data on a crash (fsync off): never point it at data you want to keep. Production uses a real server through
`DATABASE_URL`; nothing here is used there.

PostgreSQL refuses to run as root, so when this process is root the cluster directory is handed to the `postgres`
user and every server command runs as that user.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from llmcf.errors import UserFacingError
from llmcf.infra import free_port

SERVER_USER = "postgres"
INSTALL_HINT = (
    "install the PostgreSQL server (`apt-get install postgresql-15`, which provides "
    "/usr/lib/postgresql/15/bin/initdb and pg_ctl) or set DATABASE_URL to an existing PostgreSQL server "
    "(postgresql+psycopg://user:password@host:5432/database)"
)

# Durability is pointless for a throwaway cluster and costs seconds per test run: these make writes memory-speed.
_FAST_THROWAWAY_CONFIG = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "32MB",
    "max_connections": "100",
    "log_min_messages": "warning",
}


T = TypeVar("T")


def _started(value: T | None) -> T:
    """What `start()` set, or a clear error when it has not run."""
    if value is None:
        raise RuntimeError("TemporaryPostgres has not been started")
    return value


def find_server_binaries() -> Path:
    """The directory holding initdb and pg_ctl: the newest /usr/lib/postgresql/*/bin, else whatever PATH offers."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda path: int(Path(path).parent.name) if Path(path).parent.name.isdigit() else 0,
        reverse=True,
    )
    for directory in candidates:
        if (Path(directory) / "initdb").is_file() and (Path(directory) / "pg_ctl").is_file():
            return Path(directory)
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl and Path(initdb).parent == Path(pg_ctl).parent:
        return Path(initdb).parent
    raise UserFacingError(f"no PostgreSQL server binaries (initdb, pg_ctl) on this machine: {INSTALL_HINT}")


class TemporaryPostgres:
    """One throwaway PostgreSQL server with one database, reachable at `url` once `start()` has returned.

    Lifecycle: `start()` creates the cluster and the database and blocks until the server accepts connections;
    `restart()` stops and starts the same cluster on the same port (data kept, open connections broken: what a
    fault test wants); `stop()` shuts the server down (fast mode: sessions are disconnected, not awaited) and removes
    the directory. `stop()` is also registered at interpreter exit, so a crashed test run leaves no server behind.
    Use it as a context manager for the common case.
    """

    def __init__(self, database: str = "llmcf", *, bin_dir: Path | None = None, parent_dir: Path | None = None):
        self.database = database
        self._bin_dir = bin_dir
        self._parent_dir = parent_dir
        self._root: Path | None = None
        self._port: int | None = None
        self._running = False

    @property
    def port(self) -> int:
        return _started(self._port)

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the database (trust auth: no password)."""
        return f"postgresql+psycopg://{SERVER_USER}@127.0.0.1:{self.port}/{self.database}"

    @property
    def data_dir(self) -> Path:
        return _started(self._root) / "data"

    @property
    def server_binaries(self) -> Path:
        """The directory of initdb and pg_ctl that `start()` chose."""
        return _started(self._bin_dir)

    @property
    def log_file(self) -> Path:
        return self.data_dir.parent / "server.log"

    def start(self) -> "TemporaryPostgres":
        """Create the cluster, start the server and create the database; on failure nothing is left behind."""
        if self._running:
            return self
        bin_dir = self._bin_dir or find_server_binaries()
        self._bin_dir = bin_dir
        as_root = os.geteuid() == 0
        if as_root:
            self._check_server_user()
        self._root = Path(tempfile.mkdtemp(prefix="llmcf-pg-", dir=self._parent_dir))
        try:
            if as_root:
                user = pwd.getpwnam(SERVER_USER)
                os.chown(self._root, user.pw_uid, user.pw_gid)
            self._run(
                str(bin_dir / "initdb"), "-D", str(self.data_dir), "-U", SERVER_USER, "-A", "trust",
                "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions",
            )
            with (self.data_dir / "postgresql.conf").open("a") as conf:
                conf.write("\n# llmcf throwaway server\n")
                conf.write("listen_addresses = '127.0.0.1'\n")
                conf.write(f"unix_socket_directories = '{self._root}'\n")
                for name, value in _FAST_THROWAWAY_CONFIG.items():
                    conf.write(f"{name} = '{value}'\n")
            self._port = free_port()
            self._start_server()
            atexit.register(self.stop)
            self._create_database()
        except BaseException:
            self.stop()
            raise
        return self

    def restart(self, downtime_s: float = 0.0) -> None:
        """Stop the server (fast mode), stay down `downtime_s` seconds (an outage clients must ride out, not just a
        blip), and start it again on the same data directory and port."""
        if not self._running:
            raise RuntimeError("TemporaryPostgres is not running")
        self._stop_server()
        time.sleep(downtime_s)
        self._start_server()

    def stop(self) -> None:
        """Shut the server down and remove its directory; safe to call twice or after a failed start."""
        atexit.unregister(self.stop)
        try:
            if self._running:
                self._stop_server()
        finally:
            if self._root is not None:
                shutil.rmtree(self._root, ignore_errors=True)
                self._root = None

    def __enter__(self) -> "TemporaryPostgres":
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _start_server(self) -> None:
        # pg_ctl -w returns once the server accepts connections (or fails), so no polling is needed here.
        self._run(
            str(self.server_binaries / "pg_ctl"), "start", "-D", str(self.data_dir), "-l", str(self.log_file),
            "-o", f"-p {self.port}", "-w", "-t", "60",
        )
        self._running = True

    def _stop_server(self) -> None:
        self._run(str(self.server_binaries / "pg_ctl"), "stop", "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "60")
        self._running = False

    def _create_database(self) -> None:
        import psycopg
        from psycopg import sql

        # pg_ctl -w has already waited for the server to accept connections.
        admin = psycopg.connect(host="127.0.0.1", port=self.port, user=SERVER_USER, dbname="postgres", autocommit=True)
        with admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.database)))

    def _check_server_user(self) -> None:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            raise UserFacingError(
                f"running as root, but there is no `{SERVER_USER}` user to run PostgreSQL as (it refuses to run as "
                f"root): {INSTALL_HINT}"
            ) from None

    def _run(self, *command: str) -> None:
        """Run a server command, as the `postgres` user when we are root; a failure carries the server's log."""
        program = Path(command[0]).name
        if os.geteuid() == 0:
            if shutil.which("runuser"):
                command = ("runuser", "-u", SERVER_USER, "--", *command)
            else:
                command = ("su", SERVER_USER, "-s", "/bin/sh", "-c", shlex.join(command))
        result = subprocess.run(command, capture_output=True, text=True, cwd=self._root)
        if result.returncode != 0:
            log = ""
            if self._root is not None and self.log_file.exists():
                log = "\nserver log (last lines):\n" + "\n".join(self.log_file.read_text().splitlines()[-20:])
            output = result.stderr.strip() or result.stdout.strip()
            raise UserFacingError(f"PostgreSQL {program} failed (exit {result.returncode}): {output}{log}")
