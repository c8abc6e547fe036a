"""One pipeline per model family: load, generate, images out. ``PIPELINES`` is what the CLI offers."""

from __future__ import annotations

from fastvar.pipelines.base import Pipeline
from fastvar.pipelines.infinity import InfinityPipeline
from fastvar.pipelines.var import VARPipeline

PIPELINES: dict[str, type[Pipeline]] = {p.family: p for p in (VARPipeline, InfinityPipeline)}

__all__ = ["PIPELINES", "InfinityPipeline", "Pipeline", "VARPipeline"]
