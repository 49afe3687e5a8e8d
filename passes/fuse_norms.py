"""Transform (rotate="fused"): fold each RMSNorm's scale into the linears that read the norm.

    y = (rmsnorm(x) · g) Wᵀ  =  rmsnorm(x) (W diag(g))ᵀ

The norm is left scale-free, so it commutes with a rotation of its input (‖x Q‖ = ‖x‖), which
is what rotate_residual.py needs. A norm is fused only when every reader of its output is an
F.linear; otherwise it keeps its scale and the report says why for the linears it feeds.

LayerNorm is not fused: it subtracts the mean and adds a bias, so it does not commute with a
rotation. SliceGPT's conversion (mean subtraction moved into the writers' weights) covers pre-LN
models only; BERT/MiniLM are post-LN (the LayerNorm sits on the residual stream itself, with its
affine scale and bias carried by the skip path). See docs/rotation.md.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.fx as fx

from .analysis import NormSite
from .folding import ScaleFreeNorm, fold_weight, foldable, scale_input_side
from .graph_utils import (
    call_target_name,
    fake_value,
    linears_reading,
    passthrough_descendants,
    strip_passthroughs,
)

_LOG = logging.getLogger(__name__)

_RMS_NORM_FUNCTIONS = (torch.nn.functional.rms_norm, torch.rms_norm)
LAYERNORM_REASON = ("LayerNorm does not commute with a rotation (mean subtraction and bias); "
                    "not converted, see docs/rotation.md")


class FuseNorms:
    name = "fuse_norms"

    def run(self, ctx) -> None:
        if ctx.config.rotate != "fused":
            return
        linears = ctx.analysis.linear_by_node()
        for norm in ctx.analysis.norms:
            reason = _fuse(ctx, norm, linears)
            _LOG.debug("%s: %s", norm.fqn, f"scale not folded: {reason}" if reason
                       else f"scale folded into {norm.feeds}")
            if reason:
                for fqn in norm.feeds:
                    ctx.fusion.note_not_fused(fqn, f"{norm.fqn}: {reason}")


def _fuse(ctx, norm: NormSite, linears) -> str:
    """Fold the norm's scale into its readers; the reason when it cannot."""
    if norm.kind != "rmsnorm":
        return LAYERNORM_REASON
    region = _norm_region(norm, ctx.tensors)
    if region is None:
        return "RMSNorm written inline, not as a module or F.rms_norm: scale not fused"
    nodes, norm_input = region
    readers = linears_reading(norm.output, linears)
    allowed = {site.node for site in readers} | set(passthrough_descendants(norm.output))
    for value in passthrough_descendants(norm.output):
        other = next((user for user in value.users if user not in allowed), None)
        if other is not None:
            return f"its output is also read by {other.name}, not only by linears"
    unfoldable = [f"{site.fqn} {why}" for site in readers if (why := foldable(site))]
    if unfoldable:
        return "; ".join(unfoldable)
    if norm.weight is not None:
        weight_node = _remove_scale(ctx, norm, nodes)
        if weight_node is None:
            return "could not find the multiplication by its scale"
        for site in readers:
            fold_weight(ctx, site, scale_input_side, (weight_node,), f"{norm.fqn} scale")
    ctx.fusion.scale_free_norms.append(ScaleFreeNorm(norm_input, norm.output, nodes))
    return ""


def _norm_region(norm: NormSite, tensors) -> Optional[tuple[set[fx.Node], fx.Node]]:
    """(the nodes computing the norm, its input): an F.rms_norm call, or the nodes of one call of
    an RMSNorm module (Dynamo's module-stack key tells the calls apart)."""
    out = norm.output
    if out.op == "call_function" and out.target in _RMS_NORM_FUNCTIONS:
        return {out}, out.args[0]
    stack = out.meta.get("nn_module_stack")
    if not stack:
        return None
    key = list(stack)[-1]
    nodes, todo = {out}, [out]
    while todo:
        for source in todo.pop().all_input_nodes:
            if source not in nodes and list(source.meta.get("nn_module_stack", {}))[-1:] == [key]:
                nodes.add(source)
                todo.append(source)
    inputs = list({source for node in nodes for source in node.all_input_nodes
                   if source not in nodes and fake_value(source) is not None
                   and tensors.parameter(source) is None})
    escapes = any(user not in nodes for node in nodes - {out} for user in node.users)
    if len(inputs) != 1 or escapes:
        return None
    return nodes, inputs[0]


def _remove_scale(ctx, norm: NormSite, nodes: set[fx.Node]) -> Optional[fx.Node]:
    """Drop the norm's multiplication by its scale; returns the scale's graph node."""
    out = norm.output
    if out.op == "call_function" and out.target in _RMS_NORM_FUNCTIONS:
        weight = out.args[2] if len(out.args) > 2 else out.kwargs.get("weight")
        if len(out.args) > 2:
            out.args = (*out.args[:2], None, *out.args[3:])
        else:
            out.kwargs = {**out.kwargs, "weight": None}
        return weight
    for node in nodes:
        if call_target_name(node) != "mul" or len(node.args) != 2:
            continue
        scale = next((a for a in node.args if isinstance(a, fx.Node)
                      and ctx.tensors.parameter(strip_passthroughs(a)) is norm.weight), None)
        if scale is None:
            continue
        other = node.args[1] if node.args[0] is scale else node.args[0]
        replacement = other
        if fake_value(other).dtype != fake_value(node).dtype:  # weight * x promotes dtypes
            with ctx.gm.graph.inserting_before(node):
                replacement = ctx.gm.graph.call_method("to", (other, fake_value(node).dtype))
            replacement.meta.update(node.meta)
        ctx.replace_node(node, replacement)
        ctx.gm.graph.erase_node(node)
        nodes.discard(node)  # (the norm's region, not yet a record)
        nodes.add(replacement)
        return scale
    return None
