"""The pass manager: runs the analysis passes, then the transforms, over one Dynamo graph, and
then over each subgraph of a higher-order op that halo rewrites (a checkpointed region)."""

from __future__ import annotations

from typing import Sequence

import torch.fx as fx

from halo_compile.config import HaloConfig

from .context import PassContext
from .find_attention import FindAttention
from .find_linears import FindLinears
from .find_norms import FindNormsAndResiduals
from .find_subgraphs import FindSubgraphs
from .fold_online_rotations import FoldOnlineRotations
from .fuse_norms import FuseNorms
from .graph_utils import GraphTensors
from .quantize_linears import QuantizeLinears
from .report_subgraph_linears import ReportSubgraphLinears
from .rotate_residual import RotateResidualStream


def default_passes() -> list:
    # The three rotation passes only act with rotate="fused".
    return [FindLinears(), FindSubgraphs(), FindAttention(), FindNormsAndResiduals(), FuseNorms(),
            RotateResidualStream(), FoldOnlineRotations(), QuantizeLinears(),
            ReportSubgraphLinears()]


class PassManager:
    def __init__(self, passes=None):
        self.passes = default_passes() if passes is None else list(passes)

    def run(self, gm: fx.GraphModule, example_inputs: Sequence, config: HaloConfig,
            tensors: GraphTensors | None = None) -> PassContext:
        ctx = PassContext(gm, example_inputs, config,
                          tensors if tensors is not None else GraphTensors(gm, example_inputs))
        for graph_pass in self.passes:
            graph_pass.run(ctx)
        # A subgraph is a graph of its own, its placeholders resolved through the call: the same
        # passes rewrite it, and its layers join this graph's report.
        for site in ctx.analysis.subgraphs:
            if not site.skip_reason:
                child = self.run(site.body, (), config, site.tensors)
                ctx.subgraphs.append(child)
                ctx.layer_reports.extend(child.layer_reports)
        gm.graph.lint()
        gm.recompile()
        return ctx
