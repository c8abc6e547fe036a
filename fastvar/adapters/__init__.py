"""One adapter per model family; ``find_adapter`` picks the one that recognises a model."""

from __future__ import annotations

from torch import nn

from fastvar.adapters.base import Adapter
from fastvar.adapters.hart import HartAdapter
from fastvar.adapters.infinity import InfinityAdapter
from fastvar.adapters.infinitystar import InfinityStarAdapter
from fastvar.adapters.var import VarAdapter

ADAPTERS: tuple[type[Adapter], ...] = (VarAdapter, InfinityAdapter, HartAdapter, InfinityStarAdapter)


def find_adapter(model: nn.Module) -> type[Adapter]:
    """The adapter of ``model``'s family; ``TypeError`` naming the supported families otherwise."""
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    for adapter in ADAPTERS:
        if (refusal := adapter.refusal(model)) is not None:
            raise TypeError(f"fastvar cannot patch this {type(model).__name__}: {refusal}")
    supported = "; ".join(f"{a.family} ({a.description})" for a in ADAPTERS)
    raise TypeError(f"fastvar cannot patch this {type(model).__name__}: supported families are {supported}")
