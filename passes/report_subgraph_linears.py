"""Report: every linear inside a subgraph that halo does not rewrite (passes/find_subgraphs.py)
gets a high-precision row saying why, instead of being left out of the report."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from halo_compile.report import LayerReport

from .find_linears import FindLinears
from .find_subgraphs import FindSubgraphs
from .quantize_linears import QuantizeLinears

if TYPE_CHECKING:
    from .analysis import SubgraphSite
    from .context import PassContext


_LOG = logging.getLogger(__name__)

class ReportSubgraphLinears:
    name = "report_subgraph_linears"

    def run(self, ctx: PassContext) -> None:
        reported: set[tuple] = set()  # (HOP call, weight): a backward body reads the weight too
        for site in ctx.analysis.subgraphs:
            if site.skip_reason:
                self._report(ctx, site, site.skip_reason, reported)

    def _report(self, ctx: PassContext, site: SubgraphSite, reason: str, reported: set) -> None:
        child = type(ctx)(site.body, (), ctx.config, site.tensors)
        FindLinears().run(child)
        FindSubgraphs().run(child)
        for linear in child.analysis.linears:
            key = (site.node, id(linear.weight))
            if key in reported:
                continue
            reported.add(key)
            # Named after the weight the call passes: a shared subgraph's module stack names
            # the first caller's layer only.
            source = site.tensors.source_name(linear.weight_node) or ""
            if source.endswith(".weight"):
                linear.fqn = source.removesuffix(".weight")
            layer = ctx.config.for_layer(linear.fqn)
            # A linear halo would leave alone anyway keeps its own reason.
            own_reason = QuantizeLinears._reason_to_skip(linear, layer, child)
            ctx.layer_reports.append(LayerReport(linear.fqn, linear.in_features,
                                                 linear.out_features, False,
                                                 reason=own_reason or reason))
            _LOG.debug("%s: high precision: %s", linear.fqn, own_reason or reason)
        for nested in child.analysis.subgraphs:
            self._report(ctx, nested, reason, reported)
