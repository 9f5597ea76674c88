"""Automatic prefix caching: the keys/values of prompt prefixes computed before, reused instead of prefilled again.

    cache = PrefixCache(bytes_per_token, budget_bytes=256 << 20)
    n, k, v = cache.lookup(prompt_ids)        # the longest cached prefix: n tokens (a multiple of BLOCK)
    cache.store(prompt_ids, k_all, v_all)     # after a prefill: the prompt's full blocks, (layers, kv, T, hd)

A prompt is cut into blocks of BLOCK tokens; block j is named by a hash of (block j-1's name, its token ids), so
a name stands for the whole prefix up to the end of its block, as in vLLM's automatic prefix caching. A lookup
walks the prompt's blocks while they are cached (each entry also keeps its tokens and its parent's name, and a
hit is checked against them: a hash collision can never give wrong keys). At least the prompt's last token is
always left to compute, since its logits sample the first new token. Entries are evicted least recently used
once the cache holds more than its budget. Keys and values depend on the weights: the engine clears the cache
when they change.

What comes back is what a prefill of the same tokens at the same positions computed, so a prompt gives the same
tokens with or without the cache (tests compare both); the floating-point sums can differ in the last bits from
a full prefill, since the cached part was computed in another batch shape.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

BLOCK = 16


@dataclass
class _Block:
    parent: int | None
    tokens: tuple[int, ...]
    k: torch.Tensor          # (n_layer, n_kv_heads, BLOCK, head_dim)
    v: torch.Tensor


class PrefixCache:
    def __init__(self, bytes_per_token: int, budget_bytes: int):
        self.bytes_per_block = bytes_per_token * BLOCK
        self.max_blocks = max(0, budget_bytes // max(self.bytes_per_block, 1))
        self._blocks: OrderedDict[int, _Block] = OrderedDict()
        self.queried_tokens = 0       # prompt tokens looked up
        self.hit_tokens = 0           # of those, served from the cache

    def __len__(self) -> int:
        return len(self._blocks)

    def clear(self) -> None:
        self._blocks.clear()

    @staticmethod
    def _names(ids: list[int], blocks: int) -> list[tuple[int, int | None, tuple[int, ...]]]:
        out, parent = [], None
        for j in range(blocks):
            tokens = tuple(ids[j * BLOCK:(j + 1) * BLOCK])
            name = hash((parent, tokens))
            out.append((name, parent, tokens))
            parent = name
        return out

    def lookup(self, ids: list[int]) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
        """(n, k, v): the first n tokens of `ids` are cached (n < len(ids)); k, v (n_layer, n_kv, n, hd) or None."""
        self.queried_tokens += len(ids)
        found = []
        for name, parent, tokens in self._names(ids, (len(ids) - 1) // BLOCK):
            b = self._blocks.get(name)
            if b is None or b.parent != parent or b.tokens != tokens:
                break
            self._blocks.move_to_end(name)
            found.append(b)
        if not found:
            return 0, None, None
        n = len(found) * BLOCK
        self.hit_tokens += n
        return n, torch.cat([b.k for b in found], dim=2), torch.cat([b.v for b in found], dim=2)

    def store(self, ids: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep the full blocks of `ids` whose keys/values k, v (n_layer, n_kv, len(ids), hd) hold."""
        if self.max_blocks == 0:
            return
        for j, (name, parent, tokens) in enumerate(self._names(ids, len(ids) // BLOCK)):
            if name in self._blocks:
                self._blocks.move_to_end(name)
                continue
            cols = slice(j * BLOCK, (j + 1) * BLOCK)
            self._blocks[name] = _Block(parent, tokens, k[:, :, cols].clone(), v[:, :, cols].clone())
        while len(self._blocks) > self.max_blocks:
            self._blocks.popitem(last=False)

    def stats(self) -> dict:
        return {"blocks": len(self._blocks), "queried_tokens": self.queried_tokens, "hit_tokens": self.hit_tokens,
                "hit_rate": self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0}
