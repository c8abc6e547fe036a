"""One pipeline per model family: load, generate, images (or videos) out. ``PIPELINES`` is what the CLI offers."""

from __future__ import annotations

from fastvar.pipelines.base import Pipeline
from fastvar.pipelines.hart import HARTPipeline
from fastvar.pipelines.infinity import InfinityPipeline
from fastvar.pipelines.infinitystar import InfinityStarPipeline
from fastvar.pipelines.var import VARPipeline

PIPELINES: dict[str, type[Pipeline]] = {
    p.family: p for p in (VARPipeline, InfinityPipeline, HARTPipeline, InfinityStarPipeline)}

__all__ = ["PIPELINES", "HARTPipeline", "InfinityPipeline", "InfinityStarPipeline", "Pipeline", "VARPipeline"]
