"""fastvar: training-free FastVAR acceleration for next-scale prediction image and video generators."""

from fastvar.config import FastVARConfig, Schedule
from fastvar.fidelity import compare
from fastvar.patch import is_patched, patch, presets, summary, unpatch
from fastvar.pipelines import HARTPipeline, InfinityPipeline, InfinityStarPipeline, VARPipeline
from fastvar.sampler import sample
from fastvar.summary import Summary

__all__ = ["FastVARConfig", "HARTPipeline", "InfinityPipeline", "InfinityStarPipeline", "Schedule", "Summary",
           "VARPipeline", "compare", "is_patched", "patch", "presets", "sample", "summary", "unpatch"]
__version__ = "0.1.0"
