"""What fastvar needs to know about a model family to patch it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fastvar.config import FastVARConfig, Schedule
from fastvar.summary import CostModel, decoder_flops


def has_class_named(obj: object, name: str) -> bool:
    """Recognise a class by name along the MRO, so that the upstream package need not be imported."""
    return any(cls.__name__ == name for cls in type(obj).__mro__)


class Adapter:
    """One model family. Subclasses fill in every attribute and method below."""

    family: str
    description: str  # how a supported model is recognised, for error messages
    presets: dict[str, FastVARConfig]
    default_preset = "default"
    text_scales = 0  # leading scales of text tokens rather than token maps (HART's scale 0)
    schedule_per_call = False  # each sampling call brings its own schedule; scale_shapes is only the default
    no_kv_budgets: str | None = None  # why the family's KV cache takes no budgets; None where it does
    attention_module: type  # fastvar's self-attention class of the family, whose KV cache a budget cuts
    query_projection = "mat_qkv"  # its q, k, v projection: the first third makes the queries

    @staticmethod
    def matches(model: nn.Module) -> bool:
        raise NotImplementedError

    @staticmethod
    def refusal(model: nn.Module) -> str | None:
        """What to do instead, for a model of this family that fastvar recognises but does not patch (an
        upstream object whose loop it cannot drive); None for any other model."""
        return None

    @staticmethod
    def blocks(model: nn.Module) -> Sequence[nn.Module]:
        raise NotImplementedError

    @staticmethod
    def scale_shapes(model: nn.Module) -> list[tuple[int, int]]:
        """(h, w) of every scale of the schedule the model runs by default."""
        raise NotImplementedError

    @classmethod
    def resolve(cls, config: FastVARConfig, shapes: Sequence[tuple[int, ...]], depth: int) -> Schedule:
        """``config`` resolved against a model of this family with these scale shapes and ``depth`` blocks;
        ``ValueError`` for what the family or the model cannot run."""
        if config.kv_budget is not None and cls.no_kv_budgets:
            raise ValueError(f"KV budgets do not apply to {cls.family}: {cls.no_kv_budgets}")
        return config.resolve(shapes, depth, cls.text_scales, cls.schedule_per_call, **cls.layout(shapes))

    @staticmethod
    def layout(shapes: Sequence[tuple[int, ...]]) -> dict[str, Any]:
        """What ``FastVARConfig.resolve`` needs besides the shapes (clips, repetitions, references): none
        for a plain pyramid."""
        return {}

    @staticmethod
    def cost_model(model: nn.Module) -> CostModel:
        raise NotImplementedError

    @staticmethod
    def decoder(model: nn.Module) -> nn.Module | None:
        """The image decoder the model's sampling call runs, if the model holds it."""
        vae = getattr(model, "vae_proxy", None)
        return None if vae is None else vae[0].decoder

    @classmethod
    def decoder_flops(cls, model: nn.Module, decoder: nn.Module, shapes: Sequence[tuple[int, ...]]) -> float:
        """FLOPs of decoding one image of a call with these scale shapes."""
        return decoder_flops(decoder, *cls.latent_shape(model, shapes[-1]))

    @staticmethod
    def latent_shape(model: nn.Module, last_scale: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the decoder's latent for a last scale of ``last_scale``."""
        return last_scale

    @staticmethod
    def block_class(parent: type) -> type:
        """A subclass of the block class whose forward applies the shared FastVAR state."""
        raise NotImplementedError

    @staticmethod
    def root_class(parent: type) -> type:
        """A subclass of the root class whose sampling honours scale skipping."""
        raise NotImplementedError

    @staticmethod
    def attention(block: nn.Module) -> nn.Module:
        """The self-attention module of a block, whose KV cache a budget cuts."""
        return block.attn

    @classmethod
    def attention_class(cls, parent: type) -> type:
        """A subclass of the self-attention class that cuts its KV cache to the budget after each scale."""
        return budgeted_attention(parent, cls.attention_module, cls.query_projection)


def budgeted_attention(parent: type, own: type, projection: str) -> type:
    """A subclass of ``parent``, one of fastvar's self-attention classes (``own``), that cuts its KV cache to the
    budget after each scale, once the scale attended to it. ``projection``: its q, k, v projection, whose
    first third makes the queries that score the cache."""
    if not issubclass(parent, own):
        raise ValueError(f"KV budgets need fastvar's own model ({own.__module__}), whose KV cache they cut in place; "
                         "the upstream object's attention keeps its own")

    class FastVARSelfAttention(parent):
        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            state, layer = self._fastvar, self._fastvar_layer
            state.plan_cut(layer, self.kv_cache, x.shape[1])
            out = super().forward(x, *args, **kwargs)
            state.cut_kv(layer, self.kv_cache, x, getattr(self, projection).weight)
            return out

    return FastVARSelfAttention
