"""patch / unpatch: swap block classes in place, keep the shared state on the root module.

Weights, hooks and ``state_dict`` are untouched: a patched block is the same object with a subclass
of its class, made once per original class, that remembers the original as ``_fastvar_parent``.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable

import torch
from torch import nn

from fastvar.adapters import find_adapter
from fastvar.adapters.base import Adapter
from fastvar.config import FastVARConfig
from fastvar.dtypes import resolve_dtype
from fastvar.state import FastVARState
from fastvar.summary import Summary


def _refuse_pickling(module: nn.Module, protocol: int) -> None:
    raise TypeError(f"a fastvar-patched {type(module)._fastvar_parent.__name__} cannot be pickled (its class is made "
                    "at run time): call fastvar.unpatch(model) first, or save model.state_dict()")


def _deepcopy(module: nn.Module, memo: dict) -> nn.Module:
    """What ``copy.deepcopy`` does for the unpatched class, which ``__reduce_ex__`` no longer offers: the
    copy's blocks and root share one copied FastVARState through ``memo``."""
    copied = object.__new__(type(module))
    memo[id(module)] = copied
    copied.__setstate__(copy.deepcopy(module.__getstate__(), memo))
    return copied


@functools.cache
def _patched_class(parent: type, make: Callable[[type], type]) -> type:
    cls = make(parent)
    cls._fastvar_parent = parent
    cls.__name__ = cls.__qualname__ = f"FastVAR{parent.__name__}"
    cls.__reduce_ex__ = _refuse_pickling  # pickle / torch.save would fail to find the class by name
    cls.__deepcopy__ = _deepcopy  # the class object itself needs no name
    return cls


def _swap(module: nn.Module, make: Callable[[type], type]) -> None:
    module.__class__ = _patched_class(type(module), make)


def _config_of(adapter: type[Adapter], config: FastVARConfig | str | None,
               overrides: dict) -> tuple[str | None, FastVARConfig]:
    """The preset name (if any) and the config ``patch`` was asked for."""
    preset = adapter.default_preset if config is None else config if isinstance(config, str) else None
    if preset is not None:
        if preset not in adapter.presets:
            raise ValueError(f"unknown {adapter.family} preset {preset!r}; available: {sorted(adapter.presets)}")
        config = adapter.presets[preset]
    if not isinstance(config, FastVARConfig):
        raise TypeError(f"config must be a FastVARConfig, a preset name or None, got {type(config).__name__}")
    if overrides:
        config, preset = config.replace(**overrides), None
    return preset, config


def patch(model: nn.Module, config: FastVARConfig | str | None = None, **overrides) -> nn.Module:
    """Make ``model`` run FastVAR. ``config`` is a FastVARConfig, a preset name of the model's family
    or None (the family's default preset); keyword arguments override its fields.

    Patching a patched model reconfigures it. Raises ``TypeError`` for a model of no supported family
    and ``ValueError`` for a config naming scales or layers the model does not have.
    """
    adapter = find_adapter(model)
    preset, config = _config_of(adapter, config, overrides)
    blocks = adapter.blocks(model)
    schedule = adapter.resolve(config, adapter.scale_shapes(model), len(blocks))
    patched = [(block, adapter.block_class) for block in blocks]
    if config.kv_budget is not None:  # the attention modules whose caches the budget cuts
        patched += [(adapter.attention(block), adapter.attention_class) for block in blocks]
    for module, make in patched:  # every class made (or refused) before the model is touched
        _patched_class(type(module)._fastvar_parent if _is_patched_module(module) else type(module), make)
    _remove(model)
    state = FastVARState(adapter.family, preset, config, schedule)
    model._fastvar = state
    _swap(model, adapter.root_class)
    for index, (module, make) in enumerate(patched):  # blocks, then their attention modules
        module._fastvar, module._fastvar_layer = state, index % len(blocks)
        _swap(module, make)
    return model


def _is_patched_module(module: nn.Module) -> bool:
    return "_fastvar_parent" in type(module).__dict__


def _remove(model: nn.Module) -> bool:
    if not is_patched(model):
        return False
    model._fastvar.release()
    for module in model.modules():
        if _is_patched_module(module):
            module.__class__ = type(module)._fastvar_parent
        for name in ("_fastvar", "_fastvar_layer"):
            module.__dict__.pop(name, None)
    return True


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the original classes and free every cache; a no-op, with a warning, if not patched."""
    if not _remove(model):
        warnings.warn(f"{type(model).__name__} is not patched by fastvar; nothing to undo", stacklevel=2)
    return model


def presets(model: nn.Module) -> dict[str, FastVARConfig]:
    """The named configs of ``model``'s family that fit it, for ``patch(model, name)`` (a KV budget is made
    for a number of blocks: ``scalekv-10`` needs Infinity-2B's 32 or -8B's 40)."""
    adapter = find_adapter(model)
    depth = len(adapter.blocks(model))
    return {name: config for name, config in adapter.presets.items()
            if fits(config, adapter, adapter.scale_shapes(model), depth)}


def fits(config: FastVARConfig, adapter: type[Adapter], shapes: list[tuple[int, ...]], depth: int) -> bool:
    try:
        adapter.resolve(config, shapes, depth)
    except ValueError:
        return False
    return True


def is_patched(model: nn.Module) -> bool:
    return isinstance(model.__dict__.get("_fastvar"), FastVARState)


def summary(model: nn.Module, batch: int = 1, dtype: torch.dtype | str = torch.float32,
            decoder: nn.Module | None = None) -> Summary:
    """Per scale: tokens, tokens run per block, skipped or not, FLOPs and KV-cache bytes; the ideal FLOP
    ratio, and with the image ``decoder`` (found on VAR and HART models; pass Infinity's VAE decoder, or
    InfinityStar's ``VideoVAE``) that of the whole call. Memory is for ``batch`` images cached in ``dtype``,
    one of fastvar's precisions (a torch dtype or its name, 'bf16' ...)."""
    if not is_patched(model):
        raise ValueError(f"{type(model).__name__} is not patched; call fastvar.patch(model) first")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch = {batch!r}: must be an int >= 1")
    dtype = resolve_dtype(dtype)
    state, adapter = model._fastvar, find_adapter(model)
    decoder = adapter.decoder(model) if decoder is None else decoder
    flops = None if decoder is None else adapter.decoder_flops(model, decoder, state.schedule.shapes)
    return Summary.of(state.family, state.preset, state.schedule, adapter.cost_model(model), batch,
                      dtype.itemsize, flops)
