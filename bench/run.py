"""`make bench` / `python -m bench.run [--only NAME ...]`: start a private stack, run each figure with
its baseline in the same run, print a table and write bench/results.json.

BENCH_SCALE (default 1.0) shrinks every size, e.g. BENCH_SCALE=0.05 for a quick run."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench.core import Ctx, PgLog, Result, pg_enable_profiling, pg_stats_reset, pg_top
from bench.figures import FIGURES
from bench.stack import Stack, log_tail

HERE = Path(__file__).resolve().parent


def _fmt(v: float | None, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if unit == "s":
        return f"{v:.3f} s"
    if unit in ("ms", "MB"):
        return f"{v:.1f} {unit}"
    if abs(v) >= 100:
        return f"{v:.0f} {unit}".strip()
    return f"{v:.2f} {unit}".strip()


def table(rows: list[Result]) -> str:
    head = ("figure", "value", "baseline", "ratio", "target", "met?")
    lines = []
    for r in rows:
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        met = "ERROR" if r.error else ("yes" if r.met else ("no" if r.met is False else "-"))
        lines.append((r.figure, _fmt(r.value, r.unit), _fmt(r.baseline, r.unit), ratio, r.target, met))
    widths = [max(len(h), *(len(x[i]) for x in lines)) if lines else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)) for x in lines]
    return "\n".join(out)


def run_figure(ctx: Ctx, name: str, pglog: PgLog) -> list[Result]:
    ctx.figure = name
    ctx.rows = []
    pg_stats_reset(ctx.stack)
    pglog.mark()
    t0 = time.perf_counter()
    print(f"[bench] {name} …", flush=True)
    try:
        FIGURES[name](ctx)
    except BaseException as e:  # a failing figure is a row, not the end of the run
        if isinstance(e, KeyboardInterrupt):
            raise
        msg = f"{type(e).__name__}: {e}".strip()[:600]
        if not ctx.rows:
            ctx.row("", name, "", "")
        for r in ctx.rows:
            if r.met is None or r.value is None:
                r.error = r.error or msg
                r.met = False if r.target else None
        ctx.rows[0].details["traceback"] = traceback.format_exc()[-3000:]
        for svc in ("campaign", "dispatcher", "worker"):
            tail = log_tail(ctx.stack, svc, 15)
            if tail:
                ctx.rows[0].details[f"{svc}_log_tail"] = tail
    for r in ctx.rows:
        if r.error:  # an error means not met, whatever the figure set before it failed
            r.met = False
    elapsed = time.perf_counter() - t0
    top = pg_top(ctx.stack)
    slow = pglog.slow()
    for r in ctx.rows:
        r.details["figure_seconds"] = round(elapsed, 2)
    if ctx.rows:
        if top:
            ctx.rows[0].details["pg_top_statements"] = top
        if slow:
            ctx.rows[0].details["pg_slow_log"] = slow
    for r in ctx.rows:
        print(f"[bench]   {r.figure}: value={_fmt(r.value, r.unit)} baseline={_fmt(r.baseline, r.unit)} "
              f"ratio={'-' if r.ratio is None else f'{r.ratio:.2f}x'} met={r.met}"
              + (f" ERROR {r.error}" if r.error else ""), flush=True)
    return ctx.rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help=f"run only this figure (repeatable, or comma-separated): {', '.join(FIGURES)}")
    ap.add_argument("--out", default=str(HERE / "results.json"), help="results file (default bench/results.json)")
    ap.add_argument("--keep", action="store_true", help="print the work directory and keep it")
    a = ap.parse_args(argv)
    names = [n for o in a.only for n in o.split(",") if n] or list(FIGURES)
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        ap.error(f"unknown figure(s) {unknown}; known: {', '.join(FIGURES)}")
    scale = float(os.environ.get("BENCH_SCALE", "1.0"))
    if scale <= 0:
        ap.error("BENCH_SCALE must be > 0")

    stack = Stack()
    print(f"[bench] scale={scale} figures={','.join(names)} workdir={stack.workdir}", flush=True)
    rows: list[Result] = []
    profiling = False
    started = time.time()
    try:
        stack.start_infra()
        stack.migrate()
        profiling = pg_enable_profiling(stack)
        ctx = Ctx(stack, scale)
        pglog = PgLog(stack)
        for name in names:
            rows += run_figure(ctx, name, pglog)
    except KeyboardInterrupt:
        print("[bench] interrupted", file=sys.stderr)
    except Exception as e:
        r = Result(figure="setup", title="stack start", unit="", target="", met=False,
                   error=f"{type(e).__name__}: {e}"[:600], details={"traceback": traceback.format_exc()[-3000:]})
        rows.append(r)
        profiling = False
    finally:
        stack.stop()

    doc: dict[str, Any] = {
        "scale": scale, "started_at": started, "seconds": round(time.time() - started, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "pg_profiling": profiling,
        "ratio_direction": "ratio = ours / baseline; for times lower is better, for rates higher is better",
        "workdir": str(stack.workdir),
        "results": [r.as_json() for r in rows],
    }
    Path(a.out).write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print()
    print(table(rows))
    print(f"\nratio = ours / baseline (time: lower is better; rate: higher is better). Written {a.out}")
    if not a.keep:
        import shutil
        shutil.rmtree(stack.workdir, ignore_errors=True)
    else:
        print(f"work directory kept: {stack.workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
