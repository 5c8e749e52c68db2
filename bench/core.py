"""Result rows, the per-run context, and measurement helpers shared by the figures."""

from __future__ import annotations

import math
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.api import Api
from bench.stack import Stack, read_status_kb


@dataclass
class Result:
    """One row of the table. `ratio` is always ours/baseline; `ratio_kind` says of what."""

    figure: str
    title: str
    unit: str
    target: str
    value: float | None = None
    baseline: float | None = None
    ratio: float | None = None
    ratio_kind: str = ""
    met: bool | None = None
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


class Ctx:
    """What a figure gets: the stack, the scale, and a place to put its rows."""

    def __init__(self, stack: Stack, scale: float) -> None:
        self.stack = stack
        self.scale = scale
        self.rows: list[Result] = []
        self.figure = ""

    def n(self, full: int, minimum: int = 1) -> int:
        """A size of the issue's table, shrunk by BENCH_SCALE."""
        return max(minimum, round(full * self.scale))

    def row(self, key: str, title: str, unit: str, target: str) -> Result:
        r = Result(figure=f"{self.figure}.{key}" if key else self.figure, title=title, unit=unit, target=target)
        self.rows.append(r)
        return r

    def api(self) -> Api:
        """Our services up, and a fresh user (tenancy keeps figures apart)."""
        self.stack.ensure_services()
        return Api(self.stack.channel, self.stack.create_user())


def time_ratio(r: Result, ours: float, base: float, limit: float) -> None:
    """Fill a 'time, lower is better' row: ratio = ours / baseline, met when ratio <= limit."""
    r.value, r.baseline = ours, base
    r.ratio = ours / base if base > 0 else math.inf
    r.ratio_kind = "time ours/baseline"
    r.met = r.ratio <= limit


def rate_ratio(r: Result, ours: float, base: float, limit: float) -> None:
    """Fill a 'rate, higher is better' row: ratio = ours / baseline, met when ratio >= limit."""
    r.value, r.baseline = ours, base
    r.ratio = ours / base if base > 0 else 0.0
    r.ratio_kind = "rate ours/baseline"
    r.met = r.ratio >= limit


def pct(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); NaN for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


class RssSampler:
    """Samples VmRSS of a pid in a thread (peak in kB), bounded by `max_seconds`."""

    def __init__(self, pid: int, period: float = 0.1, max_seconds: float = 1800.0) -> None:
        self.pid, self.period, self.max_seconds = pid, period, max_seconds
        self.peak_kb = 0
        self.samples = 0
        self.max_threads = 0
        self.max_fds = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self.peak_kb = max(self.peak_kb, read_status_kb(self.pid, "VmRSS"))
                self.max_threads = max(self.max_threads, read_status_kb(self.pid, "Threads"))
                self.max_fds = max(self.max_fds, len(os.listdir(f"/proc/{self.pid}/fd")))
                self.samples += 1
            except (OSError, KeyError):
                return
            self._stop.wait(self.period)

    def __enter__(self) -> RssSampler:
        self._t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._t.join(timeout=5)


# -- PostgreSQL profile pointers (pg_stat_statements + auto_explain in the server log) ------------

def pg_enable_profiling(stack: Stack) -> bool:
    """Preload pg_stat_statements and auto_explain (plans of statements slower than 200 ms go to
    the server log); restarts the private PostgreSQL once. False when not possible."""
    try:
        with stack.db(autocommit=True) as conn, conn.cursor() as cur:
            cur.execute("ALTER SYSTEM SET shared_preload_libraries = pg_stat_statements, auto_explain")
        stack.pg.stop()
        stack.pg.start(fast_unsafe=False)
        with stack.db(autocommit=True) as conn, conn.cursor() as cur:
            cur.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            cur.execute("ALTER SYSTEM SET auto_explain.log_min_duration = '200ms'")
            cur.execute("ALTER SYSTEM SET auto_explain.log_analyze = off")
            cur.execute("ALTER SYSTEM SET auto_explain.log_nested_statements = on")
            cur.execute("ALTER SYSTEM SET log_min_duration_statement = '200ms'")
            cur.execute("SELECT pg_reload_conf()")
        return True
    except Exception:
        if stack.pg.proc is None:
            stack.pg.start(fast_unsafe=False)
        return False


def pg_stats_reset(stack: Stack) -> None:
    try:
        stack.sql("SELECT pg_stat_statements_reset()")
    except Exception:
        pass


def pg_top(stack: Stack, limit: int = 5) -> list[dict[str, Any]]:
    """The statements that took the most time since the last reset (pg_stat_statements)."""
    try:
        rows = stack.sql(
            "SELECT regexp_replace(query, '\\s+', ' ', 'g'), calls, round(total_exec_time::numeric, 1), "
            "round(mean_exec_time::numeric, 2) FROM pg_stat_statements "
            "WHERE query NOT ILIKE '%%pg_stat_statements%%' ORDER BY total_exec_time DESC LIMIT %s", (limit,))
    except Exception:
        return []
    return [{"query": str(q)[:300], "calls": int(c), "total_ms": float(t), "mean_ms": float(m)}
            for q, c, t, m in rows]


class PgLog:
    """Reads what the PostgreSQL server log gained since `mark()` (auto_explain plans, slow statements)."""

    def __init__(self, stack: Stack) -> None:
        self.path = stack.pg.root / "postgres.log"
        self.offset = 0

    def mark(self) -> None:
        self.offset = os.path.getsize(self.path) if self.path.exists() else 0

    def slow(self, limit: int = 3, chars: int = 1500) -> list[str]:
        """The slowest logged statements/plans since mark(), longest duration first."""
        if not self.path.exists():
            return []
        with open(self.path, errors="replace") as f:
            f.seek(self.offset)
            text = f.read(20_000_000)
        entries = re.split(r"\n(?=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", text)
        found: list[tuple[float, str]] = []
        for e in entries:
            m = re.search(r"duration: ([\d.]+) ms", e)
            if m:
                found.append((float(m.group(1)), e.strip()[:chars]))
        found.sort(key=lambda x: -x[0])
        return [e for _, e in found[:limit]]


# -- optional py-spy sampling of a service during a measured window (BENCH_PYSPY=1) ----------------

def pyspy_path() -> str | None:
    """py-spy, when installed (an investigation tool only, never a dependency) and BENCH_PYSPY=1."""
    if os.environ.get("BENCH_PYSPY", "") not in ("1", "true", "yes"):
        return None
    import shutil
    import sys
    from pathlib import Path
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


class PySpy:
    """`py-spy record --format raw` on a pid for a bounded time; summarises the hottest frames."""

    def __init__(self, pid: int, seconds: float, out: str) -> None:
        self.pid, self.seconds, self.out = pid, seconds, out
        self.proc: Any = None

    def __enter__(self) -> PySpy:
        exe = pyspy_path()
        if exe is not None:
            import subprocess
            self.proc = subprocess.Popen(
                [exe, "record", "--format", "raw", "--nonblocking", "-r", "50", "-d", str(int(self.seconds) + 1),
                 "-p", str(self.pid), "-o", self.out], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *_: object) -> None:
        if self.proc is not None:
            try:
                self.proc.wait(timeout=self.seconds + 30)
            except Exception:
                self.proc.kill()

    def summary(self, limit: int = 12) -> dict[str, Any]:
        """Self time of leaf frames and inclusive time of frames, in % of samples."""
        if self.proc is None or not os.path.exists(self.out):
            return {}
        leaf: dict[str, int] = {}
        incl: dict[str, int] = {}
        total = 0
        with open(self.out) as f:
            for line in f:
                stack, _, count = line.rstrip("\n").rpartition(" ")
                if not count.isdigit():
                    continue
                n = int(count)
                total += n
                frames = [fr.strip() for fr in stack.split(";") if fr.strip()]
                if frames:
                    leaf[frames[-1]] = leaf.get(frames[-1], 0) + n
                for fr in set(frames):
                    incl[fr] = incl.get(fr, 0) + n
        if not total:
            return {}

        def top(d: dict[str, int]) -> list[str]:
            return [f"{100 * v / total:5.1f}% {k}" for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:limit]]

        ours = {k: v for k, v in incl.items() if "campaign_service" in k or "dispatcher_service" in k}
        return {"samples": total, "file": self.out, "self_top": top(leaf), "inclusive_top_ours": top(ours)}
