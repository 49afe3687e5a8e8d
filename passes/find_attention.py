"""Analysis: find the attention cores and the linears around them (q/k/v projections, o_proj).

Recognised cores, as Dynamo records them:
    scaled_dot_product_attention(q, k, v, ...)         kind "sdpa"
    matmul(softmax(scores(matmul(q, kᵀ))), v)           kind "eager" (bmm / baddbmm too)
where scores(...) is whatever sits between QKᵀ and the softmax (scaling, masks, casts).

q, k and v are traced back through any op that is not a linear (views, RoPE, q/k norms,
repeat_kv, KV-cache cats, GPT-2's split of the fused c_attn...) to the linears that produce them,
never past another attention core; the output is followed through re-layouts, casts and dropout
to the first linear that reads it: o_proj.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import torch
import torch.fx as fx

from .analysis import AttentionSite, LinearSite
from .graph_utils import (
    call_target_name,
    fake_value,
    linears_reading,
    module_fqn,
    node_arg,
    passthrough_descendants,
    program_order,
    strip_passthroughs,
)

_LOG = logging.getLogger(__name__)

if TYPE_CHECKING:
    from .context import PassContext
    from .graph_utils import GraphTensors

_SDPA = torch.nn.functional.scaled_dot_product_attention  # the same object as torch._C._nn's
_MATMULS = ("matmul", "bmm", "baddbmm")


@dataclass
class _Core:
    node: fx.Node  # the SDPA call, or the eager form's final matmul
    kind: str
    q: fx.Node
    k: fx.Node
    v: fx.Node


class FindAttention:
    name = "find_attention"

    def run(self, ctx: PassContext) -> None:
        linears = ctx.analysis.linear_by_node()
        position = program_order(ctx.gm.graph)
        cores = _find_cores(ctx.gm.graph, linears, ctx.tensors, position)
        core_nodes = {core.node for core in cores}

        def is_boundary(node: fx.Node) -> bool:
            return node in linears or node in core_nodes

        for core in cores:
            fqn = module_fqn(core.node)
            q, k, v = (
                _projection([linears[n] for n in _ancestors(start, is_boundary) if n in linears],
                            fqn, position)
                for start in (core.q, core.k, core.v)
            )
            readers = linears_reading(core.node, linears)
            o = _earliest(readers, position).fqn if readers else None
            ctx.analysis.attention.append(AttentionSite(core.node, fqn, core.kind, q, k, v, o))
            _LOG.debug("attention %s (%s): q=%s k=%s v=%s o=%s", fqn, core.kind, q, k, v, o)


def _find_cores(graph: fx.Graph, linears: dict[fx.Node, LinearSite], tensors: GraphTensors,
                position: dict[fx.Node, int]) -> list[_Core]:
    cores = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target is _SDPA:
            q, k, v = (node_arg(node, i, name) for i, name in enumerate(("query", "key", "value")))
            cores.append(_Core(node, "sdpa", q, k, v))
        elif node.op in ("call_function", "call_method") and call_target_name(node) == "softmax":
            core = _eager_core(node, linears, tensors, position)
            if core is not None:
                cores.append(core)
    # an eager core is named by its final matmul, which comes after the softmax
    return sorted(cores, key=lambda core: position[core.node])


def _eager_core(softmax: fx.Node, linears: dict[fx.Node, LinearSite], tensors: GraphTensors,
                position: dict[fx.Node, int]) -> Optional[_Core]:
    """softmax(scores(q @ kᵀ)) @ v around this softmax; None when it is not attention (a MoE
    router's softmax over a linear's logits, a softmax whose output is not multiplied by v)."""

    def is_activation_matmul(node: fx.Node) -> bool:
        return _is_activation_matmul(node, linears, tensors)

    def is_boundary(node: fx.Node) -> bool:
        return node in linears or is_activation_matmul(node)

    scores = [n for n in _ancestors(softmax.args[0], is_boundary) if is_activation_matmul(n)]
    weighted = [user for probs in passthrough_descendants(softmax) for user in probs.users
                if is_activation_matmul(user) and _matmul_operands(user)[0] is probs]
    if not scores or not weighted:
        return None
    q, k = _matmul_operands(max(scores, key=position.__getitem__))  # the one nearest the softmax
    output = min(weighted, key=position.__getitem__)
    return _Core(output, "eager", q, k, _matmul_operands(output)[1])


def _matmul_operands(node: fx.Node) -> tuple:
    """The two multiplied operands (baddbmm's first argument is the added term)."""
    return tuple(node.args[1:3]) if call_target_name(node) == "baddbmm" else tuple(node.args[:2])


def _is_activation_matmul(node: fx.Node, linears: dict[fx.Node, LinearSite],
                          tensors: GraphTensors) -> bool:
    """A matmul of two activations: neither side is a weight."""
    if node.op not in ("call_function", "call_method") or node in linears:
        return False
    if call_target_name(node) not in _MATMULS:
        return False
    operands = _matmul_operands(node)
    return len(operands) == 2 and all(
        fake_value(x) is not None and tensors.parameter(strip_passthroughs(x)) is None
        for x in operands
    )


def _ancestors(start: fx.Node, is_boundary: Callable[[fx.Node], bool]) -> Iterator[fx.Node]:
    """`start` and its ancestors, not looking past nodes where `is_boundary` holds."""
    stack, seen = [start], {start}
    while stack:
        node = stack.pop()
        yield node
        if is_boundary(node):
            continue
        for source in node.all_input_nodes:
            if source not in seen:
                seen.add(source)
                stack.append(source)


def _projection(found: list[LinearSite], scope: str,
                position: dict[fx.Node, int]) -> Optional[str]:
    """The projection among the linears that produce q, k or v. Several happen with adapters
    (LoRA's base_layer and lora_B): prefer those inside the attention module, then the first
    computed (the base layer)."""
    inside = [site for site in found if scope and site.fqn.startswith(scope + ".")]
    candidates = inside or found
    return _earliest(candidates, position).fqn if candidates else None


def _earliest(sites: list[LinearSite], position: dict[fx.Node, int]) -> LinearSite:
    return min(sites, key=lambda site: position[site.node])
