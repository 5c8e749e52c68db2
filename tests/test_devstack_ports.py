"""`make run`'s ports (private PostgreSQL/Redis, the programs' own): the default, unless a socket
that is not a server holds it (then a free one, said aloud), and a server listening there is left
to refuse itself."""

from __future__ import annotations

import socket

import pytest

from devstack import __main__ as devstack_main
from devstack.servers import free_port


def test_a_free_default_port_is_used() -> None:
    port = free_port()
    assert devstack_main.private_port("PostgreSQL", "WHAGO_TEST_PORT_UNSET", port) == port


def test_a_port_held_by_a_client_socket_falls_back_to_a_free_one(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as held:  # bound, not listening: like a connection's ephemeral source port
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        got = devstack_main.private_port("PostgreSQL", "WHAGO_TEST_PORT_UNSET", port)
    assert got != port and got > 0
    assert f"port {port} for PostgreSQL is in use; using {got}" in capsys.readouterr().out


def test_a_listening_server_keeps_the_port_and_an_explicit_port_is_used_as_is(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        # Starting there then fails with the server's own "already in use" message (not a silent switch).
        assert devstack_main.private_port("redis-server", "WHAGO_TEST_PORT_UNSET", port) == port
    monkeypatch.setenv("WHAGO_TEST_PORT_SET", "61234")
    assert devstack_main.private_port("redis-server", "WHAGO_TEST_PORT_SET", port) == 61234


def test_the_services_listen_addresses_move_off_a_held_port_and_clients_follow(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The programs' own ports (50051-50053, 9101-9103) as the private servers': 50052 held by a
    client socket stopped `make run` with a bind error right after a test run."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        got = devstack_main.listen_address("dispatcher_service", "WHAGO_TEST_LISTEN_UNSET", port)
    assert got.startswith("127.0.0.1:") and got != f"127.0.0.1:{port}"
    assert f"port {port} for dispatcher_service is in use; using {got.rsplit(':', 1)[1]}" in capsys.readouterr().out
    monkeypatch.setenv("DISPATCHER_LISTEN", "0.0.0.0:61235")
    monkeypatch.delenv("DISPATCHER_TARGET", raising=False)
    monkeypatch.setenv("WHAGO_SECRET_KEYS", "not-read-here")  # (else .run/secret.key is made)
    env = devstack_main.stack_env("postgresql://x", "redis://x")
    assert (env["DISPATCHER_LISTEN"], env["DISPATCHER_TARGET"]) == ("0.0.0.0:61235", "127.0.0.1:61235")
