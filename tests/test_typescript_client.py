"""The TypeScript client (clients/typescript) against the real stack: runs its node:test suite
(create, start, WatchCampaign, cancel; error codes and details; retries) with the session's
campaign_service address, a fresh user's key and the WAHA sandbox. `make test` builds the client
first (clients/typescript/dist/.stamp: buf generate + tsc)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable

import pytest

from devstack.procs import REPO, ServiceProcess
from tests.conftest import SANDBOX_API_KEY

TS = REPO / "clients" / "typescript"
TESTS = TS / "dist" / "test"


def test_typescript_client_against_the_stack(
        stack: dict[str, ServiceProcess], ports: dict[str, int], create_user: Callable[..., str],
        sandbox_url: str) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is missing: the TypeScript client needs Node 20")
    assert (TESTS / "client.test.js").exists(), \
        "clients/typescript is not built: run `make clients/typescript/dist/.stamp` (make test does)"
    env = {
        **os.environ,
        "WHAGO_TARGET": f"127.0.0.1:{ports['campaign']}",
        "WHAGO_API_KEY": create_user(),
        "WHAGO_SANDBOX_URL": sandbox_url,
        "WHAGO_SANDBOX_API_KEY": SANDBOX_API_KEY,
    }
    r = subprocess.run([node, "--test", "--test-reporter=spec", str(TESTS / "client.test.js")],
                       cwd=TS, env=env, capture_output=True, text=True, timeout=60)
    print(r.stdout)
    assert r.returncode == 0, f"node --test exited {r.returncode}\n{r.stdout}\n{r.stderr}"


def test_typescript_quickstart_example_runs(
        stack: dict[str, ServiceProcess], ports: dict[str, int], create_user: Callable[..., str]) -> None:
    """The README's example, without arguments (balance and campaigns); a bad key exits 1 with the code."""
    node = shutil.which("node") or "node"
    example = TS / "dist" / "examples" / "quickstart.js"
    env = {**os.environ, "WHAGO_TARGET": f"127.0.0.1:{ports['campaign']}", "WHAGO_API_KEY": create_user(credits=7)}
    r = subprocess.run([node, str(example)], cwd=TS, env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    assert "credits: 7 available, 0 reserved" in r.stdout, r.stdout
    r = subprocess.run([node, str(example)], cwd=TS, env={**env, "WHAGO_API_KEY": "wk_wrong"},
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "error: Unauthenticated (UNAUTHENTICATED)" in r.stderr, r.stderr
