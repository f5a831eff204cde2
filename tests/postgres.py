"""A throwaway PostgreSQL server for the scale-out tests and benchmark.

:func:`start` runs ``initdb`` and ``pg_ctl`` from the installed PostgreSQL (Debian's
``/usr/lib/postgresql/<version>/bin`` or ``PATH``) on a temporary data folder,
listening on 127.0.0.1 and a free port, with trust authentication for one user and
one database; :meth:`PostgresServer.stop` stops it (``-m immediate``) and deletes the
folder. PostgreSQL refuses to run as root, so as root the server runs as the
``postgres`` OS user.

In pytest use :func:`server_or_skip`: where no server can be started it skips the
tests outside CI and fails them in CI (env ``CI`` set), so a broken CI setup is seen.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

USER = "autotune"
PASSWORD = "autotune"  # trust auth: accepted and ignored; present so the URL has the usual shape
DATABASE = "autotune"
OS_USER = "postgres"  # the server's OS user when the tests run as root


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server could be started here; the message says why."""


@dataclass
class PostgresServer:
    root: Path  # temp folder: data/, sockets/, server.log
    bin_dir: Path
    port: int
    prefix: list[str]  # runs a command as the server's OS user (empty when not root)

    @property
    def url(self) -> str:
        return self.url_for(DATABASE)

    def url_for(self, database: str) -> str:
        return f"postgresql+psycopg2://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A further empty database on this server; returns its URL."""
        _run(self.prefix + [str(self.bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                            "-U", USER, name], "createdb")
        return self.url_for(name)

    def stop(self) -> None:
        subprocess.run(self.prefix + [str(self.bin_dir / "pg_ctl"), "-D", str(self.root / "data"),
                                      "-m", "immediate", "-w", "stop"],
                       capture_output=True, text=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


def find_bin_dir() -> Path | None:
    """The folder holding initdb and pg_ctl: newest Debian version first, then PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], what: str, timeout: float = 120) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PostgresUnavailable(f"{what} did not run ({exc})") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise PostgresUnavailable(f"{what} failed (exit {proc.returncode}): {' | '.join(tail)}")


def start() -> PostgresServer:
    """Start a fresh server with user ``autotune`` and database ``autotune``; raise PostgresUnavailable."""
    bin_dir = find_bin_dir()
    if bin_dir is None or not (bin_dir / "pg_ctl").is_file():
        raise PostgresUnavailable("PostgreSQL is not installed (no initdb/pg_ctl; on Debian: apt-get install postgresql)")
    prefix: list[str] = []
    owner = None
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        try:
            owner = pwd.getpwnam(OS_USER)
        except KeyError as exc:
            raise PostgresUnavailable(f"running as root and there is no '{OS_USER}' OS user to run the server") from exc
        runuser = shutil.which("runuser") or shutil.which("setpriv")
        if runuser is None:
            raise PostgresUnavailable("running as root and neither runuser nor setpriv is available")
        prefix = ([runuser, "-u", OS_USER, "--"] if runuser.endswith("runuser") else
                  [runuser, f"--reuid={owner.pw_uid}", f"--regid={owner.pw_gid}", "--init-groups"])
    # /tmp itself, not pytest's tmp_path: pytest's folders are private to the current user.
    root = Path(tempfile.mkdtemp(prefix="autotune-pg-"))
    if owner is not None:
        os.chown(root, owner.pw_uid, owner.pw_gid)
    data, sockets, log = root / "data", root / "sockets", root / "server.log"
    server = None
    try:
        _run(prefix + ["mkdir", "-p", str(sockets)], "mkdir")
        _run(prefix + [str(bin_dir / "initdb"), "-D", str(data), "-U", USER, "--auth=trust", "-E", "UTF8",
                       "--locale=C", "--no-sync", "--no-instructions"], "initdb")
        port = free_port()
        options = f"-h 127.0.0.1 -p {port} -k {sockets} -F -c max_connections=200"
        _run(prefix + [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60",
                       "start"], "pg_ctl start")
        server = PostgresServer(root, bin_dir, port, prefix)
        server.create_database(DATABASE)
        return server
    except PostgresUnavailable as exc:
        log_tail = ""
        if log.is_file():
            log_tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
        if server is not None:
            server.stop()
        else:
            shutil.rmtree(root, ignore_errors=True)
        raise PostgresUnavailable(f"{exc}{' (server log: ' + log_tail + ')' if log_tail else ''}") from exc


def server_or_skip() -> PostgresServer:
    """:func:`start`, or skip (outside CI) / fail (in CI) the calling tests with the reason."""
    import pytest

    try:
        import psycopg2  # noqa: F401
    except ImportError:
        reason = "psycopg2 is not installed (pip install -e '.[test]' or pip install psycopg2-binary)"
    else:
        try:
            return start()
        except PostgresUnavailable as exc:
            reason = f"cannot start a PostgreSQL server: {exc}"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must provide PostgreSQL (see .ci/run)", pytrace=False)
    pytest.skip(f"{reason}; the scale-out tests need it", allow_module_level=False)


if __name__ == "__main__":  # manual check: start, print the URL, stop
    s = start()
    print(s.url)
    s.stop()
