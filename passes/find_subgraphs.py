"""Analysis: the subgraphs that higher-order ops (HOPs) call, and whether halo rewrites them.

Dynamo records a region of the model as a HOP call whose subgraph is a `get_attr` GraphModule of
the outer graph, called with the op's other arguments in place of its placeholders:

    tag_activation_checkpoint(body, *args)   torch.utils.checkpoint.checkpoint (either reentrant
                                             mode), and so Hugging Face's gradient checkpointing
    wrap(body, *args)                        a region Dynamo wraps as a unit
    invoke_subgraph(body, key, *args)        torch.compiler.nested_compile_region

The pass manager runs halo's passes over the subgraphs of these three (passes/manager.py). They
only group and re-run ops: a linear in them computes what it would outside, so the halo op takes
its place, and the region's recomputation in the backward (checkpointing) calls the same op. A
subgraph whose values are not simply the forward of its ops (a custom autograd.Function's
forward, with a hand-written backward; cond/while_loop branches), one that several calls share
(each call passes other weights, while the halo op names one layer), and every subgraph under
rotate="fused" (its rotations are folded across the whole graph) are not rewritten:
passes/report_subgraph_linears.py reports their linears with the reason.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from .analysis import SubgraphSite
from .graph_utils import GraphTensors

_LOG = logging.getLogger(__name__)

if TYPE_CHECKING:
    from .context import PassContext

# The HOPs whose subgraph runs as plain forward code, and where its operands start in the args.
REWRITTEN_HOPS = {"tag_activation_checkpoint": 1, "wrap": 1, "invoke_subgraph": 2}


class FindSubgraphs:
    name = "find_subgraphs"

    def run(self, ctx: PassContext) -> None:
        graph = ctx.gm.graph
        calls = [node for node in graph.nodes if node.op == "call_function"
                 and isinstance(node.target, torch._ops.HigherOrderOperator)]
        callers: dict[str, int] = {}  # subgraph attribute -> number of HOP calls of it
        for call in calls:
            for target in {body.target for body in _bodies(call)}:
                callers[target] = callers.get(target, 0) + 1
        for call in calls:
            hop = call.target.name()
            for body_node in _bodies(call):
                body = getattr(ctx.gm, body_node.target)
                operands = _operands(call, body, REWRITTEN_HOPS.get(hop))
                tensors = GraphTensors.for_subgraph(body, ctx.tensors, operands)
                reason = _skip_reason(hop, callers[body_node.target], ctx)
                ctx.analysis.subgraphs.append(SubgraphSite(call, hop, body, tensors, reason))
                _LOG.debug("subgraph %s of %s: %s", body_node.target, hop,
                           f"not rewritten: {reason}" if reason else "rewritten")


def _bodies(call: fx.Node) -> list[fx.Node]:
    """The `get_attr` GraphModule arguments of a HOP call, in order."""
    graph_module = call.graph.owning_module
    return [arg for arg in call.args if isinstance(arg, fx.Node) and arg.op == "get_attr"
            and isinstance(getattr(graph_module, arg.target, None), fx.GraphModule)]


def _operands(call: fx.Node, body: fx.GraphModule, first) -> dict[fx.Node, fx.Node]:
    """Each placeholder of `body` -> the outer node passed in its place. For the HOPs halo
    rewrites, by position (`first`: where the operands start in the call's args); for others,
    whose argument layout varies (cond's tuple of operands, autograd_function_apply's backward
    body with the gradient first), by the fake tensor Dynamo records for both: the subgraph's
    placeholder holds the very tensor of the outer node it was lifted from."""
    placeholders = [node for node in body.graph.nodes if node.op == "placeholder"]
    if first is not None:
        return {inner: outer for inner, outer in zip(placeholders, call.args[first:], strict=False)
                if isinstance(outer, fx.Node)}
    outer_nodes = [node for node in call.all_input_nodes if node.op != "get_attr"]
    by_value = {id(value): node for node in outer_nodes
                if (value := node.meta.get("example_value")) is not None}
    return {inner: by_value[id(value)] for inner in placeholders
            if (value := inner.meta.get("example_value")) is not None and id(value) in by_value}


def _skip_reason(hop: str, callers: int, ctx: PassContext) -> str:
    if ctx.config.rotate == "fused":
        return (f"inside a {hop} subgraph: rotate='fused' folds rotations across the whole graph "
                "and does not enter subgraphs")
    if hop not in REWRITTEN_HOPS:
        return f"inside a {hop} subgraph, which halo does not rewrite"
    if callers > 1:
        return (f"inside a {hop} subgraph shared by {callers} calls, which halo does not "
                "rewrite (the halo op names one layer)")
    return ""
