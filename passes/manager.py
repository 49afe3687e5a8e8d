"""The pass manager: runs the analysis passes, then the transforms, over one Dynamo graph, and
then over each subgraph of a higher-order op that halo rewrites (a checkpointed region)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.fx as fx

from halo_compile.config import HaloConfig
from halo_compile.report import LayerReport

from .analysis import GraphAnalysis
from .autocast_regions import ambient_autocast_dtype, autocast_dtypes
from .find_attention import FindAttention
from .find_linears import FindLinears
from .find_norms import FindNormsAndResiduals
from .find_subgraphs import FindSubgraphs
from .fold_online_rotations import FoldOnlineRotations
from .folding import FusionState
from .fuse_norms import FuseNorms
from .graph_utils import GraphTensors
from .quantize_linears import QuantizeLinears
from .report_subgraph_linears import ReportSubgraphLinears
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
    subgraphs: list["PassContext"] = field(default_factory=list)  # of the rewritten subgraphs
    # device type -> the autocast dtype where this graph starts: the state around the compiled
    # call, or for a subgraph the outer graph's state at the node that calls it.
    autocast_at_entry: Callable[[str], Optional[torch.dtype]] = ambient_autocast_dtype

    def describe(self) -> list[str]:
        """The analysis' lines and the fusion notes, of this graph and of its subgraphs."""
        lines = self.analysis.describe() + self.fusion.notes
        for child in self.subgraphs:
            lines += [line for line in child.describe() if line not in lines]
        return lines


def default_passes() -> list:
    # The three rotation passes only act with rotate="fused".
    return [FindLinears(), FindSubgraphs(), FindAttention(), FindNormsAndResiduals(), FuseNorms(),
            RotateResidualStream(), FoldOnlineRotations(), QuantizeLinears(),
            ReportSubgraphLinears()]


class PassManager:
    def __init__(self, passes=None):
        self.passes = default_passes() if passes is None else list(passes)

    def run(self, gm: fx.GraphModule, example_inputs: Sequence, config: HaloConfig,
            tensors: GraphTensors | None = None,
            autocast_at_entry: Callable[[str], Optional[torch.dtype]] = ambient_autocast_dtype,
            ) -> PassContext:
        ctx = PassContext(gm, example_inputs, config,
                          tensors if tensors is not None else GraphTensors(gm, example_inputs),
                          autocast_at_entry=autocast_at_entry)
        for graph_pass in self.passes:
            graph_pass.run(ctx)
        # A subgraph is a graph of its own, its placeholders resolved through the call: the same
        # passes rewrite it, and its layers join this graph's report.
        for site in ctx.analysis.subgraphs:
            if not site.skip_reason:
                child = self.run(site.body, (), config, site.tensors,
                                 functools.partial(_autocast_at, ctx, site.node))
                ctx.subgraphs.append(child)
                ctx.layer_reports.extend(child.layer_reports)
        gm.graph.lint()
        gm.recompile()
        return ctx


def _autocast_at(ctx: PassContext, node: fx.Node, device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype of `device_type` in effect at `node` of ctx's graph."""
    return autocast_dtypes(ctx.gm.graph, device_type, ctx.autocast_at_entry)[node]
