"""Message ids the worker picks itself (DISPATCH_MESSAGE_IDS=local) and the setting that chooses."""

from __future__ import annotations

import pytest

from dispatcher_service import config
from dispatcher_service.waha import message_ids


def test_ids_have_the_shape_gows_and_noweb_give_and_do_not_repeat() -> None:
    ids = [message_ids.new_message_id() for _ in range(20_000)]
    assert all(len(i) == 22 and message_ids.PATTERN.fullmatch(i) for i in ids), ids[:3]
    assert len(set(ids)) == len(ids)
    assert not message_ids.PATTERN.fullmatch("3EB0" + "a" * 18)  # upper-case hex only, as the engines give


def test_a_batch_of_ids_has_the_same_shape_and_does_not_repeat() -> None:
    ids = [i for _ in range(200) for i in message_ids.new_message_ids(100)]
    assert len(ids) == 20_000 and all(message_ids.PATTERN.fullmatch(i) for i in ids), ids[:3]
    assert len(set(ids)) == len(ids)
    assert message_ids.new_message_ids(0) == []


def test_message_ids_setting_defaults_to_local_takes_waha_and_refuses_anything_else(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISPATCH_MESSAGE_IDS", raising=False)
    assert config.load().message_ids == "local"
    monkeypatch.setenv("DISPATCH_MESSAGE_IDS", "waha")
    assert config.load().message_ids == "waha"
    monkeypatch.setenv("DISPATCH_MESSAGE_IDS", "Local ")
    with pytest.raises(ValueError, match="DISPATCH_MESSAGE_IDS must be one of local, waha, not 'Local '"):
        config.load()
