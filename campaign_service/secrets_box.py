"""Chip WAHA API keys at rest: sealed with Fernet (the `cryptography` package) under the operator's
keys (WHAGO_SECRET_KEYS: comma-separated Fernet keys, the first seals, all open, so a key can be
rotated in), opened only to hand a lane its key. Never logged, never returned by the API."""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

PREFIX = "fernet:"


class SecretBoxError(RuntimeError):
    pass


class SecretBox:
    def __init__(self, keys: str) -> None:
        parts = [k.strip() for k in keys.split(",") if k.strip()]
        if not parts:
            raise SecretBoxError("WHAGO_SECRET_KEYS is not set: chip API keys cannot be stored (generate one with "
                                 "`python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key()"
                                 ".decode())'`)")
        try:
            self._fernet = MultiFernet([Fernet(k.encode()) for k in parts])
        except ValueError as exc:
            raise SecretBoxError(f"WHAGO_SECRET_KEYS: not a Fernet key ({exc})") from None

    def seal(self, plain: str) -> str:
        if not plain:
            return ""
        return PREFIX + self._fernet.encrypt(plain.encode()).decode()

    def open(self, stored: str) -> str:
        """The plain value; a value stored before sealing existed is returned as it is."""
        if not stored.startswith(PREFIX):
            return stored
        try:
            return self._fernet.decrypt(stored[len(PREFIX):].encode()).decode()
        except InvalidToken:
            raise SecretBoxError("a chip API key cannot be opened with WHAGO_SECRET_KEYS (was a key removed?)") \
                from None

    def reseal(self, stored: str) -> str:
        """Sealed under the current first key (rotation; also seals legacy plaintext)."""
        return self.seal(self.open(stored))
