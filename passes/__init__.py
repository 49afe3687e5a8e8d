"""FX graph passes of the halo backend: analysis first, then transforms (see manager.py)."""

from .analysis import AttentionSite, GraphAnalysis, LinearSite, NormSite, ResidualAdd
from .manager import PassContext, PassManager, default_passes

__all__ = [
    "AttentionSite",
    "GraphAnalysis",
    "LinearSite",
    "NormSite",
    "PassContext",
    "PassManager",
    "ResidualAdd",
    "default_passes",
]
