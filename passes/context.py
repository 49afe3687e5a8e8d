"""The state the passes share over one graph: the graph, its inputs and config, what the analysis
found, the report rows and what rotate="fused" folded. Its own module, so that the passes can
name it without importing the manager that runs them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch.fx as fx

from halo_compile.config import HaloConfig
from halo_compile.report import LayerReport

from .analysis import GraphAnalysis
from .folding import FusionState
from .graph_utils import GraphTensors


@dataclass
class PassContext:
    gm: fx.GraphModule
    example_inputs: Sequence
    config: HaloConfig
    tensors: GraphTensors
    analysis: GraphAnalysis = field(default_factory=GraphAnalysis)
    layer_reports: list[LayerReport] = field(default_factory=list)
    fusion: FusionState = field(default_factory=FusionState)  # rotate="fused": what was folded
    subgraphs: list["PassContext"] = field(default_factory=list)  # of the rewritten subgraphs

    def describe(self) -> list[str]:
        """The analysis' lines and the fusion notes, of this graph and of its subgraphs."""
        lines = self.analysis.describe() + self.fusion.notes
        for child in self.subgraphs:
            lines += [line for line in child.describe() if line not in lines]
        return lines
