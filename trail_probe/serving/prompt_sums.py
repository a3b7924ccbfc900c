"""The mean of a prompt's states at the prompt probe's layer, when vLLM's prefix cache skips part of it.

With prefix caching (vLLM's default) a new request whose first KV blocks are already cached starts
its prefill after them: no forward pass computes those tokens' states, so a mean over the computed
tokens alone would not be the mean the prompt probe was trained on (over every prompt token), and
for the second of two identical prompts (n > 1, retries) it would cover one token. The worker sends
each prefill chunk's state sums per KV block; `PromptSums` adds them up per request and keeps the
sums of full blocks in a small cache keyed by vLLM's block hash (which names the block's content and
everything before it), from which a prefix-cache hit takes the blocks it skipped.

    sums = PromptSums(block_size=16, width=576)
    sums.start("r1", first_position=32)             # the first 2 blocks came from the prefix cache
    sums.add("r1", blocks=[2, 3], block_sums=S, counts=[16, 5])
    total, count, complete = sums.finish({"r1": request.block_hashes})["r1"]
"""

from __future__ import annotations

from collections import OrderedDict

import torch

CACHE_BYTES = 64 << 20  # the block-sum cache's budget


class PromptSums:
    def __init__(self, block_size: int, width: int, cache_bytes: int = CACHE_BYTES):
        self.block_size = block_size
        self.capacity = max(64, cache_bytes // (4 * width))
        self._cache: OrderedDict = OrderedDict()  # block hash -> summed states [d] (a full block)
        self._open: dict[str, dict] = {}  # request -> {"first": position, "blocks": {index: [sum, count]}}

    def __len__(self) -> int:
        return len(self._open)

    def start(self, request_id: str, position: int, end: int | None = None) -> None:
        """A prefill chunk of [position, end) is scheduled. The first one starts at what the prefix cache
        held (block-aligned); one that starts before the end of the last (vLLM preempted the request and
        computes it again) drops the sums of the blocks it computes again, which would otherwise count twice."""
        entry = self._open.get(request_id)
        if entry is None:
            entry = self._open[request_id] = {"first": int(position), "blocks": {}, "next": int(position)}
        elif position < entry["next"]:
            keep = position // self.block_size
            entry["blocks"] = {b: v for b, v in entry["blocks"].items() if b < keep}
            entry["first"] = min(entry["first"], keep * self.block_size)
        entry["next"] = int(end if end is not None else position)

    def add(self, request_id: str, blocks, block_sums: torch.Tensor, counts) -> None:
        entry = self._open.get(request_id)
        if entry is None:
            return
        for b, s, c in zip(list(blocks), block_sums, list(counts)):
            slot = entry["blocks"].setdefault(int(b), [torch.zeros_like(s, dtype=torch.float32), 0])
            slot[0] += s.float()
            slot[1] += int(c)

    def finish(self, done: dict) -> dict:
        """`done`: request -> its block hashes, for requests whose prompt has been summed. Returns request
        -> (sum of the prompt's states, tokens summed, whether every token is in it). The full blocks of
        all of them are cached first: a request may have hit, in the prefix cache, a block another one
        computed in the same pass. Requests never started are left out."""
        entries = {rid: (self._open.pop(rid), list(hashes or ())) for rid, hashes in done.items() if rid in self._open}
        for entry, hashes in entries.values():
            for b, (s, c) in entry["blocks"].items():
                if c == self.block_size and b < len(hashes):
                    self._remember(hashes[b], s)
        return {rid: self._total(entry, hashes) for rid, (entry, hashes) in entries.items() if entry["blocks"]}

    def _total(self, entry: dict, hashes: list) -> tuple[torch.Tensor, int, bool]:
        total = sum(s for s, _ in entry["blocks"].values())
        count = sum(c for _, c in entry["blocks"].values())
        complete = True
        for b in range(entry["first"] // self.block_size):
            cached = self._cache.get(hashes[b]) if b < len(hashes) else None
            if cached is None:
                complete = False
                continue
            self._cache.move_to_end(hashes[b])
            total, count = total + cached, count + self.block_size
        return total, count, complete

    def covered(self, request_id: str) -> int | None:
        """The prompt position up to which a request's states have arrived (None: not started)."""
        entry = self._open.get(request_id)
        return None if entry is None else entry["first"] + sum(c for _, c in entry["blocks"].values())

    def drop(self, request_id: str) -> None:
        self._open.pop(request_id, None)

    def _remember(self, block_hash, block_sum: torch.Tensor) -> None:
        self._cache[block_hash] = block_sum
        self._cache.move_to_end(block_hash)
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
