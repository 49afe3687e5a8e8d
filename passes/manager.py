"""The pass manager: runs the analysis passes, then the transforms, over one Dynamo graph."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch.fx as fx

from halo_compile.config import HaloConfig
from halo_compile.report import LayerReport

from .analysis import GraphAnalysis
from .find_attention import FindAttention
from .find_linears import FindLinears
from .find_norms import FindNormsAndResiduals
from .fold_online_rotations import FoldOnlineRotations
from .folding import FusionState
from .fuse_norms import FuseNorms
from .graph_utils import GraphTensors
from .quantize_linears import QuantizeLinears
from .rotate_residual import RotateResidualStream


@dataclass
class PassContext:
    gm: fx.GraphModule
    example_inputs: Sequence
    config: HaloConfig
    tensors: GraphTensors
    analysis: GraphAnalysis = field(default_factory=GraphAnalysis)
    layer_reports: list[LayerReport] = field(default_factory=list)
    fusion: FusionState = field(default_factory=FusionState)  # rotate="fused": what was folded


def default_passes() -> list:
    # The three rotation passes only act with rotate="fused".
    return [FindLinears(), FindAttention(), FindNormsAndResiduals(), FuseNorms(),
            RotateResidualStream(), FoldOnlineRotations(), QuantizeLinears()]


class PassManager:
    def __init__(self, passes=None):
        self.passes = default_passes() if passes is None else list(passes)

    def run(self, gm: fx.GraphModule, example_inputs: Sequence, config: HaloConfig) -> PassContext:
        ctx = PassContext(gm, example_inputs, config, GraphTensors(gm, example_inputs))
        for graph_pass in self.passes:
            graph_pass.run(ctx)
        gm.graph.lint()
        gm.recompile()
        return ctx
