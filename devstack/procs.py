"""Run our own services as child processes (for `make run` and the tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from devstack.servers import port_in_use, wait_port

REPO = Path(__file__).resolve().parent.parent


def service_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "clients")])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@dataclass
class ServiceProcess:
    """One of our services (`python -m module args…`) with its log file."""

    name: str
    module: str
    args: list[str]
    env: dict[str, str]
    log_dir: Path
    port: int | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _log_start: int = field(default=0, repr=False)

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    def start(self, timeout: float = 30.0) -> ServiceProcess:
        """Launch and wait until the port (if any) accepts connections."""
        return self.launch().wait_listening(timeout)

    def launch(self) -> ServiceProcess:
        """Launch without waiting: several processes then start up side by side (see wait_listening)."""
        if self.port is not None and port_in_use(self.port):
            raise RuntimeError(f"cannot start {self.name}: 127.0.0.1:{self.port} is already in use")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self._log_start = log.tell()  # this run's first byte (the file is appended to across runs)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module, *self.args],
            env=service_env(self.env), stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            start_new_session=True,
        )
        return self

    def wait_listening(self, timeout: float = 30.0) -> ServiceProcess:
        if self.port is not None:
            try:
                wait_port(self.port, timeout)
            except TimeoutError:
                raise RuntimeError(f"{self.name} did not listen on {self.port}:\n{self.tail()}") from None
        return self

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def wait_logged(self, needle: str, timeout: float = 30.0) -> None:
        """Wait until this run of the process has logged `needle` (reading the log on from where this
        run began, so a chatty process cannot scroll the line out of view, as a tail could).
        RuntimeError when the process exits or `timeout` passes first."""
        pos = self._log_start
        seen = b""
        want = needle.encode()
        deadline = time.monotonic() + timeout
        while True:
            try:
                with open(self.log_path, "rb") as f:
                    f.seek(pos)
                    chunk = f.read()
            except FileNotFoundError:
                chunk = b""
            pos += len(chunk)
            seen = seen[-len(want):] + chunk
            if want in seen:
                return
            if not self.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not log {needle!r}:\n{self.tail()}")
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.proc is not None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (graceful drain), SIGKILL if it does not exit in time."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.reap(time.monotonic() + timeout)

    def reap(self, deadline: float) -> int | None:
        """Wait for the exit until `deadline` (SIGKILL after it); forget the process."""
        if self.proc is None:
            return None
        try:
            self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        rc = self.proc.returncode
        self.proc = None
        return rc

    def kill(self) -> None:
        """SIGKILL, no drain: what a crash looks like."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def stop_all(procs: list[ServiceProcess], timeout: float = 20.0) -> None:
    """SIGTERM every process at once, then wait for them under one deadline: their graceful drains
    overlap instead of adding up (SIGKILL for any still running at the deadline)."""
    for p in procs:
        if p.alive():
            p.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        p.reap(deadline)
