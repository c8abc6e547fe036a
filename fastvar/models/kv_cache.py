"""The self-attention KV cache of next-scale generation, shared by the model families.

Each scale attends to the keys and values of every earlier scale and its own. Growing the cache with
``torch.cat`` at every scale holds two copies at once; here the buffers are allocated once per
generation for the ``capacity`` tokens that later scales will read (every scale's but the last's, or a
FastVAR schedule's kept tokens), each scale is written in place after the previous ones, and the last
scale's keys and values, which no later scale reads, are attended to without being stored.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values (B, H, L, D) of the tokens run so far.

    With a ``capacity``, an ``append`` that does not fit is the last scale: it is attended to, not
    stored, and the cache takes no more; unless a cut follows (``cut_next``, a KV budget's), which then
    keeps a selection of those keys and values. Without one the buffers grow by reallocation. An ``append``
    of fewer rows than the cache holds continues its leading rows (guidance turned off: the conditional
    rows go on without the unconditional ones).
    """

    def __init__(self, capacity: int | None = None):
        self.capacity, self.length, self.finished = capacity, 0, False
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.cut_next = False  # the next append is cut right after its attention: keep what did not fit for it
        self.overflow: tuple[torch.Tensor, torch.Tensor] | None = None

    def reserve(self, capacity: int) -> None:
        """Plan ``capacity`` tokens; only before the first ``append``."""
        if self.k is not None:
            raise RuntimeError("the KV cache is already allocated; reserve before the first scale")
        self.capacity = capacity

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cache ``k``, ``v`` (B, H, l, D) after the stored tokens; returns the keys and values of all of them."""
        if self.finished:
            raise RuntimeError(f"the KV cache was planned for {self.capacity} tokens and its last scale has run")
        rows, start, end = k.shape[0], self.length, self.length + k.shape[2]
        if self.capacity is not None and end > self.capacity:  # the last scale, or one the cut brings back
            if self.k is not None:
                k = torch.cat((self.k[:rows, :, :start], k), dim=2)
                v = torch.cat((self.v[:rows, :, :start], v), dim=2)
            self.finished = not self.cut_next
            self.overflow = None if self.finished else (k, v)
            return k, v
        if self.k is None or end > self.k.shape[2]:
            _, H, _, D = k.shape
            size = max(end, self.capacity or 0)
            k_buffer, v_buffer = k.new_empty(rows, H, size, D), v.new_empty(rows, H, size, v.shape[3])
            if start:
                k_buffer[:, :, :start], v_buffer[:, :, :start] = self.k[:rows, :, :start], self.v[:rows, :, :start]
            self.k, self.v = k_buffer, v_buffer
        k_rows, v_rows = self.k[:rows], self.v[:rows]  # fewer rows: the leading (conditional) ones go on alone
        k_rows[:, :, start:end], v_rows[:, :, start:end] = k, v
        self.length = end
        return k_rows[:, :, :end], v_rows[:, :, :end]

    def keys_and_values(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What the last append attended to: the stored tokens, or those that did not fit for a cut."""
        if self.overflow is not None:
            return self.overflow
        return self.k[:rows, :, : self.length], self.v[:rows, :, : self.length]

    def keep(self, positions: torch.Tensor) -> None:
        """Keep only the tokens the last append attended to at ``positions`` (rows, H, n), per row and head,
        in that order (a KV budget's cut); the next scale is written after them."""
        rows, _, n = positions.shape
        index = positions.unsqueeze(-1)
        kept = [t.gather(2, index.expand(-1, -1, -1, t.shape[3])) for t in self.keys_and_values(rows)]
        if self.k is None:
            self.k, self.v = (t.new_empty(rows, t.shape[1], self.capacity, t.shape[3]) for t in kept)
        self.k[:rows, :, :n], self.v[:rows, :, :n] = kept
        self.length, self.overflow, self.cut_next = n, None, False

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        return sum(t.numel() * t.element_size() for t in (self.k, self.v) if t is not None)


def reserve_kv(attention: torch.nn.Module, capacity: int) -> None:
    """Size the KV cache of a fastvar attention module that has just started caching; an upstream
    module (no ``kv_cache``) grows its own."""
    cache = getattr(attention, "kv_cache", None)
    if isinstance(cache, KVCache):
        cache.reserve(capacity)
