"""The Redis Lua scripts of the dispatcher, each in its own file under lua/.

A script names the fragments it needs (local functions shared by several scripts) with a line
`-- #include NAME`; they are put ahead of its body. Sources are read once per process; redis-py's
Script runs them by SHA (EVALSHA), loading a script into Redis only when Redis does not have it."""

from __future__ import annotations

import functools
import re
from pathlib import Path

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

LUA_DIR = Path(__file__).with_name("lua")
_INCLUDE = re.compile(r"^-- #include (\w+)$", re.MULTILINE)


@functools.cache
def source(name: str) -> str:
    """The full text of lua/NAME.lua, its included fragments first."""
    text = (LUA_DIR / f"{name}.lua").read_text()
    return "".join(source(fragment) for fragment in _INCLUDE.findall(text)) + text


def register(redis: Redis, name: str) -> AsyncScript:
    return redis.register_script(source(name))
