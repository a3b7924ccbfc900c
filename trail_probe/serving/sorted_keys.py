"""Requests kept sorted by a fixed key (the vLLM plugin's paused and queued requests: they produce no
tokens, so their keys cannot change), of which only the best few are looked at each step."""

from __future__ import annotations

import bisect


class SortedKeys:
    """(key, request id) pairs kept sorted; removal checks the id (a stale or odd key never removes another)."""

    def __init__(self):
        self.items: list[tuple[tuple, str]] = []
        self.keys: dict[str, tuple] = {}

    def __contains__(self, rid: str) -> bool:
        return rid in self.keys

    def __len__(self) -> int:
        return len(self.keys)

    def insert(self, rid: str, key: tuple) -> None:
        self.remove(rid)
        self.keys[rid] = key
        bisect.insort(self.items, (key, rid))

    def remove(self, rid: str) -> None:
        key = self.keys.pop(rid, None)
        if key is None:
            return
        i = bisect.bisect_left(self.items, (key, rid))
        if i < len(self.items) and self.items[i][1] == rid:
            del self.items[i]
        else:  # never expected (keys are finite); keep the list true rather than trust the position
            self.items = [(k, r) for k, r in self.items if r != rid]

    def best(self, n: int) -> list[str]:
        return [rid for _, rid in self.items[:n]]
