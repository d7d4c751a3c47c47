"""A team's tracking server, as docs/deployment.md's "A shared server" section sets it up: PostgreSQL for
the runs and the users, `mlflow server --app-name basic-auth` in front of it, a proxied artifact store, all
on loopback.

Debian's PostgreSQL refuses to run as root (CI runs as root), so under root initdb and the postmaster run
as the `postgres` user, in a temp folder it owns; the postmaster is stopped by its PID.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import free_port, mlflow_server

ADMIN = ("admin", "admin-password-for-tests")  # the auth app refuses passwords under 12 characters
DB_ROLE = ("mlflow", "mlflow-db-password")


def postgres_bin() -> Path | None:
    """The newest Debian PostgreSQL's bin folder (`apt-get install postgresql`), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


@dataclass
class Postgres:
    port: int
    superuser: tuple[str, str]

    def uri(self, database: str, role: tuple[str, str] = DB_ROLE) -> str:
        """For SQLAlchemy and psycopg2; SQLAlchemy 2.1's default driver for `postgresql://` is psycopg 3."""
        return f"postgresql+psycopg2://{role[0]}:{role[1]}@127.0.0.1:{self.port}/{database}"

    def dsn(self, database: str, role: tuple[str, str]) -> str:
        return f"host=127.0.0.1 port={self.port} dbname={database} user={role[0]} password={role[1]}"

    def execute(self, *statements: str) -> None:
        import psycopg2

        conn = psycopg2.connect(self.dsn("postgres", self.superuser))
        conn.autocommit = True  # CREATE DATABASE cannot run in a transaction (nor in `with conn`)
        try:
            with conn.cursor() as cur:
                for statement in statements:
                    cur.execute(statement)
        finally:
            conn.close()


@contextmanager
def postgres(bin_dir: Path) -> Iterator[Postgres]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (password logins only), deleted afterwards."""
    import psycopg2

    as_root = os.geteuid() == 0
    owner = {"user": "postgres", "group": "postgres"} if as_root else {}
    # not under pytest's tmp folder: /tmp/pytest-of-root is 0700, out of the postgres user's reach
    folder = Path(tempfile.mkdtemp(prefix="xlsub-postgres-"))
    superuser = ("postgres", "superuser-password")
    try:
        (folder / "pwfile").write_text(superuser[1] + "\n")
        if as_root:
            shutil.chown(folder, "postgres", "postgres")
            shutil.chown(folder / "pwfile", "postgres", "postgres")
        subprocess.run([str(bin_dir / "initdb"), "-D", str(folder / "data"), "-U", superuser[0], f"--pwfile={folder / 'pwfile'}",
                        "--auth=scram-sha-256", "--no-locale", "--encoding=UTF8", "--no-sync"],
                       cwd=folder, check=True, capture_output=True, text=True, **owner)
        port = free_port()
        log = open(folder / "postgres.log", "w")
        # a test database: durability off (faster commits); the socket in the folder, TCP on loopback only
        proc = subprocess.Popen([str(bin_dir / "postgres"), "-D", str(folder / "data"), "-k", str(folder), "-p", str(port),
                                 "-h", "127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
                                cwd=folder, stdout=log, stderr=subprocess.STDOUT, **owner)
        try:
            server = Postgres(port, superuser)
            deadline = time.time() + 60
            while True:
                try:
                    psycopg2.connect(server.dsn("postgres", superuser), connect_timeout=2).close()
                    break
                except psycopg2.OperationalError:
                    if proc.poll() is not None or time.time() > deadline:
                        raise RuntimeError(f"postgres did not start: {(folder / 'postgres.log').read_text()[-2000:]}")
                    time.sleep(0.2)
            yield server
        finally:
            proc.send_signal(signal.SIGINT)  # the postmaster, by its PID: fast shutdown
            proc.wait(timeout=60)
            log.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class TeamServer:
    url: str
    admin: tuple[str, str]
    log: Path


@contextmanager
def auth_server(pg: Postgres, folder: Path) -> Iterator[TeamServer]:
    """`mlflow server --app-name basic-auth` on loopback: runs and users in PostgreSQL (one database each),
    artifacts proxied into `folder`, the admin user from an auth ini."""
    pg.execute(f"CREATE ROLE {DB_ROLE[0]} LOGIN PASSWORD '{DB_ROLE[1]}'", f"CREATE DATABASE mlflow OWNER {DB_ROLE[0]}",
               f"CREATE DATABASE mlflow_auth OWNER {DB_ROLE[0]}")
    ini = folder / "basic_auth.ini"
    # the credential cache: without it every request pays the password hash check (0.6-0.9 s per request on the
    # 2 shared CI cores, against 0.04 s with it), which multiplies the pipeline's run time
    ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = {pg.uri('mlflow_auth')}\n"
                   f"admin_username = {ADMIN[0]}\nadmin_password = {ADMIN[1]}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                   "auth_cache_ttl_seconds = 60\n")
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": "xlsub-tests-secret"}
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(name, None)
    with mlflow_server(folder, pg.uri("mlflow"), "--app-name", "basic-auth", env=env, wait=120) as url:
        yield TeamServer(url, ADMIN, folder / "server.log")
