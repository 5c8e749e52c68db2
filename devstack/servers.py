"""Start private PostgreSQL clusters and redis-server processes on loopback.

PostgreSQL refuses to run as root, so when we are root the cluster is owned by
and run as the `postgres` system user (CI runs as root).
"""

from __future__ import annotations

import itertools
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))


def _port_range() -> tuple[int, int] | None:
    """WHAGO_PORT_RANGE=LOW-HIGH: where free_port looks (inclusive), or None for the kernel's pick."""
    raw = os.environ.get("WHAGO_PORT_RANGE", "").strip()
    if not raw:
        return None
    low, _, high = raw.partition("-")
    return int(low), int(high)


_next_in_range = itertools.count(secrets.randbelow(10_000))


def free_port() -> int:
    """A free TCP port on 127.0.0.1, bound later by a server (racy by nature).

    The kernel's pick comes from its ephemeral range, where any outgoing connection may take it as
    its source port before the server binds it. With WHAGO_PORT_RANGE (the test suite sets one per
    xdist worker, below the ephemeral range) ports come from that span, each once per process."""
    span = _port_range()
    if span is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    low, high = span
    size = high - low + 1
    for _ in range(size):
        port = low + next(_next_in_range) % size
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in WHAGO_PORT_RANGE {low}-{high}")


def wait_port(port: int, timeout: float = 30.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.3):
            return True
    except OSError:
        return False


def _check_free(port: int, what: str, hint: str) -> None:
    """Refuse to start on a taken port: a readiness probe would otherwise talk to someone else's server."""
    if port_in_use(port):
        raise RuntimeError(f"cannot start {what}: 127.0.0.1:{port} is already in use ({hint})")


def _as_pg_user() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


@dataclass
class Postgres:
    """A private PostgreSQL cluster in `root` listening on 127.0.0.1:port."""

    root: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, db: str = "whago") -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{db}"

    def start(self, fast_unsafe: bool = False) -> None:
        """initdb if needed, then run postgres in the foreground of a child process."""
        _check_free(self.port, "PostgreSQL", "set WHAGO_PG_PORT, or DATABASE_URL to use that server")
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            pg = pwd.getpwnam("postgres")
            for p in (self.root, *self.root.rglob("*")):
                os.chown(p, pg.pw_uid, pg.pw_gid)
            # The postgres user must be able to reach the directory.
            for parent in self.root.resolve().parents:
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    os.chmod(parent, mode | 0o001)
        if not (self.data / "PG_VERSION").exists():
            subprocess.run(
                [*_as_pg_user(), str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres",
                 "--auth=trust", "--encoding=UTF8", "--locale=C.UTF-8"],
                check=True, stdout=subprocess.DEVNULL,
            )
        opts = ["-c", f"port={self.port}", "-c", "listen_addresses=127.0.0.1",
                "-c", f"unix_socket_directories={self.root}", "-c", "max_connections=300",
                "-c", "shared_buffers=256MB", "-c", "work_mem=32MB",
                "-c", "maintenance_work_mem=256MB"]
        if fast_unsafe:
            opts += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        log = open(self.root / "postgres.log", "ab")
        self.proc = subprocess.Popen(
            [*_as_pg_user(), str(PG_BIN / "postgres"), "-D", str(self.data), *opts],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self._wait_ready()

    def _last_fatal(self) -> str:
        """The last FATAL line of the server log (e.g. the port is taken), for the error message."""
        try:
            lines = (self.root / "postgres.log").read_text(errors="replace").splitlines()
        except OSError:
            return "no log"
        fatal = [ln.split("FATAL:", 1)[1].strip() for ln in lines[-50:] if "FATAL:" in ln]
        return fatal[-1] if fatal else "see its log"

    def _wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"postgres on port {self.port} exited: {self._last_fatal()} "
                                   f"(see {self.root / 'postgres.log'})")
            r = subprocess.run([str(PG_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                               capture_output=True)
            if r.returncode == 0:
                return
            time.sleep(0.1)
        raise TimeoutError("postgres did not become ready")

    def create_database(self, name: str) -> None:
        subprocess.run(
            [*_as_pg_user(), str(PG_BIN.parent / "bin" / "psql"), "-h", "127.0.0.1", "-p", str(self.port),
             "-U", "postgres", "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-qc", f'CREATE DATABASE "{name}"'],
            check=False, capture_output=True,
        )

    def stop_fast(self) -> None:
        """Fast shutdown (pg_ctl -m fast): clients are disconnected at once, as when a database
        server goes down under load. stop()'s smart shutdown would wait for every pooled client."""
        if self.proc is not None and self.proc.poll() is None:
            subprocess.run([*_as_pg_user(), str(PG_BIN / "pg_ctl"), "stop", "-D", str(self.data), "-m", "fast",
                            "-w", "-t", "30"], check=False, capture_output=True)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: smart shutdown
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None


@dataclass
class Redis:
    """A private redis-server on 127.0.0.1:port, data kept in `root` (appendonly). With
    `persist=False` nothing is written to disk: a restart comes back empty (a cache-style Redis)."""

    root: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None
    persist: bool = True

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed: apt-get install -y redis-server")
        _check_free(self.port, "redis-server", "set WHAGO_REDIS_PORT, or REDIS_URL to use that server")
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "redis.log", "ab")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.root),
             "--save", "", "--appendonly", "yes" if self.persist else "no", "--appendfsync", "no", "--daemonize", "no",
             "--protected-mode", "yes"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None

    def restart(self) -> None:
        """Stop and start again on the same port, keeping data (append-only file) if `persist`."""
        self.stop()
        self.start()
