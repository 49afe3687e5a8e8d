"""The pass manager: runs the analysis passes, then the transforms, over one Dynamo graph, and
then over each subgraph of a higher-order op that halo rewrites (a checkpointed region)."""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import torch
import torch.fx as fx

from halo_compile.config import HaloConfig

from .autocast_regions import ambient_autocast_dtype, autocast_dtypes
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
