"""The README's commands work verbatim: every ```bash block of README.md's "Try it" section (what a
new user types after `make run`) runs against the session's stack and must exit 0. (The Runbook's
block needs a campaign and an endpoint to act on: tests/test_deploy.py runs it with them set.)

The blocks run in a copy of the repository made of symlinks (so relative paths such as
`.venv/bin/python` and `node_modules/.bin/buf` resolve) whose `.run/env` is the one devstack writes,
pointing at the test stack's PostgreSQL, Redis and campaign_service. A real `.run/` (a `make run`
in progress) is never read or touched. The environment is a shell's: no PYTHONPATH, no DATABASE_URL.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from devstack import __main__ as devstack_main
from devstack.procs import REPO, ServiceProcess
from devstack.servers import Redis

#: ```bash blocks are commands to run as they are; ```sh blocks start the stack itself (make run/test).
FENCE = re.compile(r"^```bash\n(.*?)^```$", re.M | re.S)
#: The sections whose blocks run here, verbatim, with nothing but `.run/env` for context.
SECTIONS = ("Try it",)
#: What a user's shell has; anything pointing at servers must come from `. .run/env`.
KEPT_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "USER")


def bash_blocks(markdown: str) -> list[str]:
    """The ```bash blocks of the SECTIONS (a section runs from its `## ` heading to the next)."""
    blocks = []
    for section in re.split(r"^## ", markdown, flags=re.M)[1:]:
        if section.splitlines()[0].strip() in SECTIONS:
            blocks += [m.group(1) for m in FENCE.finditer(section)]
    return blocks


def test_the_readme_has_runnable_blocks_and_try_it_sources_run_env() -> None:
    blocks = bash_blocks((REPO / "README.md").read_text(encoding="utf-8"))
    assert blocks, "README.md's Try it has no ```bash block"
    assert any(b.startswith(". .run/env\n") for b in blocks)
    assert not any("make run" in b for b in blocks)  # would start a second stack


@pytest.fixture()
def checkout(tmp_path: Path, database_url: str, redis_server: Redis, ports: dict[str, int]) -> Path:
    """The repository seen through symlinks, with the `.run/env` devstack would write for this stack."""
    root = tmp_path / "whago"
    root.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in (".run", ".git"):
            (root / entry.name).symlink_to(entry)
    env = {"DATABASE_URL": database_url, "REDIS_URL": redis_server.url,
           "CAMPAIGN_LISTEN": f"127.0.0.1:{ports['campaign']}"}
    devstack_main.write_env_file(env, root / ".run" / "env")
    return root


def test_run_env_exports_the_addresses_for_a_shell(checkout: Path, database_url: str, ports: dict[str, int]) -> None:
    out = subprocess.run(["bash", "-c", '. .run/env && echo "$DATABASE_URL|$WHAGO_TARGET"'], cwd=checkout,
                         env={"PATH": os.environ["PATH"]}, capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"{database_url}|127.0.0.1:{ports['campaign']}"
    assert devstack_main.client_target("0.0.0.0:50051") == "127.0.0.1:50051"


@pytest.mark.parametrize("index", range(len(bash_blocks((REPO / "README.md").read_text(encoding="utf-8")))))
def test_readme_bash_block_runs_verbatim(index: int, checkout: Path, campaign_server: ServiceProcess) -> None:
    block = bash_blocks((REPO / "README.md").read_text(encoding="utf-8"))[index]
    env = {k: os.environ[k] for k in KEPT_ENV if k in os.environ}
    r = subprocess.run(["bash", "-euo", "pipefail", "-x", "-c", block], cwd=checkout, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"README block {index} exited {r.returncode}\n{block}\n--- stderr\n{r.stderr}"
