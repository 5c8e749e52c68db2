"""Lazy pagination over AIP-158 List methods, so callers never touch page tokens."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

__all__ = ["PageFetcher", "Pager"]

T = TypeVar("T")

#: Fetches one page: given a page token ("" for the first page), returns the page's items
#: and the next page token ("" on the last page).
PageFetcher = Callable[[str], tuple[Sequence[T], str]]


class Pager(Generic[T]):
    """Iterable over every item of a paginated List call, fetching pages only as needed.

    Nothing is requested until iteration starts, and a page is requested only when the
    previous one is used up, so `next(iter(pager))` costs one RPC and a million-row listing
    never sits in memory. Each new `iter()` (or `.pages`) starts again from the first page.
    """

    def __init__(self, fetch: PageFetcher[T]) -> None:
        self._fetch = fetch

    @property
    def pages(self) -> Iterator[list[T]]:
        """The pages themselves, for callers that batch their own work per page."""
        token = ""
        seen: set[str] = set()
        while True:
            items, next_token = self._fetch(token)
            yield list(items)
            if not next_token:
                return
            # A server handing back a token it already gave would loop forever.
            if next_token in seen:
                raise RuntimeError(f"server repeated page token {next_token!r}")
            seen.add(next_token)
            token = next_token

    def __iter__(self) -> Iterator[T]:
        for page in self.pages:
            yield from page

    def first(self) -> T | None:
        """The first item, or None if there is none (one RPC)."""
        return next(iter(self), None)

    def to_list(self) -> list[T]:
        """Every item of every page; only for listings known to be small."""
        return list(self)

    def __repr__(self) -> str:
        return f"Pager({self._fetch!r})"
