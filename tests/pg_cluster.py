"""A throwaway PostgreSQL cluster for the tests: ``initdb`` into a temporary directory,
``pg_ctl start`` on a free port of 127.0.0.1 (fsync on, as in production), one migrated
template database, and a fresh database per test copied from it.

PostgreSQL refuses to run as root: as root the cluster runs as the ``postgres`` user
(``runuser``), in a directory that user owns. Without the binaries the tests that need a
cluster skip, saying why (``scripts/bootstrap.sh test`` installs Debian's ``postgresql``).
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

BIN_DIRS = ("/usr/local/bin", *sorted(map(str, Path("/usr/lib/postgresql").glob("*/bin")), reverse=True))
TEMPLATE = "spoolq_template"


def find_bin_dir() -> Path | None:
    """A directory holding both ``initdb`` and ``pg_ctl`` (PATH first, then Debian's)."""
    on_path = shutil.which("initdb")
    dirs = ([str(Path(on_path).resolve().parent)] if on_path else []) + list(BIN_DIRS)
    for d in dirs:
        if (Path(d) / "initdb").exists() and (Path(d) / "pg_ctl").exists():
            return Path(d)
    return None


def unavailable_reason() -> str | None:
    """Why no cluster can be started here, or None when one can."""
    if find_bin_dir() is None:
        return "PostgreSQL is not installed (no initdb/pg_ctl; scripts/bootstrap.sh test installs it)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres user to run the cluster as"
        if shutil.which("runuser") is None:
            return "running as root without runuser to start the cluster as postgres"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgCluster:
    """One running cluster; :meth:`new_database` hands out fresh migrated databases."""

    def __init__(self) -> None:
        bin_dir = find_bin_dir()
        assert bin_dir is not None, unavailable_reason()
        self.bin = bin_dir
        self.dir = Path(tempfile.mkdtemp(prefix="spoolq-pg-"))
        self.data = self.dir / "data"
        self.port = 0
        self._names = itertools.count(1)
        self._free: list[str] = []  # emptied migrated databases, ready for the next test
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self._as_user = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str) -> None:
        r = subprocess.run([*self._as_user, *args], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}): {r.stdout}{r.stderr}")

    def start(self) -> None:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "--auth=trust", "-U", "postgres",
                  "--encoding=UTF8", "--no-sync")
        for attempt in range(5):  # another process may take the port between the check and the start
            self.port = free_port()
            opts = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.dir} "
                    "-c fsync=on -c max_connections=200")
            try:
                self._run(str(self.bin / "pg_ctl"), "start", "-w", "-t", "60", "-D", str(self.data),
                          "-l", str(self.dir / "log"), "-o", opts)
                break
            except RuntimeError:
                if attempt == 4:
                    raise
        self._make_template()

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(sql)  # fixed test identifiers only

    def _make_template(self) -> None:
        from spoolq.store.pg.migrate import migrate

        self._admin(f"CREATE DATABASE {TEMPLATE}")
        migrate(self.url(TEMPLATE))

    def new_database(self, *, migrated: bool = True) -> str:
        """The URL of an empty database: migrated (a recycled one when there is one, else a
        copy of the template), or bare."""
        if migrated and self._free:
            return self._free.pop()
        name = f"t_{os.getpid()}_{next(self._names)}"
        self._admin(f"CREATE DATABASE {name}" + (f" TEMPLATE {TEMPLATE}" if migrated else ""))
        return self.url(name)

    def recycle(self, url: str) -> None:
        """Empty a migrated database for the next test: end its sessions (their locks go with
        them), empty every spoolq table, restart the sequences. Much faster than copying the
        template again, which writes the whole database through the WAL."""
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = current_database() AND pid <> pg_backend_pid()")
            tables = [r[0] for r in conn.execute(
                "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables "
                "WHERE schemaname = 'spoolq' AND tablename <> 'schema_migrations'")]
            with conn.transaction():  # DELETE, not TRUNCATE: new files for every table cost more
                for table in tables:
                    conn.execute(f"DELETE FROM {table}")
                conn.execute("ALTER SEQUENCE spoolq.msg_seq RESTART")
                conn.execute("ALTER SEQUENCE spoolq.hosts_id_seq RESTART")
        self._free.append(url)

    def stop(self) -> None:
        try:
            self._run(str(self.bin / "pg_ctl"), "stop", "-m", "immediate", "-D", str(self.data))
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
