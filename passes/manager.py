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
    # How the quantized ops name a linear in their inf/NaN errors. The name is baked into the
    # graph, which a regionally compiled block shares with every block of its kind: there it
    # says so (halo_compile/report.py, `Region.name_in_errors`).
    name_in_errors: Callable[[str], str] = str
    # The autocast dtype of a device type where the graph is entered (None: autocast off):
    # around the compiled call for a Dynamo graph, at the higher-order op's call for a subgraph.
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
            name_in_errors: Optional[Callable[[str], str]] = None,
            autocast_at_entry: Optional[Callable[[str], Optional[torch.dtype]]] = None
            ) -> PassContext:
        ctx = PassContext(gm, example_inputs, config,
                          tensors if tensors is not None else GraphTensors(gm, example_inputs),
                          name_in_errors=name_in_errors or str,
                          autocast_at_entry=autocast_at_entry or ambient_autocast_dtype)
        for graph_pass in self.passes:
            graph_pass.run(ctx)
        # A subgraph is a graph of its own, its placeholders resolved through the call: the same
        # passes rewrite it, and its layers join this graph's report.
        for site in ctx.analysis.subgraphs:
            if not site.skip_reason:
                child = self.run(site.body, (), config, site.tensors, ctx.name_in_errors,
                                 functools.partial(_autocast_at_call, ctx, site.node))
                ctx.subgraphs.append(child)
                ctx.layer_reports.extend(child.layer_reports)
        gm.graph.lint()
        gm.recompile()
        return ctx


def _autocast_at_call(ctx: PassContext, call: fx.Node, device_type: str):
    """The autocast dtype of `device_type` where `call` (a higher-order op) runs in ctx's graph."""
    return autocast_dtypes(ctx.gm.graph, device_type, ctx.autocast_at_entry(device_type))[call]
